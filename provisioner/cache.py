"""The model cache on each server: the one definition of its layout.

    <cache>/blobs/sha256/<hex>                  verified content, read-only, shared across versions
    <cache>/snapshots/<name>/<version>/         hardlinks to blobs + manifest.json (+ .sig) + COMPLETE
    <cache>/current/<name> -> ../snapshots/<name>/<version>    swapped atomically
    <cache>/partial/                            aria2 downloads, their .aria2 control files, staging
    <cache>/quarantine/<sha256>                 bytes that failed verification (one copy per file, bounded)
    <cache>/quarantine/known-bad.json           mirror objects known to serve those bytes
    <cache>/torrents/<hex>.torrent              a blob's torrent, checked against its manifest (p2p only)

Invariants: a file enters `blobs/` only after its sha256 matched; a snapshot directory
appears under `snapshots/` only complete (built in `partial/` and renamed in), with
`COMPLETE` written after everything else was fsynced; `current/<name>` only ever
points at a complete snapshot.

`CacheReader` is the read-only API other components (the runtime, tts-ctl) use;
`CacheWriter` adds the operations only the provisioner performs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mirror.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, ManifestError, validate_name

from mirror.hashing import sha256_file

from tts_common.atomic import fsync_dir, write_atomic
from tts_common.errors import TtsError

COMPLETE_MARKER = "COMPLETE"
KNOWN_BAD_FILE = "known-bad.json"
STAGING_PREFIX = "staging-"
ARIA2_PID_RECORD = ".aria2c.pid"  # partial/: which aria2c writes here (provisioner/aria2.py)


class CacheError(TtsError):
    """The cache is not in the state an operation needs."""


class DamagedSnapshotError(CacheError):
    """A kept snapshot's files do not match its manifest."""

    def __init__(self, snap: "Snapshot", problems: list["FileProblem"]):
        self.snap, self.problems = snap, problems
        super().__init__(f"snapshot {snap.name}/{snap.version} is damaged: {', '.join(map(str, problems))}")


@dataclass(frozen=True)
class Snapshot:
    name: str
    version: str
    path: Path
    complete: bool

    def manifest(self) -> Manifest:
        try:
            # Accepted (within the configured size limits) when it was fetched.
            return Manifest.parse((self.path / MANIFEST_NAME).read_bytes(), limits=None)
        except OSError as exc:
            raise CacheError(f"snapshot {self.name}/{self.version} has no readable manifest: {exc.strerror}") from None

    def completed_at(self) -> str | None:
        try:
            return json.loads((self.path / COMPLETE_MARKER).read_text()).get("completed_at")
        except (OSError, ValueError, AttributeError):
            return None


@dataclass(frozen=True)
class FileProblem:
    path: str
    problem: str  # "missing", "size", "sha256"

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheReader:
    """Read-only view of a cache directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.snapshots_dir = self.root / "snapshots"
        self.current_dir = self.root / "current"
        self.partial_dir = self.root / "partial"
        self.quarantine_dir = self.root / "quarantine"
        self.torrents_dir = self.root / "torrents"
        self.holds_dir = self.root / "holds"  # rollback holds (provisioner/hold.py)

    def known_bad(self) -> dict[str, dict]:
        """`<mirror> <object key>` -> what was wrong with the object and its identity
        (etag, size, last_modified) when it was; an unchanged object is not fetched again
        until its `retry_after` (epoch seconds)."""
        try:
            doc = json.loads((self.quarantine_dir / KNOWN_BAD_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def torrent_path(self, sha256: str) -> Path:
        return self.torrents_dir / f"{sha256}.torrent"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256

    def has_blob(self, sha256: str, size: int) -> bool:
        try:
            return self.blob_path(sha256).stat().st_size == size
        except FileNotFoundError:
            return False

    def snapshot(self, name: str, version: str) -> Snapshot | None:
        path = self.snapshots_dir / validate_name(name, "model name") / validate_name(version, "version")
        if not path.is_dir():
            return None
        return Snapshot(name, version, path, (path / COMPLETE_MARKER).is_file())

    def snapshots(self, name: str) -> list[Snapshot]:
        """Complete snapshots of a model, oldest first (by completion time)."""
        base = self.snapshots_dir / validate_name(name, "model name")
        if not base.is_dir():
            return []
        found = []
        for entry in base.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and (entry / COMPLETE_MARKER).is_file():
                found.append(Snapshot(name, entry.name, entry, True))
        return sorted(found, key=lambda s: (s.path / COMPLETE_MARKER).stat().st_mtime_ns)

    def models(self) -> list[str]:
        names: set[str] = set()
        for base in (self.snapshots_dir, self.current_dir):
            if base.is_dir():
                names.update(p.name for p in base.iterdir() if not p.name.startswith("."))
        return sorted(names)

    def current(self, name: str) -> Snapshot | None:
        """The snapshot `current/<name>` points at, if it is complete."""
        link = self.current_dir / validate_name(name, "model name")
        try:
            target = os.readlink(link)
        except OSError:
            return None
        version = Path(target).name
        snap = self.snapshot(name, version)
        if snap is None or not snap.complete:
            return None
        return snap

    def check_snapshot(self, snap: Snapshot, full_hash: bool = False) -> list[FileProblem]:
        """Compare a snapshot's files with its manifest: sizes always, sha256 if asked."""
        problems = []
        for entry in snap.manifest().files:
            path = snap.path / entry.path
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                problems.append(FileProblem(entry.path, "missing"))
                continue
            if size != entry.size:
                problems.append(FileProblem(entry.path, "size"))
            elif full_hash and sha256_file(path) != entry.sha256:
                problems.append(FileProblem(entry.path, "sha256"))
        return problems


