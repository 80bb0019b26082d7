"""A small client for the runtime's HTTP API over its Unix socket (httpx).

Errors come back as `RequestFailed` with the server's own message (its JSON `detail`),
the status code and Retry-After, so tools can print them and decide about retries.
A 503 or 429 with Retry-After (not ready yet, queue full) is asked again after that
delay for as long as the client's own timeout allows; then it is the error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from tts_common.errors import TtsError

from .config import DEFAULT_SOCKET_PATH

BASE_URL = "http://tts-runtime"  # the host part is ignored on a Unix socket
SOCKET_ENV = "TTS_RUNTIME_SOCKET"


# What a connection closed under a request looks like (not a refused connect, not a timeout).
RESET_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def default_socket() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH)


class RequestFailed(TtsError):
    """A request to the runtime got an error answer, or no answer (status None)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        # No status = the request never got an answer (connection refused, timeout).
        return self.status is None or self.status in (408, 429) or self.status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> RequestFailed:
    try:
        body = response.json()
        message = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        message = None
    if not isinstance(message, str):
        message = response.text.strip()[:300] or response.reason_phrase
    return RequestFailed(f"HTTP {response.status_code}: {message}", response.status_code, _retry_after(response))


def transport_error(exc: httpx.HTTPError, socket_path: Path) -> RequestFailed:
    if isinstance(exc, httpx.TimeoutException):
        return RequestFailed(f"timed out talking to the runtime at {socket_path}")
    if isinstance(exc, httpx.ConnectError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, FileNotFoundError) or "No such file" in str(exc):
            return RequestFailed(f"no runtime socket at {socket_path} (is tts-runtime running?)")
        if isinstance(cause, PermissionError) or "Permission denied" in str(exc):
            return RequestFailed(f"permission denied on {socket_path} (are you in the socket's group?)")
        return RequestFailed(f"cannot connect to the runtime at {socket_path}: {exc}")
    return RequestFailed(f"talking to the runtime at {socket_path} failed: {exc}")


def http_client(socket_path: Path, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url=BASE_URL,
                        timeout=httpx.Timeout(timeout, connect=5.0))


def async_http_client(socket_path: Path, timeout: float = 120.0, connections: int = 16) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket_path), limits=limits),
                             base_url=BASE_URL, timeout=httpx.Timeout(timeout, connect=5.0))


# Answers that say "come back later": asked again after their Retry-After.
RETRY_LATER = (429, 503)


class RuntimeClient:
    def __init__(self, socket_path: Path | None = None, timeout: float = 120.0):
        self.socket_path = Path(socket_path or default_socket())
        self.timeout = timeout
        self._http = http_client(self.socket_path, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RuntimeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            try:
                return self._http.request(method, path, **kwargs)
            except RESET_ERRORS:
                # A kept-alive connection closed by the server just as it was reused: every
                # request of this API is idempotent (synthesis is seeded), so send it again once.
                return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.socket_path) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + self.timeout
        while True:
            response = self._send(method, path, **kwargs)
            if response.status_code < 400:
                return response
            error = error_from_response(response)
            if not self._retry_later(error, deadline):
                raise error

    def get_json(self, path: str) -> dict[str, Any]:
        return self._request("GET", path).json()

    def synthesize(self, text: str, **params: Any) -> bytes:
        body = {"text": text, **{k: v for k, v in params.items() if v is not None}}
        return self._request("POST", "/v1/synthesize", json=body).content

    def _retry_later(self, error: RequestFailed, deadline: float) -> bool:
        """Sleep out a "come back later" answer if the next try still starts within our own
        timeout; False when the error is final."""
        if error.status not in RETRY_LATER or error.retry_after is None \
                or time.monotonic() + error.retry_after >= deadline:
            return False
        time.sleep(error.retry_after)
        return True

    def stream(self, text: str, **params: Any) -> Iterator[bytes]:
        body = {"text": text, "stream": True, **{k: v for k, v in params.items() if v is not None}}
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                with self._http.stream("POST", "/v1/synthesize", json=body) as response:
                    if response.status_code < 400:
                        yield from response.iter_bytes()
                        return
                    response.read()
                    error = error_from_response(response)
                if not self._retry_later(error, deadline):
                    raise error
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.socket_path) from None

    def ready(self, timeout: float | None = None) -> tuple[bool, str]:
        """(ready, reason); connection problems are 'not ready' with the reason. A probe:
        never retried. `timeout` (seconds) overrides the client's for this request."""
        try:
            response = self._http.get("/readyz", **({"timeout": timeout} if timeout is not None else {}))
        except httpx.HTTPError as exc:
            return False, str(transport_error(exc, self.socket_path))
        try:
            body = response.json()
        except ValueError:
            body = {}
        return response.status_code == 200, body.get("reason") or ("ready" if response.status_code == 200 else "")

    def status(self) -> dict[str, Any]:
        return self.get_json("/v1/status")

    def voices(self) -> dict[str, Any]:
        return self.get_json("/v1/voices")

    def reload(self) -> dict[str, Any]:
        return self._request("POST", "/v1/reload").json()
