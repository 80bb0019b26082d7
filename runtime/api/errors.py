"""The API's one error type and its one JSON shape, and the handlers that answer with it.

Every error a client can cause is a JSON answer with a status code (never a traceback), in one
shape: `{"detail": "...", "error": {"message", "type", "param", "code"}}` - `detail` for curl
users and FastAPI habits, `error` for OpenAI clients.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tts_common.errors import TtsError

from .record import access_record


class HttpError(TtsError):
    """A request refused or failed: the HTTP status, and `kind`, the stable machine name of what
    went wrong (the error shape's `type`, the access log's `error_kind`, the `tts_errors_total`
    label) that a front end without HTTP statuses can pass on as it is."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers, self.extra = headers or {}, extra

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param, self.headers, **self.extra)


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"detail": message, "error": {"message": message, "type": kind, "param": param, "code": status}, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Answer HttpError, FastAPI's validation errors and Starlette's own (404, 405, ...) in the
    one shape, and note each in the request's access record."""
    app.add_exception_handler(HttpError, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _starlette_error)


async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
    access_record(request).fail(exc.message, exc.kind)
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    kind = "invalid_request_error"
    first_param = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', 'decode error')} at position {err['loc'][-1]}")
            kind = "malformed_json"
            continue
        where = _loc(tuple(err.get("loc", ())))
        first_param = first_param or where
        msg = "unknown field" if err.get("type") == "extra_forbidden" else (
            "required field is missing" if err.get("type") == "missing" else err.get("msg", "invalid"))
        problems.append(f"{where}: {msg.removeprefix('Value error, ')}")
    message = "; ".join(problems) or "invalid request"
    access_record(request).fail(message, kind)
    return error_response(422, message, kind, first_param)


async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "the request body could not be parsed (is it UTF-8 JSON?)"
    access_record(request).fail(message, kind)
    return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"
