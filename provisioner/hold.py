"""Rollback holds: keep a model on an operator-chosen version until its channel moves.

Without a hold, the daemon's next poll would move `current` straight back to the
channel's version. A hold records the version rolled back to and the version the
channel pointed at then; it lapses by itself once the channel points elsewhere
(a fix was published) or when the operator releases it.

    <cache>/holds/<name>.json   {"version": "1.0.0", "channel_version": "1.1.0"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mirror.manifest import validate_name
from tts_common.atomic import write_atomic


@dataclass(frozen=True)
class Hold:
    version: str
    channel_version: str | None


def _path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / "holds" / f"{validate_name(name, 'model name')}.json"


def read_hold(cache_dir: Path, name: str) -> Hold | None:
    try:
        raw = json.loads(_path(cache_dir, name).read_text())
        return Hold(version=raw["version"], channel_version=raw.get("channel_version"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_hold(cache_dir: Path, name: str, hold: Hold) -> None:
    doc = {"version": hold.version, "channel_version": hold.channel_version}
    write_atomic(_path(cache_dir, name), json.dumps(doc) + "\n")


def release_hold(cache_dir: Path, name: str) -> bool:
    path = _path(cache_dir, name)
    if path.exists():
        path.unlink()
        return True
    return False
