"""Streamed answers: a chunked body that starts with the first sentence (or its first piece).

WAV, PCM and Ogg (Opus, Vorbis) stream progressively: their pieces go through one resampler
and one encoder run, so they join seamlessly and a stream can start before its first sentence
is fully decoded. MP3 pieces are separate encoder runs (see audio.StreamEncoder), which leave a
gap where they meet, so MP3 streams send whole sentences.
"""

from __future__ import annotations

import struct
from contextlib import aclosing
from typing import AsyncIterator

import numpy as np
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import audio
from .record import AccessRecord
from .synthesis import Synthesis, job_error

# Formats that can go out piece by piece as one valid stream.
STREAMABLE_FORMATS = frozenset({"wav", "pcm", "mp3", "ogg", "opus"})
# Streamed formats whose pieces go through one resampler and one encoder run (raw samples, or
# audio.StreamEncoder), so a stream can start with part of its first sentence.
PROGRESSIVE_FORMATS = frozenset({"wav", "pcm"} | (audio.STREAM_ENCODED & set(audio.SUPPORTED_FORMATS)))


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
        one_run = fmt in PROGRESSIVE_FORMATS
        self.resampler = audio.StreamResampler(voice_rate, self.out_rate) if one_run else None
        self.encoder = audio.StreamEncoder(fmt, self.out_rate, volume) if fmt in audio.STREAM_ENCODED else None

    def __call__(self, wave: np.ndarray, last: bool) -> bytes:
        if self.resampler is None:  # whole sentences, each its own encoder run
            return audio.encode(wave, self.voice_rate, self.fmt, target_rate=self.sample_rate, volume=self.volume)
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
    except Exception as exc:  # the status line is gone already: end the stream early, say so in the log
        err = job_error(exc)
        record.fail(f"stream ended after {synthesis.done} of {len(synthesis.jobs)} sentences: {err.message}", err.kind)
    finally:
        synthesis.cancel(synthesis.jobs[synthesis.done:])
        record.timings(synthesis.jobs[:max(synthesis.done, 1)])
