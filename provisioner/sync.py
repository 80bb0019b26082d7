"""The sync engine: resolve -> plan -> download + verify -> snapshot -> switch -> gc.

One pass per tracked model. A model whose sync fails keeps its current snapshot
serving; the error goes to the status file and the log, and the daemon retries with
backoff. Nothing partial is ever visible under snapshots/ or current/.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import requests.exceptions
import structlog

from mirror.manifest import FileEntry, Manifest
from mirror.remote import MirrorError
from mirror.signing import load_public_key
from mirror.trust import TrustError

from tts_common.errors import TtsError

from .aria2 import Aria2Error, Aria2Process
from .cache import CacheError, CacheWriter, DamagedSnapshotError, Snapshot
from .config import ModelConfig, ProvisionerConfig
from .download import DiskSpaceError, DownloadError, Downloader
from mirror.hashing import sha256_file
from .hold import read_hold, release_hold
from .metrics import failure_cause
from .mirrors import MirrorSet
from .p2p import PeerToPeer
from .progress import ProgressReporter, human_bytes

log = structlog.get_logger(__name__)


class SyncError(TtsError):
    """A model could not be brought to its wanted version."""


@dataclass
class SyncPlan:
    manifest: Manifest
    reuse: list[FileEntry]      # already in blobs/
    fetch: list[FileEntry]      # to download (deduplicated by sha256)

    @property
    def fetch_bytes(self) -> int:
        return sum(f.size for f in self.fetch)


@dataclass
class SyncResult:
    name: str
    version: str
    changed: bool
    fetched_bytes: int = 0
    reused_files: int = 0


def plan_sync(cache: CacheWriter, manifest: Manifest) -> SyncPlan:
    reuse, fetch, seen = [], [], set()
    for entry in manifest.files:
        if cache.has_blob(entry.sha256, entry.size):
            reuse.append(entry)
        elif entry.sha256 not in seen:
            seen.add(entry.sha256)
            fetch.append(entry)
    return SyncPlan(manifest, reuse, fetch)


def _same_inode(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def make_mirror_set(config: ProvisionerConfig) -> MirrorSet:
    keys = [load_public_key(p) for p in config.public_keys]
    root = None
    if config.trust.root is not None:
        try:
            root = Path(config.trust.root).read_bytes()
        except OSError as exc:
            raise TrustError(f"cannot read the trust root {config.trust.root}: {exc.strerror}") from None
    elif not config.require_signature:
        log.warning("manifest signatures are NOT required (require_signature = false)")
    else:
        log.warning("channels are not signed ([trust] root unset): a mirror can choose the version; "
                    "see docs/operations.md, 'Signed channels'")
    return MirrorSet(config.mirrors, keys, config.require_signature, config.size_limits, trust_root=root,
                     trust_dir=trust_dir(config), deadline=config.trust.metadata_deadline)


def trust_dir(config: ProvisionerConfig) -> Path:
    """Where a node keeps the metadata python-tuf verified (rollback protection lives here)."""
    return Path(config.cache_dir) / "trust"


class Syncer:
    def __init__(self, config: ProvisionerConfig, cache: CacheWriter, mirrors: MirrorSet,
                 aria2: Aria2Process, reporter: ProgressReporter, stop: threading.Event | None = None):
        self.config = config
        self.cache = cache
        self.mirrors = mirrors
        self.aria2 = aria2
        self.reporter = reporter
        self.stop = stop or threading.Event()
        self.p2p = PeerToPeer(config.p2p, cache, mirrors, aria2) if config.p2p.enabled else None
        self.downloader = Downloader(aria2, cache, mirrors, config.aria2, p2p=self.p2p, account=reporter)

    def sync_all(self) -> dict[str, SyncResult | Exception]:
        results: dict[str, SyncResult | Exception] = {}
        self.mirrors.begin_pass()
        self.reporter.status.trust = self.mirrors.trust_status()
        for model in self.config.models:
            try:
                results[model.name] = self.sync_model(model)
            except (Aria2Error, requests.exceptions.RequestException):
                raise  # aria2c itself failed: the caller restarts it and runs the pass again
            except Exception as exc:  # every other failure: a true status and one log line
                self.record_failure(model.name, exc)
                results[model.name] = exc
            if self.stop.is_set():
                break
        return results

    def record_failure(self, name: str, exc: Exception) -> None:
        # An expected failure's message is written for the operator; anything else is a bug
        # and gets its type and traceback.
        error = str(exc) if isinstance(exc, TtsError) else f"{type(exc).__name__}: {exc}"
        cur = self.cache.current(name)
        self.reporter.finish(name, cur.version if cur else None, error=error, cause=failure_cause(exc))
        log.error("sync failed", model=name, error=error, serving=cur.version if cur else None,
                  exc_info=not isinstance(exc, (TtsError, OSError)))

    def sync_model(self, model: ModelConfig) -> SyncResult:
        version, source = self.mirrors.resolve_version(model)
        status = self.reporter.status.model(model.name)
        hold = read_hold(self.config.cache_dir, model.name)
        if hold is not None:
            if hold.channel_version in (None, version):
                # An operator rolled back: stay there until the channel moves on.
                if (cur := self.cache.current(model.name)) is None or cur.version != hold.version:
                    try:
                        self.rollback(model.name, hold.version)
                    except (CacheError, DownloadError) as exc:
                        # Cannot serve the held version: drop the hold, keep what serves now.
                        release_hold(self.config.cache_dir, model.name)
                        raise SyncError(f"rollback to {model.name}/{hold.version} refused, hold released: "
                                        f"{exc}") from None
                status.wanted_version = hold.version
                self.reporter.finish(model.name, hold.version)
                log.info("model held by rollback", model=model.name, held=hold.version, channel=version)
                return SyncResult(model.name, hold.version, changed=False)
            release_hold(self.config.cache_dir, model.name)
            log.info("rollback hold released: channel moved", model=model.name, held=hold.version, channel=version)
        current = self.cache.current(model.name)
        status.wanted_version = version
        if current and current.version == version:
            self.reporter.finish(model.name, version)
            return SyncResult(model.name, version, changed=False)

        manifest, manifest_bytes, signature, source = self.mirrors.fetch_manifest(model.name, version)
        plan = plan_sync(self.cache, manifest)
        log.info("sync planned", model=model.name, version=version, mirror=source,
                 reuse=len(plan.reuse), fetch=len(plan.fetch), fetch_bytes=plan.fetch_bytes,
                 previous=current.version if current else None)
        self.check_disk_space(plan)
        if self.p2p is not None and self.p2p.cfg.seed:
            # A blob kept from an earlier version may have come over HTTP: fetch this version's
            # torrent for it (a few KiB), so the Seeder offers it to peers like a fetched one.
            for entry in plan.reuse:
                self.p2p.torrent(entry)
        self.reporter.begin(model.name, version, manifest.total_size, len(manifest.files))
        reused_bytes = sum(f.size for f in plan.reuse)

        def progress(done: int, total: int, files_done: int) -> None:
            self.reporter.update(model.name, reused_bytes + done, manifest.total_size,
                                 len(plan.reuse) + files_done)

        self.downloader.fetch(model.name, version, plan.fetch, progress=progress, stop=self.stop)
        status.state = "verifying"
        snap = self.cache.build_snapshot(manifest, manifest_bytes, signature)
        self.cache.set_current(model.name, version)
        removed = self.cache.gc(self.config.keep_snapshots)
        self.reporter.finish(model.name, version)
        log.info("snapshot switched", model=model.name, version=version, snapshot=str(snap.path),
                 fetched_bytes=plan.fetch_bytes, reused_files=len(plan.reuse), gc=removed)
        return SyncResult(model.name, version, changed=True, fetched_bytes=plan.fetch_bytes,
                          reused_files=len(plan.reuse))

    def check_disk_space(self, plan: SyncPlan) -> None:
        # Bytes already on disk in partials count towards what is needed.
        have = 0
        for entry in plan.fetch:
            try:
                have += (self.cache.partial_dir / entry.sha256).stat().st_size
            except FileNotFoundError:
                pass
        needed = max(plan.fetch_bytes - have, 0) + self.config.disk_margin_mb * 1024 * 1024
        free = shutil.disk_usage(self.cache.root).free
        if needed > free:
            raise DiskSpaceError(
                f"not enough disk space in {self.cache.root}: need {human_bytes(needed)} "
                f"(download + {self.config.disk_margin_mb} MiB margin), {human_bytes(free)} free")

    # -- rollback --------------------------------------------------------------------
    def rollback(self, name: str, version: str) -> Snapshot:
        """Switch to a kept snapshot after a full sha256 check; a damaged one is repaired
        first (from an intact blob, else the mirror) or refused."""
        try:
            return self.cache.rollback(name, version)
        except DamagedSnapshotError as exc:
            log.warning("rollback target damaged, repairing it first", model=name, version=version,
                        problems=[str(p) for p in exc.problems])
            try:
                self.repair_snapshot(exc.snap)
            except (DownloadError, MirrorError, OSError) as repair_exc:
                raise CacheError(f"{exc}; repair failed ({repair_exc}); not switched") from None
        try:
            return self.cache.rollback(name, version)
        except DamagedSnapshotError as exc:
            raise CacheError(f"{exc} (still, after repair); not switched") from None

    # -- repair ----------------------------------------------------------------------
    def repair_snapshot(self, snap: Snapshot) -> list[str]:
        """Re-verify a snapshot; restore each bad file from an intact copy or the mirror."""
        manifest = snap.manifest()
        bad = self.cache.check_snapshot(snap, full_hash=True)
        if not bad:
            # The snapshot is fine; a deleted blob can be restored from its hardlink.
            for entry in manifest.files:
                if not self.cache.has_blob(entry.sha256, entry.size):
                    self.cache.relink_blob(entry.sha256, snap.path / entry.path)
            return []
        to_fetch = []
        for problem in bad:
            entry = manifest.file(problem.path)
            blob = self.cache.blob_path(entry.sha256)
            # A blob that is the snapshot file's own inode was just hashed as bad: no re-hash.
            if (blob.exists() and not _same_inode(blob, snap.path / entry.path)
                    and blob.stat().st_size == entry.size and sha256_file(blob) == entry.sha256):
                self.cache.replace_snapshot_file(snap, entry.path, entry.sha256)
                continue
            # The shared inode is damaged: take the blob out of service, fetch it again.
            if blob.exists():
                self.cache.quarantine(blob, entry.sha256, "damaged")
            to_fetch.append(entry)
        if to_fetch:
            self.downloader.fetch(snap.name, snap.version, to_fetch, stop=self.stop)
            for entry in to_fetch:
                self.cache.replace_snapshot_file(snap, entry.path, entry.sha256)
        log.warning("snapshot repaired", model=snap.name, version=snap.version,
                    files=[p.path for p in bad])
        return [str(p) for p in bad]
