"""What a Wyoming client is told and how it names a voice: `info` from the configured voices,
and a `synthesize` event's voice (name, or language; speaker by name or id) -> the voice served.

Home Assistant lists the voices and languages of `info` in its TTS options and sends the chosen
voice's name (and speaker) back; a client that names only a language gets the first configured
voice speaking it ("en" matches "en_US"; the default voice first).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker

from .errors import HttpError
from .service import Runtime

PROGRAM = "tts-fleet"
_ATTRIBUTION = Attribution(name="tts-fleet", url="")


def _version() -> str | None:
    try:
        return version("tts-fleet")
    except PackageNotFoundError:
        return None


def _voice(name: str, d: dict[str, Any]) -> TtsVoice:
    language = d.get("language")
    speakers = d.get("speakers") or {}
    described = ", ".join(str(x) for x in (language, d.get("quality"), d.get("version")) if x)
    return TtsVoice(
        name=name, description=f"{name} ({described})" if described else name, attribution=_ATTRIBUTION,
        installed=bool(d.get("loaded")), version=d.get("version"), languages=[language] if language else [],
        speakers=[TtsVoiceSpeaker(name=s) for s in sorted(speakers, key=speakers.get)]
        if (d.get("num_speakers") or 1) > 1 else None,
    )


def info_event(runtime: Runtime) -> Info:
    """One installed TTS program with every configured voice (a voice still waiting for the
    cache is listed as not installed), streaming synthesis supported."""
    described = runtime.manager.describe()
    voices = [_voice(name, described.get(name, {})) for name in runtime.config.models]
    return Info(tts=[TtsProgram(
        name=PROGRAM, description="tts-fleet runtime: batched VITS synthesis", attribution=_ATTRIBUTION,
        installed=True, version=_version(), voices=voices, supports_synthesize_streaming=True,
    )])


def _same_language(asked: str, offered: str) -> bool:
    a, o = asked.replace("-", "_").lower(), offered.replace("-", "_").lower()
    return a == o or ("_" not in a and o.split("_", 1)[0] == a)


def resolve_voice(runtime: Runtime, voice: Any) -> tuple[str, Any]:
    """(voice name, speaker) for a synthesize event's `voice` object (absent: the default voice).
    HttpError `unknown_voice` / `invalid_request_error` otherwise."""
    config = runtime.config
    if voice is None:
        return config.default_voice, None
    if not isinstance(voice, dict):
        raise HttpError(422, "voice must be an object with 'name' (and 'speaker') or 'language'",
                        "invalid_request_error", "voice")
    name, language, speaker = voice.get("name"), voice.get("language"), voice.get("speaker")
    if speaker is not None and (isinstance(speaker, bool) or not isinstance(speaker, (str, int))):
        raise HttpError(422, "voice.speaker must be a speaker name or id", "invalid_request_error", "voice.speaker")
    if name is not None:
        if not isinstance(name, str) or name not in config.models:
            raise HttpError(404, f"unknown voice {name!r}; available: {', '.join(config.models)}",
                            "unknown_voice", "voice")
        return name, speaker
    if language is not None:
        if not isinstance(language, str):
            raise HttpError(422, "voice.language must be a string", "invalid_request_error", "voice.language")
        described = runtime.manager.describe()
        for candidate in config.models:
            offered = described.get(candidate, {}).get("language")
            if offered and _same_language(language, offered):
                return candidate, speaker
        raise HttpError(404, f"no voice speaks {language!r}; voices: {', '.join(config.models)}",
                        "unknown_voice", "voice")
    return config.default_voice, speaker