class CacheWriter(CacheReader):
    """Mutating operations; only the provisioner (holding the cache lock) calls these."""

    def __init__(self, root: Path):
        super().__init__(root)
        # holds/ exists from the start: a model server's unit may write a rollback hold there and
        # can only be given write access to a directory that exists (tts-model@.service).
        for d in (self.blobs_dir, self.snapshots_dir, self.current_dir, self.partial_dir, self.quarantine_dir,
                  self.torrents_dir, self.holds_dir):
            d.mkdir(parents=True, exist_ok=True)

    def save_torrent(self, sha256: str, data: bytes) -> Path:
        """Keep a checked torrent beside its blob, so seeding needs no mirror after a restart."""
        dest = self.torrent_path(sha256)
        write_atomic(dest, data)
        return dest

    # -- blobs ---------------------------------------------------------------------
    def add_blob(self, src: Path, sha256: str) -> Path:
        """Move an already-verified file into blobs/ (same filesystem), read-only."""
        dest = self.blob_path(sha256)
        os.chmod(src, 0o444)
        _fsync_file(src)
        os.replace(src, dest)
        fsync_dir(self.blobs_dir)
        return dest

    def relink_blob(self, sha256: str, source: Path) -> None:
        """Restore a missing blob from an intact hardlink (e.g. a snapshot's copy)."""
        tmp = self.partial_dir / f".relink-{sha256}"
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, self.blob_path(sha256))

    # -- quarantine ------------------------------------------------------------------
    # Bytes that failed verification are kept for inspection, bounded: one copy per
    # file (named by the sha256 it should have had; a later copy replaces it), at most
    # `max_bytes` in all (oldest dropped first; a copy larger than that is not kept),
    # none older than `max_age`. A copy goes as soon as its file verifies.
    quarantine_max_bytes: int = 1024**3
    quarantine_max_age: float = 7 * 24 * 3600.0

    def quarantine(self, src: Path, sha256: str, kind: str = "") -> Path | None:
        """Move bad bytes for the file `sha256` aside; returns where, None if not kept.
        kind "damaged": a local blob that changed on disk (kept as evidence even after the
        file is fetched again); "": bytes a mirror served (dropped once the file verifies)."""
        dest = self.quarantine_dir / (f"{sha256}.{kind}" if kind else sha256)
        if src.stat().st_size > self.quarantine_max_bytes:
            src.unlink()
            return None
        os.replace(src, dest)
        os.utime(dest)  # age counts from quarantining, not from the download's mtime
        self.trim_quarantine(keep=dest)
        return dest

    def _quarantined(self) -> list[Path]:
        return [p for p in self.quarantine_dir.iterdir() if p.name != KNOWN_BAD_FILE and not p.name.startswith(".")]

    def trim_quarantine(self, keep: Path | None = None) -> int:
        """Drop copies older than max_age, then the oldest until under max_bytes."""
        removed = 0
        now = time.time()
        entries = []
        for path in self._quarantined():
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if path != keep and now - st.st_mtime > self.quarantine_max_age:
                _remove(path)
                removed += 1
            else:
                entries.append((st.st_mtime, path, st.st_size if not path.is_dir() else _tree_size(path)))
        total = sum(size for _, _, size in entries)
        for _, path, size in sorted(entries, key=lambda e: (e[1] == keep, e[0])):
            if total <= self.quarantine_max_bytes:
                break
            _remove(path)
            total -= size
            removed += 1
        self.update_known_bad(lambda state: {k: v for k, v in state.items()
                                             if now - v.get("at", 0) <= self.quarantine_max_age})
        return removed

    @contextmanager
    def _known_bad_lock(self):
        # Read-modify-write under an flock of quarantine/ itself (no lock file to create or
        # list): the daemon records and drops records while `known-bad clear` may run.
        fd = os.open(self.quarantine_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update_known_bad(self, change: Callable[[dict[str, dict]], dict[str, dict]]) -> dict[str, dict]:
        """Apply `change` to the records (it returns the new ones); returns the old ones."""
        with self._known_bad_lock():
            state = self.known_bad()
            new = change(dict(state))
            if new != state:
                path = self.quarantine_dir / KNOWN_BAD_FILE
                if new:
                    write_atomic(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
                else:
                    path.unlink(missing_ok=True)
        return state

    def mark_known_bad(self, mirror: str, key: str, record: dict) -> None:
        self.update_known_bad(lambda state: {**state, f"{mirror} {key}": dict(record, at=time.time())})

    def forget_known_bad(self, mirror: str, key: str) -> None:
        self.update_known_bad(lambda state: {k: v for k, v in state.items() if k != f"{mirror} {key}"})

    def clear_known_bad(self, model: str | None = None, path: str | None = None) -> dict[str, dict]:
        """Drop the records of `model` (and its file `path`), or all; returns those dropped."""
        def matches(record: dict) -> bool:
            return (model is None or record.get("model") == model) and (path is None or record.get("file") == path)

        old = self.update_known_bad(lambda state: {k: v for k, v in state.items() if not matches(v)})
        return {k: v for k, v in old.items() if matches(v)}

    def file_verified(self, sha256: str) -> None:
        """The file now verified: its quarantined copy and known-bad records go."""
        (self.quarantine_dir / sha256).unlink(missing_ok=True)
        self.update_known_bad(lambda state: {k: v for k, v in state.items() if v.get("expected_sha256") != sha256})

    # -- snapshots -----------------------------------------------------------------
    def build_snapshot(self, manifest: Manifest, manifest_bytes: bytes, signature: bytes | None) -> Snapshot:
        """Assemble a snapshot from blobs in staging, then rename it into snapshots/."""
        final = self.snapshots_dir / manifest.name / manifest.version
        existing = self.snapshot(manifest.name, manifest.version)
        if existing and existing.complete:
            return existing
        staging = self.partial_dir / f"{STAGING_PREFIX}{manifest.name}-{manifest.version}-{os.getpid()}"
        try:
            return self._assemble(manifest, manifest_bytes, signature, staging, final)
        except OSError as exc:
            # Disk full (or any I/O error) mid-assembly: nothing half-built stays behind.
            shutil.rmtree(staging, ignore_errors=True)
            what = "disk full" if exc.errno == errno.ENOSPC else "I/O error"
            raise CacheError(f"cannot assemble snapshot {manifest.name}/{manifest.version} in {self.partial_dir}: "
                             f"{what} ({exc.strerror}); the staging directory was removed, the current snapshot "
                             "is untouched") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def clean_staging(self) -> int:
        """Remove staging directories a crashed or failed run left in partial/."""
        removed = 0
        if self.partial_dir.is_dir():
            for entry in self.partial_dir.iterdir():
                if entry.name.startswith(STAGING_PREFIX) or entry.name.startswith(".relink-"):
                    _remove(entry)
                    removed += 1
        return removed

    def _assemble(self, manifest: Manifest, manifest_bytes: bytes, signature: bytes | None, staging: Path,
                  final: Path) -> Snapshot:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        dirs = {staging}
        for entry in manifest.files:
            blob = self.blob_path(entry.sha256)
            if not self.has_blob(entry.sha256, entry.size):
                raise CacheError(f"blob for {entry.path} ({entry.sha256[:12]}) is missing; cannot build snapshot")
            dest = staging / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(dest.parent)
            os.link(blob, dest)
        (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
        _fsync_file(staging / MANIFEST_NAME)
        if signature is not None:
            (staging / SIGNATURE_NAME).write_bytes(signature)
            _fsync_file(staging / SIGNATURE_NAME)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        marker = staging / COMPLETE_MARKER
        marker.write_text(json.dumps({"completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        _fsync_file(marker)
        fsync_dir(staging)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an incomplete leftover from an older layout or a crash: replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(final.parent)
        return Snapshot(manifest.name, manifest.version, final, True)

    def set_current(self, name: str, version: str) -> None:
        """Point current/<name> at a complete snapshot: symlink + rename, atomic."""
        snap = self.snapshot(name, version)
        if snap is None or not snap.complete:
            raise CacheError(f"no complete snapshot {name}/{version} to switch to")
        link = self.current_dir / name
        tmp = self.current_dir / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(snap.path, self.current_dir), tmp)
        os.replace(tmp, link)
        fsync_dir(self.current_dir)

    def replace_snapshot_file(self, snap: Snapshot, rel_path: str, sha256: str) -> None:
        """Re-link one file of a snapshot to a (repaired) blob, atomically."""
        dest = snap.path / rel_path
        tmp = dest.with_name(f".{dest.name}.repair")
        tmp.unlink(missing_ok=True)
        os.link(self.blob_path(sha256), tmp)
        os.replace(tmp, dest)

    def rollback(self, name: str, version: str) -> Snapshot:
        snap = self.snapshot(name, version)
        if snap is None or not snap.complete:
            kept = ", ".join(s.version for s in self.snapshots(name)) or "none"
            raise CacheError(f"no complete snapshot {name}/{version} is kept (kept: {kept})")
        # Full sha256: a same-size edit must not be switched to (see Syncer.rollback for repair).
        problems = self.check_snapshot(snap, full_hash=True)
        if problems:
            raise DamagedSnapshotError(snap, problems)
        self.set_current(name, version)
        return snap

    # -- garbage collection ----------------------------------------------------------
    def gc(self, keep: int, protect: dict[str, set[str]] | None = None) -> dict[str, int]:
        """Drop snapshots beyond the newest `keep` (never current or protected ones),
        then blobs no snapshot references, then stale partials."""
        removed_snapshots = removed_blobs = freed = 0
        protect = protect or {}
        for name in self.models():
            cur = self.current(name)
            snaps = self.snapshots(name)
            keep_set = {s.version for s in snaps[-keep:]} if keep > 0 else set()
            keep_set |= protect.get(name, set())
            if cur:
                keep_set.add(cur.version)
            for snap in snaps:
                if snap.version not in keep_set:
                    shutil.rmtree(snap.path)
                    removed_snapshots += 1
        referenced: set[str] = set()
        for name in self.models():
            for snap in self.snapshots(name):
                try:
                    referenced.update(f.sha256 for f in snap.manifest().files)
                except (CacheError, ManifestError):
                    continue
        if self.blobs_dir.is_dir():
            for blob in self.blobs_dir.iterdir():
                if blob.name not in referenced:
                    freed += blob.stat().st_size
                    blob.unlink()
                    removed_blobs += 1
        if self.torrents_dir.is_dir():
            for torrent in self.torrents_dir.glob("*.torrent"):
                if torrent.name.removesuffix(".torrent") not in referenced:
                    torrent.unlink(missing_ok=True)
        return {"snapshots": removed_snapshots, "blobs": removed_blobs, "bytes": freed}

    def clean_partials(self) -> int:
        """Remove every partial download and staging leftover (only while no sync runs)."""
        removed = 0
        if not self.partial_dir.is_dir():
            return 0
        for entry in self.partial_dir.iterdir():
            if entry.name == ARIA2_PID_RECORD:  # kept: the next start must still find that aria2c
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed
