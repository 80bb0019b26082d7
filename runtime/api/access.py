"""The outermost ASGI layer: request id, body-size limit, UTF-8 check, access log, request metrics.

Plain ASGI rather than a Starlette middleware, so streamed bodies and disconnects pass through
untouched. The body-size limit is here rather than FastAPI's, whose refusal is a plain-text 413
that skips the JSON error shape.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING

import structlog

from .errors import HttpError
from .record import SCOPE_KEY, AccessRecord

if TYPE_CHECKING:
    from .service import Runtime

access_log = structlog.get_logger("runtime.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KNOWN_PATHS = frozenset({
    "/v1/synthesize", "/v1/audio/speech", "/v1/voices", "/healthz", "/readyz",
    "/v1/status", "/metrics", "/v1/reload",
})
SYNTHESIS_PATHS = frozenset({"/v1/synthesize", "/v1/audio/speech"})
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes poll these: debug level only


def utf8_error(body: bytes) -> str | None:
    """Why a request body is not UTF-8, or None. Strict: an encoded lone surrogate (ED A0 80),
    which Python's JSON reader would let through, is invalid UTF-8 like any other bad byte."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
    return None


def _request_headers(scope) -> tuple[str | None, int | None]:
    """The client's request id when it is a sane one, and the declared Content-Length."""
    rid, declared = None, None
    for key, value in scope.get("headers", []):
        if key == b"x-request-id":
            candidate = value.decode("latin-1")
            rid = candidate if _REQUEST_ID.match(candidate) else None
        elif key == b"content-length" and value.isdigit():
            declared = int(value)
    return rid, declared


class AccessLayer:
    def __init__(self, app, runtime: Runtime):
        self.app = app
        self.runtime = runtime
        # Room for the longest allowed text in JSON: a character outside the BMP escapes as a
        # surrogate pair, 12 bytes ("\ud83d\ude00"); max_chars counts it as one.
        self.max_body = runtime.config.max_chars * 12 + 16384

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, declared = _request_headers(scope)
        record = scope[SCOPE_KEY] = AccessRecord(id=rid or uuid.uuid4().hex[:16])
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", record.id.encode())]
            await send(message)

        body, too_large = await self._read_body(receive, declared)

        async def replay():
            return body.pop(0) if body else await receive()

        try:
            refusal = self._refusal(body, too_large)
            if refusal is not None:
                record.fail(refusal.message, refusal.kind)
                await refusal.response()(scope, receive, send_wrapper)
            else:
                await self.app(scope, replay, send_wrapper)
        finally:
            self._record(scope, record, status)

    async def _read_body(self, receive, declared: int | None) -> tuple[list[dict], bool]:
        """The body's messages, and whether it is over the limit. The whole body is read here (it
        is small: max_body at most) so an oversized one, with or without Content-Length, is
        refused before the app sees it."""
        body, size, too_large = [], 0, declared is not None and declared > self.max_body
        while not too_large:
            message = await receive()
            body.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: the app sees it
            size += len(message.get("body", b""))
            too_large = size > self.max_body
            if not message.get("more_body", False):
                break
        return body, too_large

    def _refusal(self, body: list[dict], too_large: bool) -> HttpError | None:
        if too_large:
            return HttpError(413, f"request body is over the limit of {self.max_body} bytes "
                                  f"(max_chars {self.runtime.config.max_chars} characters of text)",
                             "body_too_large", headers={"Connection": "close"})
        bad_utf8 = utf8_error(b"".join(m.get("body", b"") for m in body))
        return HttpError(400, bad_utf8, "bad_request") if bad_utf8 else None

    def _record(self, scope, record: AccessRecord, sent_status: int) -> None:
        path = scope.get("path", "")
        account(self.runtime, record, endpoint=path if path in KNOWN_PATHS else "other",
                method=scope.get("method"), path=path, status=record.logged_status or sent_status,
                synthesis=path in SYNTHESIS_PATHS, quiet=path in QUIET_PATHS)


def account(runtime: Runtime, record: AccessRecord, *, endpoint: str, method: str | None, path: str, status: int,
            synthesis: bool, quiet: bool = False) -> None:
    """A finished request into the metrics and the access log, whichever front end served it."""
    seconds = time.monotonic() - record.started
    metrics = runtime.metrics
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.latency.labels(endpoint).observe(seconds)
    if record.error_kind:
        metrics.errors.labels(record.error_kind).inc()
    if record.aborted:
        metrics.errors.labels("stream_aborted").inc()
    if record.audio_s:
        metrics.audio_seconds.labels(record.voice or "?").inc(record.audio_s)
    if synthesis and status == 200:
        runtime.requests_served += 1
        metrics.observe_synthesis(record, seconds)
    fields = record.log_fields(method, path, status, seconds)
    if quiet:
        access_log.debug("request", **fields)
        return
    if record.text is not None and access_log.isEnabledFor(10):  # the text only when debugging
        fields["text"] = record.text
    access_log.info("request", **fields)
