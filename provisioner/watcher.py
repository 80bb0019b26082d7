"""Watch the cache with watchdog: a blob or snapshot file that is deleted or modified
behind the provisioner's back is noticed at once.

The watcher only detects and reports (status says "damaged" immediately); repair runs
in the daemon's main loop, which owns the cache and aria2.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .cache import CacheReader

log = structlog.get_logger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, on_change: Callable[[Path], None]):
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Deletions, in-place writes and renames away all damage a file; creations by
        # the provisioner itself (rename into blobs/) do not.
        if event.is_directory or event.event_type not in {"deleted", "modified", "moved", "closed"}:
            return
        self.on_change(Path(event.src_path))


class DamageWatcher:
    """Collects paths of changed files; `take()` hands them to the main loop, which
    checks them against the current snapshots (the provisioner's own gc and repairs
    also cause events; the check finds nothing wrong for those)."""

    def __init__(self, cache: CacheReader, wake: threading.Event):
        self.cache = cache
        self.wake = wake
        self._lock = threading.Lock()
        self._paths: set[Path] = set()
        self._observer: Observer | None = None

    def start(self) -> None:
        self._observer = Observer()
        handler = _Handler(self._changed)
        for d in (self.cache.blobs_dir, self.cache.snapshots_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._observer.schedule(handler, str(d), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _changed(self, path: Path) -> None:
        with self._lock:
            self._paths.add(path)
        self.wake.set()

    def take(self) -> set[Path]:
        with self._lock:
            paths, self._paths = self._paths, set()
        return paths
