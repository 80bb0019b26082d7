"""Streamed answers: a chunked body that starts with the first piece of the first sentence.

Every streamed format goes through one resampler and one encoder run (raw samples for WAV and
PCM, audio.StreamEncoder for MP3, Ogg Opus and Ogg Vorbis), so its pieces join seamlessly
into one stream and it can start before its first sentence is fully decoded.

A stream that cannot deliver all of its audio (Synthesis.audio raises StreamBroken) is
aborted: the connection closes without the final chunk, so every HTTP client reports an
error instead of a complete answer; the access log and the metrics count it with the status it
would have had (504 deadline, 500 failure, 503 shutting down) and `stream_aborted`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from contextlib import aclosing
from typing import AsyncIterator

import numpy as np
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tts_common.errors import TtsError

from .. import audio
from .record import AccessRecord
from .synthesis import StreamBroken, Synthesis

# Formats that go out piece by piece as one valid stream, through one encoder run.
STREAMABLE_FORMATS = frozenset({"wav", "pcm"} | (audio.STREAM_ENCODED & set(audio.SUPPORTED_FORMATS)))
# All of them start before the first sentence is whole (kept as a name for the callers).
PROGRESSIVE_FORMATS = STREAMABLE_FORMATS


class StreamAborted(TtsError):
    """Raised out of a streamed body that cannot finish: the server then closes the connection
    without the final chunk (the status line went out already; this is the only way left to say
    the answer is not complete). Already in the access log; uvicorn's traceback is dropped."""


def streamable(fmt: str) -> bool:
    return fmt in STREAMABLE_FORMATS


def wav_stream_header(rate: int) -> bytes:
    # Streaming WAV: the length is unknown up front; 0xFFFFFFFF is what players accept.
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16
    ) + b"data" + struct.pack("<I", 0xFFFFFFFF)


class PieceEncoder:
    """Encodes a stream's pieces of audio, in order, into the bytes of one stream."""

    def __init__(self, fmt: str, voice_rate: int, sample_rate: int | None, volume: float):
        self.fmt, self.voice_rate, self.sample_rate, self.volume = fmt, voice_rate, sample_rate, volume
        self.out_rate = sample_rate or voice_rate
        self.resampler = audio.StreamResampler(voice_rate, self.out_rate)
        self.encoder = audio.StreamEncoder(fmt, self.out_rate, volume) if fmt in audio.STREAM_ENCODED else None

    def __call__(self, wave: np.ndarray, last: bool) -> bytes:
        if self.encoder is not None:
            return self.encoder(self.resampler(wave, last), last)
        return audio.encode(self.resampler(wave, last), self.out_rate, "pcm", volume=self.volume)


def streamed_response(synthesis: Synthesis, first: list[np.ndarray], fmt: str, sample_rate: int | None,
                      volume: float, record: AccessRecord, headers: dict[str, str]) -> StreamingResponse:
    """The chunked answer, once `first` (Synthesis.first's result) is in."""
    body = _chunks(synthesis, first, fmt, sample_rate, volume, record)
    return StreamingResponse(body, media_type=audio.SUPPORTED_FORMATS[fmt], headers=headers)


async def _chunks(synthesis: Synthesis, first: list[np.ndarray], fmt: str, sample_rate: int | None,
                  volume: float, record: AccessRecord) -> AsyncIterator[bytes]:
    sr = synthesis.sample_rate
    produced = 0.0
    complete = False
    try:
        if fmt == "wav":
            yield wav_stream_header(sample_rate or sr)
        encode = PieceEncoder(fmt, sr, sample_rate, volume)
        async with aclosing(synthesis.audio(first)) as pieces:
            async for piece in pieces:
                seconds = len(piece.wave) / sr
                produced += seconds
                if not piece.partial:
                    record.audio_s = produced
                yield await run_in_threadpool(encode, piece.wave, piece.last)
                if piece.partial or record.first_audio_ms is None:
                    record.first_audio(seconds)
        complete = True
    except StreamBroken as exc:  # the status line is gone already: abort, so the client sees an error
        record.stream_aborted(exc.error.status, str(exc), exc.error.kind)
        raise StreamAborted(str(exc)) from None
    except (asyncio.CancelledError, GeneratorExit):  # the client went away (or the server stops)
        if not complete:
            record.client_gone()
        raise
    finally:
        record.timings(synthesis.jobs[:max(synthesis.done, 1)])


class _QuietAborts(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a StreamAborted: the abort is the
    intended way to end such a stream, and the access log has said so already."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_abort(exc)


def _is_abort(exc: BaseException | None) -> bool:
    if isinstance(exc, StreamAborted):
        return True
    return isinstance(exc, BaseExceptionGroup) and all(_is_abort(e) for e in exc.exceptions)


def quiet_stream_aborts() -> None:
    """Install the filter on uvicorn's error log (once per process)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAborts) for f in logger.filters):
        logger.addFilter(_QuietAborts())
