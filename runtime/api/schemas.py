"""Request bodies and the checks on their fields that FastAPI's validation cannot express."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import audio
from .errors import HttpError

MAX_SEED = 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate: not a character anyone can speak
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character {found.start()}")
    return text


class SynthesizeBody(BaseModel):  # POST /v1/synthesize
    model_config = ConfigDict(extra="forbid")

    text: str
    voice: str | None = None
    speaker: int | str | None = None  # multi-speaker voices: name (speaker_id_map) or id
    format: str = "wav"
    sample_rate: int | None = None
    length_scale: float | None = Field(None, gt=0.1, le=5.0)
    noise_scale: float | None = Field(None, ge=0.0, le=2.0)
    noise_w: float | None = Field(None, ge=0.0, le=2.0)
    speed: float | None = Field(None, ge=0.25, le=4.0)
    volume: float = Field(1.0, ge=0.0, le=4.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stream: bool = False

    _text = field_validator("text")(_no_lone_surrogates)

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, v: int | None) -> int | None:
        if v is not None and v not in audio.SUPPORTED_RATES:
            raise ValueError(f"unsupported sample rate {v}; use one of {list(audio.SUPPORTED_RATES)}")
        return v


class SpeechBody(BaseModel):  # POST /v1/audio/speech (OpenAI's)
    # OpenAI clients send fields this server has no use for (instructions,
    # stream_format): ignore them rather than break the client.
    model_config = ConfigDict(extra="ignore")

    model: str = "tts-1"
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)

    _input = field_validator("input")(_no_lone_surrogates)


def supported_format(fmt: str, param: str) -> str:
    """The format, lower-cased, or a 422 naming `param` and the formats there are."""
    fmt = fmt.lower()
    if fmt not in audio.SUPPORTED_FORMATS:
        raise HttpError(422, f"{param}: unsupported format {fmt!r}; use one of {sorted(audio.SUPPORTED_FORMATS)}",
                        "invalid_request_error", param)
    return fmt
