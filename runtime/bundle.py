"""The voice bundle: the one definition of what `tts-mirror import-piper` writes and the
engine reads.

    <bundle>/model.safetensors   the VITS weights, named as runtime.vits's modules
    <bundle>/voice.json          VoiceBundle.to_json(): text front end, defaults, shape
    <bundle>/MODEL_CARD.md       the source voice's card plus provenance

A bundle is published to the mirror like any model directory; the engine loads it from
a verified snapshot. `VoiceBundle.from_json` is strict about what the engine needs and
names the first missing or malformed key; keys it does not know are ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tts_common.errors import TtsError

from .vits.config import VitsConfig

FORMAT = "tts-fleet-vits/1"
WEIGHTS_FILE = "model.safetensors"
VOICE_FILE = "voice.json"
CARD_FILE = "MODEL_CARD.md"


class BundleError(TtsError):
    """A voice bundle is missing, unreadable, or not one this runtime understands."""


@dataclass(frozen=True)
class InferenceDefaults:
    """The voice's synthesis defaults (Piper's `inference` block; a request may override)."""

    noise_scale: float = 0.667
    length_scale: float = 1.0
    noise_w: float = 0.8

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "InferenceDefaults":
        defaults = cls()
        return cls(**{name: float(raw.get(name, getattr(defaults, name))) for name in asdict(defaults)})


@dataclass(frozen=True)
class VoiceBundle:
    name: str
    sample_rate: int
    phoneme_id_map: dict[str, list[int]]
    hyperparameters: VitsConfig
    inference: InferenceDefaults = InferenceDefaults()
    espeak_voice: str | None = None
    phoneme_type: str = "espeak"
    quality: str | None = None
    language: dict[str, Any] | str = field(default_factory=dict)
    # Piper 1.8 reads no phoneme_map: kept for the record only, never applied.
    phoneme_map: dict[str, Any] = field(default_factory=dict)
    vowel_clusters: list[list[str]] = field(default_factory=list)
    num_speakers: int = 1
    speaker_id_map: dict[str, int] = field(default_factory=dict)
    default_speaker_id: int = 0
    num_symbols: int = 0
    parameters: int = 0
    imported_at: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    # -- voice.json ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc = {"format": self.format}  # first: what a reader checks before anything else
        doc.update((k, getattr(self, k)) for k in self.__dataclass_fields__ if k != "format")
        doc["hyperparameters"] = self.hyperparameters.to_dict()
        doc["inference"] = asdict(self.inference)
        return doc

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, doc: Any, where: str = "voice.json") -> "VoiceBundle":
        if not isinstance(doc, dict):
            raise BundleError(f"{where} is not a JSON object")
        for key in ("sample_rate", "phoneme_id_map", "espeak_voice", "inference", "hyperparameters"):
            if key not in doc:
                raise BundleError(f"{where} lacks {key!r} (not a tts-fleet voice bundle?)")
        try:
            hp = VitsConfig.from_dict(doc["hyperparameters"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bad hyperparameters in {where}: {exc}") from None
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in doc.items() if k in known}
        fields.update(hyperparameters=hp, inference=InferenceDefaults.from_dict(doc["inference"] or {}),
                      sample_rate=int(doc["sample_rate"]), name=str(doc.get("name", "voice")))
        return cls(**fields)

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "voice.json") -> "VoiceBundle":
        try:
            return cls.from_dict(json.loads(data), where)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{where} is not readable JSON: {exc}") from None

    @classmethod
    def read(cls, bundle_dir: Path) -> "VoiceBundle":
        path = Path(bundle_dir) / VOICE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"bundle {bundle_dir} has no {VOICE_FILE}") from None
        except OSError as exc:
            raise BundleError(f"{path} is not readable: {exc.strerror}") from None
        return cls.from_json(data, str(path))

    # -- what operators pick a voice by -------------------------------------------------
    @property
    def language_code(self) -> str | None:
        return self.language.get("code") if isinstance(self.language, dict) else self.language

    def shape(self) -> dict[str, Any]:
        """The fields /v1/voices lists and `tts-mirror import-piper` prints."""
        return {
            "quality": self.quality,
            "sample_rate": self.sample_rate,
            "num_speakers": int(self.num_speakers),
            "language": self.language_code,
            "phoneme_type": self.phoneme_type,
            "resblock": self.hyperparameters.resblock,
        }
