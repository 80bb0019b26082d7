"""OpenAI compatibility: POST /v1/audio/speech mapped onto the native synthesis.

Existing OpenAI client code works unchanged: its stock voice names mean the default voice, its
default format is mp3, its "pcm" is 24 kHz, and fields this server has no use for are ignored.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from ..config import RuntimeConfig
from .responses import synthesize
from .schemas import SpeechBody, supported_format
from .service import Runtime
from .streaming import streamable

# OpenAI's built-in voice names: existing client code sends these; they mean "the
# default voice" here, so such code works unchanged.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
OPENAI_PCM_RATE = 24000  # OpenAI's "pcm" is 24 kHz 16-bit little-endian mono


def voice_and_speaker(body: SpeechBody, config: RuntimeConfig) -> tuple[str, str | None]:
    """`voice` is "<voice>", "<voice>:<speaker>" (name or id) or an OpenAI stock name (the
    default voice, or `model` when that names one, with its default speaker)."""
    voice, speaker = body.voice, None
    if voice not in config.models and ":" in voice:
        voice, speaker = voice.rsplit(":", 1)
    if voice not in config.models and (voice.lower() in OPENAI_VOICES or body.model in config.models):
        voice = body.model if body.model in config.models else config.default_voice
    return voice, speaker


def add_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request):
        fmt = supported_format(body.response_format, "response_format")
        voice, speaker = voice_and_speaker(body, runtime.config)
        # Streamed like OpenAI's own endpoint (chunked, first sentence first) where the format
        # allows; flac is sent whole.
        return await synthesize(
            runtime, request, text=body.input, voice=voice, fmt=fmt, param="input",
            sample_rate=OPENAI_PCM_RATE if fmt == "pcm" else None, volume=1.0, stream=streamable(fmt),
            speaker_param="voice", seed=0, speed=body.speed, speaker=speaker,
        )
