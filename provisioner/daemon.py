"""The provisioner process: cache lock, aria2c child, sync passes, signals, systemd.

`Provisioner` is used both by the long-running daemon (`tts-provisioner run`) and by
one-shot commands (`sync`, `verify --repair`); only one process at a time may own a
cache (an flock on `<cache>/.lock`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from pathlib import Path

import requests.exceptions
import structlog

from tts_common.backoff import backoff_delay
from tts_common.errors import TtsError
from tts_common.metrics_server import MetricsServer
from tts_common.notify import notify, watchdog_interval

from .aria2 import Aria2Error, Aria2Process
from .cache import CacheWriter, Snapshot
from .config import ProvisionerConfig
from .download import DownloadError
from .metrics import registry_for
from .p2p import Seeder
from .progress import ProgressReporter
from .status import PID_FILE, ProvisionerStatus
from .sync import Syncer, make_mirror_set
from .watcher import DamageWatcher

log = structlog.get_logger(__name__)

LOCK_FILE = ".lock"


class CacheLockedError(TtsError):
    """Another provisioner process owns this cache."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        super().__init__(f"another tts-provisioner (pid {pid or '?'}) holds the cache lock {path}")


class CacheLock:
    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except ValueError:
                pid = None
            os.close(fd)
            raise CacheLockedError(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Provisioner:
    def __init__(self, config: ProvisionerConfig, console: bool = False):
        self.config = config
        self.lock = CacheLock(config.cache_dir)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.status = ProvisionerStatus()
        self.reporter = ProgressReporter(self.status, config.runtime_dir, console=console)
        self.cache: CacheWriter | None = None
        self.aria2: Aria2Process | None = None
        self.syncer: Syncer | None = None
        self.seeder: Seeder | None = None
        self._heartbeat = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        if self.lock._fd is None:  # a command may hold the lock already (rollback)
            self.lock.acquire()
        self.cache = CacheWriter(self.config.cache_dir)
        self.cache.quarantine_max_bytes = self.config.quarantine_max_bytes
        self.cache.quarantine_max_age = self.config.quarantine_max_age
        # Leftovers of a run that crashed or failed: never visible, never kept.
        if stale := self.cache.clean_staging():
            log.info("removed stale staging directories", count=stale)
        self.cache.trim_quarantine()
        self.aria2 = Aria2Process(self.config.aria2, self.cache.partial_dir, self.config.p2p)
        self.aria2.start()
        self.syncer = Syncer(self.config, self.cache, make_mirror_set(self.config), self.aria2,
                             self.reporter, self.stop_event)
        self.seeder = Seeder(self.syncer.p2p) if self.syncer.p2p else None
        self.update_seeding()
        for model in self.config.models:
            cur = self.cache.current(model.name)
            self.status.model(model.name).current_version = cur.version if cur else None

    def close(self) -> None:
        if self.aria2:
            self.aria2.stop()
        self.lock.release()

    def __enter__(self) -> "Provisioner":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_current(self) -> bool:
        return all(self.cache.current(m.name) is not None for m in self.config.models)

    def _ensure_aria2(self) -> None:
        if not self.aria2.alive():
            log.warning("aria2c is not running; restarting it")
            self.aria2.start()
            self.update_seeding()

    def update_seeding(self, reconcile: bool = True) -> None:
        """Seed what the kept snapshots reference (after start, each pass, each restart
        of aria2c) and put the p2p totals into the status; between passes only the
        totals are refreshed (reconcile=False), every few seconds."""
        if self.seeder is None:
            return
        try:
            seeding = self.seeder.reconcile() if reconcile else self.seeder.counts()
        except (requests.exceptions.RequestException, Aria2Error, OSError) as exc:
            log.warning("cannot update seeding", error=str(exc))
            return
        p2p = self.syncer.p2p
        doc = {"from_peers": p2p.peer_bytes, "from_mirror": p2p.mirror_bytes,
               "uploaded": p2p.uploaded_by_downloads + seeding["uploaded"], "seeding": seeding["seeding"]}
        if doc != self.status.p2p:
            self.status.p2p = doc
            if not reconcile:
                self.reporter.publish(self.status.message)

    # -- one pass --------------------------------------------------------------------
    def sync_once(self) -> dict:
        self._ensure_aria2()
        self.status.state = "syncing"
        self.reporter.publish("checking mirrors")
        results = {}
        for attempt in (1, 2):
            try:
                results = self.syncer.sync_all()
                break
            except (requests.exceptions.RequestException, Aria2Error) as exc:
                # aria2c died or wedged mid-pass: restart it and go again (partials resume).
                log.error("aria2c failed during sync", error=str(exc), attempt=attempt)
                results = {m.name: exc for m in self.config.models}
                if attempt == 1 and not self.stop_event.is_set():
                    self.aria2.stop()
                    self.aria2.start()
        failed = {k: v for k, v in results.items() if isinstance(v, Exception)}
        for name, exc in failed.items():
            if isinstance(exc, (requests.exceptions.RequestException, Aria2Error)):
                self.syncer.record_failure(name, exc)  # sync_all did not get to say so
        self.status.syncs_completed += 1
        self.update_seeding()
        self.status.ready = self.all_current()
        self.status.state = "idle" if not failed else ("degraded" if self.status.ready else "error")
        self.reporter.publish(self._summary(failed))
        return results

    def _summary(self, failed: dict) -> str:
        parts = []
        for model in self.config.models:
            m = self.status.model(model.name)
            if model.name in failed:
                parts.append(f"{model.name}: sync failed, serving {m.current_version or 'nothing'}")
            else:
                parts.append(f"{model.name} {m.current_version}")
        state = "ready" if self.status.ready else "not ready"
        return f"{state}: " + ", ".join(parts)

    # -- damage detection and repair ------------------------------------------------
    def check_damage(self, paths: set[Path]) -> list[Snapshot]:
        """Which current snapshots do these changed paths damage? Marks them in status."""
        damaged = []
        blob_names = {p.name for p in paths if p.parent == self.cache.blobs_dir}
        snap_dirs = {p for p in paths if self.cache.snapshots_dir in p.parents}
        for model in self.config.models:
            snap = self.cache.current(model.name)
            if snap is None:
                continue
            try:
                shas = {f.sha256 for f in snap.manifest().files}
            except Exception:  # unreadable manifest is damage too
                shas = set()
            touched = bool(shas & blob_names) or any(snap.path in p.parents or p == snap.path for p in snap_dirs)
            if not touched and shas:
                continue
            problems = self.cache.check_snapshot(snap, full_hash=True)
            missing_blobs = [s for s in shas & blob_names if not self.cache.blob_path(s).exists()]
            if problems or missing_blobs:
                m = self.status.model(model.name)
                m.state = "damaged"
                m.damaged = [str(p) for p in problems] + [f"blob {s[:12]}: missing" for s in missing_blobs]
                log.error("current snapshot damaged", model=model.name, version=snap.version, problems=m.damaged)
                self.reporter.publish(f"{model.name} {snap.version}: DAMAGED ({len(m.damaged)} problems), repairing")
                damaged.append(snap)
        return damaged

    def repair(self, snaps: list[Snapshot]) -> None:
        self._ensure_aria2()
        for snap in snaps:
            m = self.status.model(snap.name)
            try:
                self.syncer.repair_snapshot(snap)
                m.state, m.damaged, m.error = "ok", [], None
            except (DownloadError, OSError) as exc:
                m.state, m.error = "damaged", f"repair failed: {exc}"
                log.error("repair failed", model=snap.name, version=snap.version, error=str(exc))
        self.reporter.publish(self._summary({}))

    # -- daemon ----------------------------------------------------------------------
    def run_forever(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.wake.set())
        pid_file = Path(self.config.runtime_dir) / PID_FILE
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        watcher = DamageWatcher(self.cache, self.wake)
        watcher.start()
        metrics = self._serve_metrics()
        keepalive = threading.Thread(target=self._keepalive, name="sd-watchdog", daemon=True)
        keepalive.start()
        ready_sent = False
        failures = 0
        try:
            while not self.stop_event.is_set():
                self._heartbeat = time.monotonic()
                results = self.sync_once()
                if self.status.ready and not ready_sent:
                    notify(READY=1, STATUS=self.status.message)
                    ready_sent = True
                    log.info("ready: every tracked model has a complete current snapshot")
                failed = any(isinstance(r, Exception) for r in results.values())
                failures = failures + 1 if failed else 0
                delay = self.config.poll_interval
                if failed:
                    delay = min(delay, backoff_delay(failures, base=2.0, cap=300.0))
                    log.info("retrying sync with backoff", seconds=round(delay, 1), failures=failures)
                deadline = time.monotonic() + delay
                while not self.stop_event.is_set():
                    self._heartbeat = time.monotonic()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not self.wake.is_set():
                        self.update_seeding(reconcile=False)
                    if self.wake.wait(timeout=min(remaining, 5.0)):
                        self.wake.clear()
                        changed = watcher.take()
                        if changed:
                            damaged = self.check_damage(changed)
                            if damaged:
                                self.repair(damaged)
                            continue  # damage checks do not trigger a sync pass
                        if not self.stop_event.is_set():
                            log.info("sync requested (SIGHUP)")
                        break
        finally:
            notify(STOPPING=1, STATUS="stopping")
            watcher.stop()
            if metrics:
                metrics.stop()
            self.status.state = "stopped"
            self.reporter.publish("stopped")
            pid_file.unlink(missing_ok=True)
        log.info("provisioner stopped")
        return 0

    def _serve_metrics(self) -> MetricsServer | None:
        """GET /metrics on `metrics_socket` (the daemon only: one-shot commands have none)."""
        if not self.config.metrics_socket:
            return None
        return MetricsServer(Path(self.config.metrics_socket), registry_for(self.status, self.config)).serve()

    def _request_stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def _keepalive(self) -> None:
        """WATCHDOG=1 while the main loop is alive; EXTEND_TIMEOUT_USEC before READY."""
        interval = watchdog_interval()
        tick = min(interval or 10.0, 10.0)
        while not self.stop_event.wait(tick):
            last = max(self._heartbeat, self.reporter.last_tick)
            healthy = time.monotonic() - last < 120 and self.aria2 is not None and self.aria2.alive()
            if interval and healthy:
                notify(WATCHDOG=1)
            if not self.status.ready and self.status.state == "syncing":
                # First download may take longer than TimeoutStartSec: ask for more time.
                notify(EXTEND_TIMEOUT_USEC=int(max(tick * 3, 30) * 1_000_000))
