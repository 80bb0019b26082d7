"""Wait for a model's current snapshot, woken by filesystem events (never busy polling).

Used by `tts-provisioner wait` (an `ExecStartPre=` gate for any model server) and by
`tts-provisioner supervise` (which also follows `current/<name>` when it moves).

What is watched, each directory non-recursively with inotify (watchdog), re-armed as
directories appear: the cache root (current/ and snapshots/ created), `current/` (the
symlink replaced by rename), `snapshots/<name>/` (a version directory renamed in or
removed), the current snapshot's own directory (COMPLETE or a file removed) and the
provisioner's runtime directory (status.json replaced: its error for this model is
what a waiting operator needs to read).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .cache import CacheError, CacheReader, Snapshot
from tts_common.errors import TtsError

from .status import read_status

# A safety net only: events wake every check; this bounds a check missed by an
# inotify queue overflow (the kernel then drops events).
RECHECK_SECONDS = 30.0


@dataclass(frozen=True)
class SnapshotState:
    """What `current/<name>` is now: a usable snapshot, or why not (one line)."""
    snapshot: Snapshot | None
    why: str

    @property
    def version(self) -> str | None:
        return self.snapshot.version if self.snapshot else None


def current_state(cache: CacheReader, name: str, version: str | None = None) -> SnapshotState:
    """Is `current/<name>` a complete snapshot whose files have their manifest's sizes
    (and, with `version`, that version)? The sha256 was checked before COMPLETE was written;
    sizes catch a snapshot removed or truncated since."""
    link = cache.current_dir / name
    if not link.is_symlink():
        return SnapshotState(None, f"no snapshot of {name} yet ({link} does not exist)")
    snap = cache.current(name)
    if snap is None:
        return SnapshotState(None, f"{link} points at a missing or incomplete snapshot ({link.readlink()})")
    try:
        problems = cache.check_snapshot(snap)
    except (CacheError, ValueError) as exc:
        return SnapshotState(None, f"snapshot {name}/{snap.version} is unreadable: {exc}")
    if problems:
        return SnapshotState(None, f"snapshot {name}/{snap.version} is damaged: {', '.join(map(str, problems))}")
    if version is not None and snap.version != version:
        return SnapshotState(None, f"current/{name} is at {snap.version}, waiting for {version}")
    return SnapshotState(snap, f"{name} {snap.version} is complete ({snap.path})")


def provisioner_says(runtime_dir: Path, name: str) -> str:
    """The provisioner's own line about this model (state, error), '' when it has none."""
    status = read_status(runtime_dir)
    if status is None:
        return "the provisioner has written no status (is tts-provisioner running?)"
    model = (status.get("models") or {}).get(name)
    if model is None:
        return f"the provisioner (state {status.get('state')}) does not report {name}"
    line = f"provisioner: {name} {model.get('state')}"
    if model.get("wanted_version"):
        line += f", wants {model['wanted_version']}"
    if model.get("error"):
        line += f": {model['error']}"
    return line


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event):
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type != "opened":
            self.event.set()


class CacheWatch:
    """inotify watches on the directories that decide `current/<name>`; `wait()` returns
    when one of them changed (or after `RECHECK_SECONDS`)."""

    def __init__(self, cache: CacheReader, runtime_dir: Path, name: str, extra: list[Path] | None = None):
        self.cache, self.runtime_dir, self.name = cache, Path(runtime_dir), name
        self.extra = [Path(p) for p in extra or []]
        self.changed = threading.Event()
        self._handler = _Wake(self.changed)
        self._observer: Observer | None = None
        self._watches: dict[Path, object] = {}

    def __enter__(self) -> "CacheWatch":
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        self._arm()
        return self

    def __exit__(self, *exc) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _wanted(self) -> set[Path]:
        root = self.cache.root if self.cache.root.is_dir() else self.cache.root.parent
        paths = {root, self.cache.current_dir, self.cache.snapshots_dir / self.name, self.runtime_dir, *self.extra}
        snap = self.cache.current(self.name)
        if snap is not None:
            paths.add(snap.path)
        return {p for p in paths if p.is_dir()}

    def _arm(self) -> None:
        wanted = self._wanted()
        for path in set(self._watches) - wanted:
            try:
                self._observer.unschedule(self._watches.pop(path))
            except (KeyError, OSError):
                pass
        for path in wanted - set(self._watches):
            try:
                self._watches[path] = self._observer.schedule(self._handler, str(path), recursive=False)
            except OSError:  # removed between the check and the watch: the next pass re-arms
                self.changed.set()

    def wait(self, timeout: float) -> None:
        """Block until something watched changed, at most `timeout` seconds."""
        self.changed.wait(max(0.0, min(timeout, RECHECK_SECONDS)))
        self.changed.clear()
        self._arm()


# -- what a model's supervisor reports (provisioner/supervise.py writes it) ----------------

DEFAULT_STATUS_ROOT = Path("/run/tts-model")
STATUS_FILE = "status.json"


def status_path(status_root: Path, name: str) -> Path:
    """Where the supervisor of NAME writes its status (one definition for writer and readers)."""
    return Path(status_root) / name / STATUS_FILE


def read_model_status(status_root: Path, name: str) -> dict | None:
    try:
        return json.loads(status_path(status_root, name).read_text())
    except (OSError, ValueError):
        return None


def _served(status_root: Path, name: str, version: str | None) -> tuple[bool, str]:
    """(done, why): the supervisor serves `version` (any with None); raises WaitFailed when
    it gave that version up (rolled back from it, or failed)."""
    doc = read_model_status(status_root, name)
    if doc is None:
        return False, f"no supervisor status at {status_path(status_root, name)} (is tts-model@{name} running?)"
    if doc.get("state") == "rolling-back":  # the verdict comes once the rollback is done
        return False, f"supervisor: {doc.get('message')}"
    if version is not None and version == doc.get("rolled_back_from"):
        raise WaitFailed(f"{name} {version} was rolled back by its supervisor: {doc.get('message')}")
    if doc.get("state") == "failed":
        raise WaitFailed(f"the server of {name} failed: {doc.get('message')}")
    if doc.get("state") == "serving" and (version is None or doc.get("version") == version):
        return True, doc.get("message", "")
    return False, f"supervisor: {doc.get('message')}"


class WaitFailed(TtsError):
    """Waiting cannot succeed (timed out, or the version was given up)."""


def wait_for_model(config, name: str, version: str | None, timeout: float | None, serving: bool = False,
                   status_root: Path | None = None, progress=None) -> Snapshot:
    """Block until current/NAME is complete (at `version`), and with `serving` until its
    supervisor serves it. `progress(line)` hears each new reason for waiting."""
    cache = CacheReader(config.cache_dir)
    root = Path(status_root or DEFAULT_STATUS_ROOT)
    deadline = None if timeout is None else time.monotonic() + timeout
    said = None
    with CacheWatch(cache, config.runtime_dir, name, extra=[root, root / name] if serving else []) as watch:
        while True:
            state = current_state(cache, name, version)
            done, why = (state.snapshot is not None), state.why
            if serving:  # checked even before current moves: a rollback ends the wait at once
                served, served_why = _served(root, name, version or state.version)
                if done:
                    done, why = served, served_why
            if done:
                return state.snapshot
            line = f"waiting for {name}{' ' + version if version else ''}: {why}; " \
                   f"{provisioner_says(config.runtime_dir, name)}"
            if progress and line != said:
                progress(line)
                said = line
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitFailed(f"timed out after {timeout:g}s: {line}")
            watch.wait(RECHECK_SECONDS if left is None else left)
