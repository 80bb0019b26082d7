"""Piper's voice JSON: what the importer requires of it, and its speakers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import PiperImportError

# Phoneme types piper knows whose phonemizers (and their models) this runtime does not ship.
_REFUSED_PHONEME_TYPES = {
    "pinyin": "needs piper's g2pW model (Chinese)",
    "japanese": "needs OpenJTalk (Japanese)",
    "hebrew": "needs the Nakdimon diacritizer (Hebrew)",
    "thai": "needs TLTK (Thai)",
}
SUPPORTED_PHONEME_TYPES = ("espeak", "text")


def read_voice_json(json_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PiperImportError(f"voice config {json_path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PiperImportError(f"voice config {json_path} is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise PiperImportError(f"voice config {json_path} is not a JSON object")
    problems = []
    if not isinstance(cfg.get("audio", {}).get("sample_rate"), int):
        problems.append("audio.sample_rate (int)")
    if not isinstance(cfg.get("phoneme_id_map"), dict) or not cfg["phoneme_id_map"]:
        problems.append("phoneme_id_map (non-empty object)")
    ptype = cfg.get("phoneme_type", "espeak")
    if ptype in _REFUSED_PHONEME_TYPES:
        raise PiperImportError(f"voice config {json_path}: phoneme_type {ptype!r} is not supported "
                               f"({_REFUSED_PHONEME_TYPES[ptype]}, not shipped with tts-fleet); "
                               f"supported: {', '.join(SUPPORTED_PHONEME_TYPES)}")
    if ptype not in SUPPORTED_PHONEME_TYPES:
        problems.append(f"phoneme_type one of {list(SUPPORTED_PHONEME_TYPES)} (got {ptype!r})")
    if ptype == "espeak" and not isinstance((cfg.get("espeak") or {}).get("voice"), str):
        problems.append("espeak.voice (string)")
    try:
        if int(cfg.get("num_speakers", 1)) < 1:
            problems.append(f"num_speakers >= 1 (got {cfg.get('num_speakers')})")
    except (TypeError, ValueError):
        problems.append(f"num_speakers (int, got {cfg.get('num_speakers')!r})")
    clusters = cfg.get("vowel_clusters") or []
    if not isinstance(clusters, list) or not all(
            isinstance(vc, list) and vc and all(isinstance(p, str) for p in vc) for vc in clusters):
        problems.append("vowel_clusters (list of lists of phonemes)")
    elif any("".join(vc) not in cfg.get("phoneme_id_map", {}) for vc in clusters):
        problems.append("vowel_clusters whose merged phoneme is in phoneme_id_map")
    if problems:
        raise PiperImportError(f"voice config {json_path} lacks or has bad: {', '.join(problems)}")
    return cfg



def speaker_map(cfg: dict[str, Any], n_speakers: int, json_path: Path) -> dict[str, int]:
    declared = int(cfg.get("num_speakers", 1))
    if declared != n_speakers:
        raise PiperImportError(f"voice config {json_path} says num_speakers {declared} but the graph's speaker "
                               f"embedding has {n_speakers} rows")
    speakers = cfg.get("speaker_id_map") or {}
    if not isinstance(speakers, dict) or not all(isinstance(v, int) and 0 <= v < n_speakers
                                                  for v in speakers.values()):
        raise PiperImportError(f"voice config {json_path}: speaker_id_map must map names to ids in [0, {n_speakers})")
    return {str(k): int(v) for k, v in speakers.items()}
