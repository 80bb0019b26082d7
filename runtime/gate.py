"""Readiness gate: may a model be loaded from the cache yet, and if not, why not.

A model is loadable when `current/<name>` resolves (through the provisioner's read-only
cache API) to a snapshot with `COMPLETE` whose files match its manifest: sizes always,
sha256 only when configured. Until then the reason names what is missing, using the
provisioner's status file for progress ("waiting for model cache: joe 2 of 3 files").

`SwitchWatcher` wakes the caller on filesystem events (watchdog/inotify) in the cache's
`current/` directory and the provisioner's runtime directory, so waiting costs nothing
and a move of `current/<name>` is noticed at once. Directories that do not exist yet
are watched through their nearest existing parent and re-armed when they appear.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mirror.manifest import ManifestError
from provisioner.cache import CacheError, CacheReader, Snapshot
from provisioner.status import read_status

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GateResult:
    name: str
    snapshot: Snapshot | None
    reason: str  # empty when loadable

    @property
    def ok(self) -> bool:
        return self.snapshot is not None and not self.reason


class ReadinessGate:
    def __init__(self, cache_dir: Path, provisioner_runtime_dir: Path, full_hash: bool = False):
        self.reader = CacheReader(Path(cache_dir))
        self.provisioner_runtime_dir = Path(provisioner_runtime_dir)
        self.full_hash = full_hash

    def check(self, name: str) -> GateResult:
        snap = self.reader.current(name)
        if snap is None:
            return GateResult(name, None, self._waiting_reason(name))
        try:
            problems = self.reader.check_snapshot(snap, full_hash=self.full_hash)
        except (CacheError, ManifestError) as exc:
            return GateResult(name, None, f"snapshot {name}/{snap.version} is unusable: {exc}")
        if problems:
            listed = ", ".join(str(p) for p in problems[:5])
            return GateResult(name, None, f"snapshot {name}/{snap.version} does not match its manifest: {listed}")
        return GateResult(name, snap, "")

    def _waiting_reason(self, name: str) -> str:
        status = read_status(self.provisioner_runtime_dir)
        model = ((status or {}).get("models") or {}).get(name)
        if not isinstance(model, dict):
            where = "no provisioner status yet" if status is None else "the provisioner does not track it yet"
            return f"waiting for model cache: {name} ({where})"
        done, total = model.get("files_done") or 0, model.get("files_total") or 0
        state = model.get("state") or "waiting"
        version = model.get("wanted_version")
        what = f"{name} {version}" if version else name
        detail = f"{what} {done} of {total} files" if total else f"{what} ({state})"
        if model.get("error"):
            detail += f"; provisioner error: {model['error']}"
        return f"waiting for model cache: {detail}"


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event):
        self._event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):  # reads are not changes
            self._event.set()


class SwitchWatcher:
    """Sets an event whenever something changes in the watched directories."""

    def __init__(self, directories: list[Path]):
        self.targets = [Path(d) for d in directories]
        self.changed = threading.Event()
        self._observer = Observer()
        self._handler = _Wake(self.changed)
        self._watches: dict[Path, object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _nearest_existing(path: Path) -> Path | None:
        for candidate in (path, *path.parents):
            if candidate.is_dir():
                return candidate
        return None

    def _arm(self) -> None:
        # Watch each target, or its nearest existing parent until the target appears.
        # When the watched set changes, something may have happened before the new
        # watch existed: wake the caller once more so it re-checks.
        with self._lock:
            wanted = {p for p in (self._nearest_existing(t) for t in self.targets) if p is not None}
            for path in set(self._watches) - wanted:
                try:
                    self._observer.unschedule(self._watches.pop(path))
                except (KeyError, ValueError):
                    pass
            added = wanted - set(self._watches)
            for path in added:
                try:
                    self._watches[path] = self._observer.schedule(self._handler, str(path), recursive=False)
                except OSError as exc:  # e.g. permission denied: fall back to the slow re-check
                    log.warning("cannot watch directory", path=str(path), error=str(exc))
            if added and self._observer.is_alive():
                self.changed.set()

    def start(self) -> None:
        self._arm()
        self._observer.daemon = True
        self._observer.start()

    def wait(self, timeout: float) -> bool:
        """Block until a change (True) or the timeout (False); re-arms watches either way."""
        fired = self.changed.wait(timeout)
        self.changed.clear()
        self._arm()
        return fired

    def poke(self) -> None:
        self.changed.set()

    def stop(self) -> None:
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout=5)
