"""One logging set-up for every daemon and CLI of tts-fleet.

Under systemd (JOURNAL_STREAM set) or when stderr is not a terminal, each event is one
JSON line on stderr; on a terminal, readable console output. A redaction processor runs
last-but-one so that no secret - presigned URL query strings, keys, passwords - can
reach a log whatever a caller passes in.

When stderr is the journal's stream (JOURNAL_STREAM names stderr's device and inode, as
systemd sets it for StandardError=journal), each line starts with the sd-daemon priority
prefix `<N>` (error 3, warning 4, info 6, debug 7): journald strips it and stores the line
at that PRIORITY, so `journalctl -p err` finds errors. Without it every line is
PRIORITY=6. Elsewhere (a terminal, a file, a pipe) lines carry no prefix.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

# Event-dict keys whose values are always secret.
_SECRET_KEYS = re.compile(r"(secret|password|token|credential|signature|authorization)", re.I)
# A URL's query string can carry an S3 signature (presigned URL): drop it.
_URL_QUERY = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")
_AWS_SIG = re.compile(r"(X-Amz-(Signature|Credential|Security-Token)=)[^&\s\"']+", re.I)


def redact(value: Any) -> Any:
    if isinstance(value, str):
        value = _URL_QUERY.sub(r"\1?<redacted>", value)
        return _AWS_SIG.sub(r"\1<redacted>", value)
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEYS.search(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def _redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return redact(event_dict)


# sd-daemon(3) priorities for Python's levels (CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7).
_JOURNAL_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    return next((prio for level, prio in _JOURNAL_PRIORITY if levelno >= level), 7)


def stderr_is_journal() -> bool:
    """Is stderr the stream systemd connected to the journal? (JOURNAL_STREAM is
    "<st_dev>:<st_ino>" of that stream; a child whose stderr was redirected inherits the
    variable but not the stream.)"""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def journal_prefix(levelno: int) -> str:
    """`<N>` for a line at this level when stderr is the journal, else ""."""
    return f"<{journal_priority(levelno)}>" if stderr_is_journal() else ""


class _JournalPrefix(logging.Formatter):
    """Puts the priority prefix before every line of a formatted record (a console
    traceback has several; a JSON event is one)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def use_json_output() -> bool:
    forced = os.environ.get("TTS_LOG_FORMAT", "").lower()
    if forced in {"json", "console"}:
        return forced == "json"
    return bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()


def configure_logging(level: str | int = "info", json_output: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger (for libraries) once per process."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    if json_output is None:
        json_output = use_json_output()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # Library records (stdlib logging) go through the same redaction and renderer.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _redact_processor, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalPrefix(formatter) if stderr_is_journal() else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries: their debug output can include request URLs and headers.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore", "aria2p", "watchdog"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
