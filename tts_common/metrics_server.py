"""A daemon's Prometheus metrics, alone, on a Unix socket: `GET /metrics` and nothing else.

Prometheus scrapes HTTP over TCP only. Each daemon serves its registry on a socket of its
own (not its API socket, so the network never reaches synthesis), and the metrics socket
units (`systemd/tts-*-metrics.socket`) front it with `systemd-socket-proxyd` on a TCP port
that only the Prometheus hosts may connect to (docs/operations.md, "Metrics and alerts").

`process_collector()` is prometheus_client's process metrics made to work under
`ProcSubset=pid` (the provisioner's unit hides /proc/stat, where the stock collector looks
up the boot time: without it, it reports nothing, process_start_time_seconds included,
and the restart alert needs that one).
"""

from __future__ import annotations

import gzip
import os
import socket
import socketserver
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from .errors import TtsError

log = structlog.get_logger(__name__)

SOCKET_MODE = 0o660  # the proxy runs as the daemons' group


class MetricsSocketError(TtsError):
    """The metrics socket cannot be created."""


class _BootTimeProcessCollector(ProcessCollector):
    def _boot_time(self):
        try:
            return super()._boot_time()
        except OSError:
            # /proc/stat hidden: the boot time is now minus the time since boot.
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def process_collector(registry: CollectorRegistry) -> ProcessCollector:
    """process_* metrics (start time, CPU, resident memory, fds) into `registry`."""
    return _BootTimeProcessCollector(registry=registry)


class _Handler(BaseHTTPRequestHandler):
    timeout = 10  # a client that sends nothing does not keep a thread
    registry: CollectorRegistry  # set per server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"only /metrics is served here\n", "text/plain; charset=utf-8")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.registry)
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(200, gzip.compress(body, compresslevel=1), content_type, gzip=True)
        else:
            self._send(200, body, content_type)

    def _send(self, code: int, body: bytes, content_type: str, gzip: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:  # a Unix peer has no address
        return "unix"

    def log_message(self, format, *args) -> None:  # scrapes are not worth a log line
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """`MetricsServer(path, registry).start()`; `stop()` closes it and removes the file."""

    def __init__(self, path: Path, registry: CollectorRegistry):
        self.path = Path(path)
        self.registry = registry
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "MetricsServer":
        _remove_stale(self.path)
        handler = type("MetricsHandler", (_Handler,), {"registry": self.registry})
        try:
            self._server = _Server(str(self.path), handler)
            os.chmod(self.path, SOCKET_MODE)
        except OSError as exc:
            raise MetricsSocketError(f"cannot serve metrics on {self.path}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics", socket=str(self.path))
        return self

    def serve(self) -> "MetricsServer | None":
        """start(), except that a socket that cannot be made is logged (an error) and the
        daemon goes on without metrics: its work matters more, and Prometheus reports the
        target down."""
        try:
            return self.start()
        except (MetricsSocketError, OSError) as exc:
            log.error("metrics not served", socket=str(self.path), error=str(exc))
            return None

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _remove_stale(path: Path) -> None:
    """A socket file nobody listens on (a crash) is replaced; a live one is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise MetricsSocketError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise MetricsSocketError(f"another process serves metrics on {path}")
