"""An HTTP proxy in front of a test S3 server that plays the hostile (or unlucky) network
path between a node and its mirror, for the transfer tests (tests/test_provisioner_transfer.py).

Requests are forwarded unchanged, Host header included, so presigned URLs signed for the
proxy's host:port verify on the server behind it. What it can do to responses:

- `rate`: send every GET body at most this many bytes per second (a mirror that trickles),
  in small chunks so the rate is smooth; 0 = full speed;
- `head_size`: answer HEAD requests with this Content-Length (a path that lies about an
  object's size, so only the GET shows it);
- `corrupt`: flip one byte in the bodies of this many of aria2's GET responses (told by its
  User-Agent) whose path contains `corrupt_match`, then pass bytes through (a corruption in
  transit that does not come back).

It counts GET body bytes sent to the client (`get_bytes`), i.e. what the mirror's side sent.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time

CHUNK = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class HostileProxy:
    def __init__(self, target_port: int, rate: float = 0.0, head_size: int | None = None, corrupt: int = 0,
                 corrupt_match: str = ""):
        self.target_port = target_port
        self.rate = rate
        self.head_size = head_size
        self.corrupt = corrupt
        self.corrupt_match = corrupt_match
        self.get_bytes = 0
        self.corrupted = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.forward(self, "GET")

            def do_HEAD(self) -> None:
                proxy.forward(self, "HEAD")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HostileProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _take_corruption(self, handler) -> bool:
        if "aria2" not in handler.headers.get("User-Agent", "") or self.corrupt_match not in handler.path:
            return False
        with self.lock:
            if self.corrupted >= self.corrupt:
                return False
            self.corrupted += 1
            return True

    def forward(self, handler, method: str) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(method, handler.path, headers=headers)
            resp = upstream.getresponse()
            handler.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() in HOP_BY_HOP:
                    continue
                if method == "HEAD" and key.lower() == "content-length" and self.head_size is not None:
                    value = str(self.head_size)
                handler.send_header(key, value)
            handler.end_headers()
            if method == "GET":
                self._body(handler, resp, self._take_corruption(handler))
        except (OSError, http.client.HTTPException):
            handler.close_connection = True
        finally:
            upstream.close()

    def _body(self, handler, resp, corrupt: bool) -> None:
        step = max(64, int(self.rate) // 8) if self.rate else CHUNK
        started, sent = time.monotonic(), 0
        while data := resp.read(step):
            if corrupt and sent == 0:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            handler.wfile.write(data)
            handler.wfile.flush()
            sent += len(data)
            with self.lock:
                self.get_bytes += len(data)
            if self.rate:
                time.sleep(max(0.0, started + sent / self.rate - time.monotonic()))
