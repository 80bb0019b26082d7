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
import time
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


NOT_READY = b'{"detail": "not ready: loading joe 1.0.0", "error": {"type": "not_ready"}}'


def _answer_503(conn: socket.socket, retry_after: str | None) -> None:
    header = b"retry-after: %s\r\n" % retry_after.encode() if retry_after is not None else b""
    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n" + header +
                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(NOT_READY), NOT_READY))


def _serve(path: Path, answers: list, seen: list[bytes]) -> threading.Thread:
    """One connection per entry of `answers`: True answers 200 JSON, False closes unanswered,
    ("503", retry_after) answers 503 not ready with that Retry-After (None: no header)."""
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
                    if isinstance(answer, tuple):
                        _answer_503(conn, answer[1])
                    elif answer:
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


def test_not_ready_with_retry_after_is_asked_again(tmp_path):
    """A 503 + Retry-After (a runtime loading its model) is asked again after that delay, and
    the answer that follows is what the caller gets (tts-ctl synth, check, ...)."""
    seen: list[bytes] = []
    thread = _serve(tmp_path / "rt.sock", [("503", "0.3"), ("503", "0.3"), True], seen)
    started = time.monotonic()
    with RuntimeClient(tmp_path / "rt.sock", timeout=30) as client:
        assert client.status() == {"ready": True}
    assert time.monotonic() - started >= 0.6  # both delays were waited out (a lower bound: causal)
    thread.join(10)
    assert len(seen) == 3


def test_retry_after_beyond_the_clients_timeout_is_the_error(tmp_path):
    """No waiting past the client's own timeout: the 503 is the answer, with its message.
    (One connection each: a second request would find no stand-in and fail differently.)"""
    seen: list[bytes] = []
    thread = _serve(tmp_path / "rt.sock", [("503", "60")], seen)
    with RuntimeClient(tmp_path / "rt.sock", timeout=5) as client:
        with pytest.raises(RequestFailed, match="HTTP 503: not ready: loading joe 1.0.0") as raised:
            client.status()
    assert raised.value.retry_after == 60
    thread.join(10)
    assert len(seen) == 1
    # A 503 that names no delay is not asked again either.
    seen.clear()
    thread = _serve(tmp_path / "rt2.sock", [("503", None)], seen)
    with RuntimeClient(tmp_path / "rt2.sock", timeout=30) as client:
        with pytest.raises(RequestFailed, match="HTTP 503") as raised:
            client.status()
    assert raised.value.retry_after is None
    thread.join(10)
    assert len(seen) == 1


def test_a_stream_is_asked_again_after_retry_after(tmp_path):
    seen: list[bytes] = []
    thread = _serve(tmp_path / "rt.sock", [("503", "0.2"), True], seen)
    with RuntimeClient(tmp_path / "rt.sock", timeout=30) as client:
        assert b"".join(client.stream("Hello.")) == b'{"ready": true}'
    thread.join(10)
    assert len(seen) == 2 and all(r.startswith(b"POST /v1/synthesize") for r in seen)
