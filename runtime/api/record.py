"""AccessRecord: what the access log line and the request metrics say about one request.

The access layer (access.py) creates one per HTTP request and keeps it in the ASGI scope;
handlers fill it in through `access_record(request)`, and the layer logs and counts it when the
response is over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..scheduler import Job

SCOPE_KEY = "tts.access"


@dataclass
class AccessRecord:
    id: str  # X-Request-Id as the client sent it, or generated; echoed back
    started: float = field(default_factory=time.monotonic)
    voice: str | None = None
    chars: int | None = None
    text: str | None = None  # logged at debug level only
    audio_s: float | None = None  # audio sent (a stream: so far)
    queue_ms: float | None = None  # longest wait of one of its utterances for the worker
    synth_ms: float | None = None  # first utterance started to last finished
    first_audio_ms: float | None = None  # a stream: when its first audio went out
    first_piece_s: float | None = None  # a stream: how much audio that first piece held
    error: str | None = None
    error_kind: str | None = None  # the error shape's `type`; labels tts_errors_total
    logged_status: int | None = None  # set when the status sent is not the story (499: the client left)
    client: str | None = None  # over TCP: the label of the bearer token used (auth.py), never the token
    aborted: bool = False  # a stream cut short: its connection closed without the final chunk

    def fail(self, message: str, kind: str) -> None:
        self.error, self.error_kind = message, kind

    def client_gone(self) -> None:
        self.logged_status = 499
        self.fail("client disconnected", "client_gone")

    def stream_aborted(self, status: int, message: str, kind: str) -> None:
        """A stream that had sent its 200 could not finish: logged and counted with the status
        it would have had, and as `stream_aborted` (tts_errors_total)."""
        self.logged_status = status
        self.fail(message, kind)
        self.aborted = True

    def synthesizing(self, voice: str, text: str) -> None:
        self.voice, self.chars, self.text = voice, len(text), text

    def timings(self, jobs: list[Job]) -> None:
        self.queue_ms = round(max(j.queue_seconds for j in jobs) * 1000, 1)
        # wall time from the first sentence starting to the last finishing (batches overlap jobs)
        starts = [j.started for j in jobs if j.started is not None]
        ends = [j.finished for j in jobs if j.finished is not None]
        self.synth_ms = round((max(ends) - min(starts)) * 1000, 1) if starts and ends else None

    def first_audio(self, piece_s: float) -> None:
        self.first_audio_ms = round((time.monotonic() - self.started) * 1000, 1)
        self.first_piece_s = round(piece_s, 3)

    def log_fields(self, method: str | None, path: str, status: int, seconds: float) -> dict[str, Any]:
        """The access log line's fields, those with a value, in a fixed order (the text apart)."""
        fields = {
            "id": self.id, "method": method, "path": path, "status": status, "client": self.client,
            "voice": self.voice, "chars": self.chars,
            "audio_s": round(self.audio_s, 3) if self.audio_s else None,
            "queue_ms": self.queue_ms, "synth_ms": self.synth_ms,
            "first_audio_ms": self.first_audio_ms, "first_piece_s": self.first_piece_s,
            "total_ms": round(seconds * 1000, 1),
            "aborted": self.aborted or None,
            "error": self.error or None,
        }
        return {k: v for k, v in fields.items() if v is not None}


def access_record(request: Request) -> AccessRecord:
    """The request's record; a detached one where no access layer runs, so callers never check."""
    record = request.scope.get(SCOPE_KEY)
    return record if record is not None else AccessRecord(id="-")
