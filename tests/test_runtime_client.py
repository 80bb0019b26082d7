"""runtime.client against a connection closed under a request.

The real runtime cannot be made to close a kept-alive connection at the instant a client
reuses it (that race is what a client sees when its idle connection and the server's
keep-alive timeout expire together), so a small Unix-socket server stands in for it: it
reads the first request and closes the connection without answering, then answers the
next one. The client must send the request once more and succeed, and must not retry
without end when every answer is a closed connection."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from runtime.client import RequestFailed, RuntimeClient

pytestmark = pytest.mark.integration


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _serve(path: Path, answers: list[bool], seen: list[bytes]) -> threading.Thread:
    """One connection per entry of `answers`: True answers 200 JSON, False closes unanswered."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(30)

    def run() -> None:
        with listener:
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    seen.append(_read_request(conn))
                    if answer:
                        body = json.dumps({"ready": True}).encode()
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_reset_connection_is_retried_once(tmp_path):
    seen: list[bytes] = []
    thread = _serve(tmp_path / "rt.sock", [False, True], seen)
    with RuntimeClient(tmp_path / "rt.sock", timeout=10) as client:
        assert client.status() == {"ready": True}
    thread.join(10)
    assert len(seen) == 2 and all(r.startswith(b"GET /v1/status") for r in seen)


def test_a_second_reset_is_an_error_not_a_loop(tmp_path):
    seen: list[bytes] = []
    thread = _serve(tmp_path / "rt.sock", [False, False], seen)
    with RuntimeClient(tmp_path / "rt.sock", timeout=10) as client:
        with pytest.raises(RequestFailed, match="talking to the runtime"):
            client.status()
    thread.join(10)
    assert len(seen) == 2
