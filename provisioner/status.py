"""The provisioner's status file: the one contract other tools read.

Written atomically (temp file + rename) to `<runtime_dir>/status.json`:

    {
      "schema": 1,
      "updated": "2026-11-21T12:00:00Z",
      "pid": 1234,
      "state": "starting" | "syncing" | "idle" | "degraded" | "error" | "stopped",
      "ready": true,                      # every tracked model has a complete current snapshot
      "syncs_completed": 3,               # increments after each sync pass
      "message": "...",                   # the same text as systemd's STATUS=
      "p2p": null | {                     # [p2p] enabled: totals since the daemon started
        "from_peers": 0, "from_mirror": 0,  # bytes fetched by BitTorrent; from_mirror: bytes that
                                            # arrived while the mirror was a web seed (upper bound)
        "uploaded": 0, "seeding": 0         # bytes sent to peers; blobs being seeded
      },
      "trust": null | {                   # [trust] root set: the signed channel metadata
        "root_version": 1, "timestamp_version": 42,
        "expires": {"root": "...", "timestamp": "...", "snapshot": "...", "targets": "..."},
        "mirrors": {"primary": "ok" | "older: ..." | "expired: ..." | "unreachable: ..."},
        "error": null | "..."             # e.g. expired on every mirror: nothing moves
      },
      "models": {
        "<name>": {
          "current_version": "1.0.0" | null,
          "wanted_version": "1.1.0" | null,
          "state": "ok" | "downloading" | "verifying" | "damaged" | "error" | "waiting",
          "bytes_done": 0, "bytes_total": 0, "rate_bps": 0.0, "eta_s": null,
          "files_done": 0, "files_total": 0,
          "error": null | "...",
          "damaged": ["path: problem", ...]
        }
      }
    }

Never contains credentials or URLs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tts_common.atomic import write_atomic

SCHEMA = 1
STATUS_FILE = "status.json"
PID_FILE = "provisioner.pid"


@dataclass
class ModelStatus:
    current_version: str | None = None
    wanted_version: str | None = None
    state: str = "waiting"
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    eta_s: float | None = None
    files_done: int = 0
    files_total: int = 0
    error: str | None = None
    damaged: list[str] = field(default_factory=list)


@dataclass
class ProvisionerStatus:
    state: str = "starting"
    ready: bool = False
    syncs_completed: int = 0
    message: str = ""
    models: dict[str, ModelStatus] = field(default_factory=dict)
    p2p: dict[str, int] | None = None
    trust: dict[str, Any] | None = None

    def model(self, name: str) -> ModelStatus:
        return self.models.setdefault(name, ModelStatus())

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(schema=SCHEMA, pid=os.getpid(), updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return doc

    def write(self, runtime_dir: Path) -> None:
        write_atomic(Path(runtime_dir) / STATUS_FILE, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")


def read_status(runtime_dir: Path) -> dict[str, Any] | None:
    """The last status document, or None if the provisioner has not written one."""
    try:
        return json.loads((Path(runtime_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
