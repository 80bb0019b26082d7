"""Download a set of files with aria2 and verify each one as soon as it lands.

Each file is one aria2 task with a presigned URL from every mirror (aria2 fails over
between them) and is written to `partial/<sha256>` with its `.aria2` control file, so
a restart after any crash resumes where it stopped. A finished file is hashed in a
worker thread while the others keep downloading - hashing is the cost we hide - and
only a matching file is moved into `blobs/`.

Failures are handled per file: an HTTP error such as 403 (expired presigned URL)
re-presigns and resumes; network errors back off with jitter; a checksum mismatch
quarantines the bytes and retries without the mirrors that served them; a full disk
(aria2 code 9) aborts the whole attempt and removes its partials.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import structlog

from mirror.manifest import FileEntry

from .aria2 import Aria2Process
from .transfer import ERR_CANNOT_RESUME, ERR_DISK_FULL, ERR_HTTP_STATUS, ERR_NOT_FOUND
from .cache import CacheWriter
from .config import Aria2Config
from mirror.hashing import PrefixHasher, complete_prefix_bytes, sha256_file
from .mirrors import MirrorSet
from .p2p import PeerFetch, PeerToPeer

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.1
# Hash a downloading file's completed prefix once this much new data is contiguous.
PREFIX_STEP = 16 * 1024 * 1024
MAX_REPRESIGNS = 6
# A torrent task with its web seed that still makes no progress for this many
# stall_seconds falls back to plain HTTP.
HTTP_FALLBACK_STALLS = 12


class DownloadError(Exception):
    """A file could not be fetched and verified from any mirror."""


class DiskFullError(DownloadError):
    """The cache filesystem ran out of space during a download."""


class Interrupted(DownloadError):
    """The download was stopped on request (shutdown); partials are kept for resume."""


@dataclass
class _Job:
    entry: FileEntry
    failures: int = 0
    presigns: int = 0
    excluded: set[str] = field(default_factory=set)
    gid: str | None = None
    retry_at: float = 0.0
    uri_mirror: dict[str, str] = field(default_factory=dict)
    completed: int = 0
    one_mirror: bool = False  # after a mismatch from mixed mirrors: try them one at a time
    hasher: PrefixHasher | None = None
    prefix_task: Future | None = None
    peers: PeerFetch | None = None  # fetched with BitTorrent (p2p.py)
    torrent: bytes | None = None
    http_only: bool = False  # after a mismatch of bytes that peers may have sent
    cause: str | None = None  # why the last mirror was given up on: the error the operator sees
    identity: dict[str, dict | None] = field(default_factory=dict)  # mirror -> object's etag/size/mtime


def mismatch_text(mirror: str, entry: FileEntry, got_sha256: str, got_size: int) -> str:
    return (f"checksum mismatch on mirror {mirror} for file {entry.path} (expected sha256 {entry.sha256}, "
            f"{entry.size} bytes; got sha256 {got_sha256}, {got_size} bytes)")


ProgressFn = Callable[[int, int, int], None]  # (bytes done, bytes total, files done)


def _http_control_file(control) -> bool:
    """Is this an HTTP download's .aria2 control file? (Its header's info-hash length,
    bytes 6-9 big-endian, is 0; a torrent's holds 20.)"""
    try:
        with open(control, "rb") as f:
            header = f.read(10)
    except FileNotFoundError:
        return False
    return len(header) == 10 and int.from_bytes(header[6:10], "big") == 0


class Downloader:
    def __init__(self, aria2: Aria2Process, cache: CacheWriter, mirrors: MirrorSet, cfg: Aria2Config,
                 hash_workers: int = 2, p2p: PeerToPeer | None = None):
        self.aria2 = aria2
        self.cache = cache
        self.mirrors = mirrors
        self.cfg = cfg
        self.hash_workers = hash_workers
        self.p2p = p2p

    def fetch(self, name: str, version: str, entries: list[FileEntry], progress: ProgressFn | None = None,
              stop: threading.Event | None = None) -> None:
        """Fetch and verify `entries` into blobs/. Raises DownloadError subclasses."""
        stop = stop or threading.Event()
        total = sum(e.size for e in entries)
        pending = [_Job(e) for e in entries]
        active: dict[str, _Job] = {}
        hashing: dict[Future, _Job] = {}
        done_bytes = 0
        files_done = 0
        partial = self.cache.partial_dir

        def start(job: _Job) -> None:
            sha = job.entry.sha256
            data, control = partial / sha, partial / f"{sha}.aria2"
            if data.exists() and not control.exists():
                # Completed by aria2 before a crash, or junk: hashing decides.
                if data.stat().st_size == job.entry.size:
                    job.hasher = None
                    hashing[pool.submit(finish_hash, job)] = job
                    return
                data.unlink()
            urls = self.mirrors.presigned_urls(name, version, job.entry.path, self.cfg.presign_expiry,
                                               exclude=job.excluded)
            urls = skip_known_bad(job, urls)
            if job.one_mirror:
                urls = urls[:1]
            if not urls:
                if job.cause:
                    raise DownloadError(f"{name}/{version}: {job.cause}; no other mirror to try")
                raise DownloadError(f"{name}/{version}: {job.entry.path}: no mirror left to try "
                                    f"(excluded: {sorted(job.excluded)})")
            job.uri_mirror = {url: mirror for mirror, url in urls}
            job.hasher = PrefixHasher(data)
            if self.p2p and not job.http_only and _http_control_file(control):
                job.http_only = True  # an HTTP download resumes as one: its bytes are kept
            torrent = self.p2p.torrent(job.entry) if self.p2p and not job.http_only else None
            job.torrent = torrent
            if torrent is not None:
                # BitTorrent writes partial/<sha256> too (the torrent's name): resume,
                # the prefix hasher and verification work as for HTTP.
                # A resumed partial's bytes were fetched before: not counted again (an
                # upper bound: aria2 allocates sparse files, so this is the size it reached).
                resumed = data.stat().st_size if data.exists() and control.exists() else 0
                job.peers = PeerFetch(self.p2p.web_seed_first(job.entry), time.monotonic(), resumed)
                seeds = [url for _, url in urls] if job.peers.web_seeded else []
                self.p2p.stop_seeding(job.entry.btih)  # a repair: the damaged blob's seed must go
                job.gid = self.aria2.add_torrent(torrent, seeds, partial, self.p2p.task_options())
                log.info("fetching from peers", file=job.entry.path, web_seed=job.peers.web_seeded)
            else:
                job.peers = None
                job.gid = self.aria2.add([url for _, url in urls], out=sha, resume=control.exists())
            active[job.gid] = job

        def watch_peers(job: _Job, st, now: float) -> None:
            """Give a download the mirror when peers stall; HTTP when nothing helps."""
            peers = job.peers
            if st.completed > peers.last_completed:
                peers.last_completed, peers.last_progress = st.completed, now
                return
            stalled = now - peers.last_progress
            if stalled < (self.p2p.cfg.stall_seconds if peers.web_seeded else self.p2p.stall_window(job.entry)):
                return
            if peers.web_seeded and stalled > HTTP_FALLBACK_STALLS * self.p2p.cfg.stall_seconds:
                # Neither peers nor the web seed bring anything: plain HTTP, which
                # reports mirror errors the way the rest of this loop handles them.
                log.warning("no progress from peers or web seed: fetching over HTTP only",
                            file=job.entry.path, stalled_s=round(stalled, 1))
                self.aria2.forget(job.gid)
                del active[job.gid]
                for suffix in ("", ".aria2"):  # a torrent's control file does not resume over HTTP
                    (partial / f"{job.entry.sha256}{suffix}").unlink(missing_ok=True)
                job.http_only, job.peers, job.torrent = True, None, None
                retry(job, 0.0)
                return
            # Peers brought nothing for this node's stall window: add the mirror as a web seed (or,
            # on a long download, refresh its presigned URLs before they expire).
            if peers.web_seeded and now - peers.web_seeded_at < self.cfg.presign_expiry / 2:
                return
            urls = self.mirrors.presigned_urls(name, version, job.entry.path, self.cfg.presign_expiry,
                                               exclude=job.excluded)
            if urls:
                self.aria2.set_web_seeds(job.gid, [url for _, url in urls])
                job.uri_mirror = {url: mirror for mirror, url in urls}
            if not peers.web_seeded:
                log.info("no progress from peers: adding the mirror", file=job.entry.path,
                         stalled_s=round(stalled, 1))
                peers.last_progress = now  # the mirror gets its own stall window
                peers.completed_at_web_seed = st.completed
            peers.web_seeded, peers.web_seeded_at = True, now


        def skip_known_bad(job: _Job, urls: list[tuple[str, str]]) -> list[tuple[str, str]]:
            """Drop mirrors that lack the object, or whose object already failed verification
            and has not changed since (same etag, size, mtime): known bad, not fetched again."""
            job.identity = self.mirrors.identities(name, version, job.entry.path, [m for m, _ in urls])
            known = self.cache.known_bad()
            key = self.mirrors.object_key(name, version, job.entry.path)
            kept = []
            for mirror, url in urls:
                if (job.identity.get(mirror) or {}).get("missing"):
                    job.excluded.add(mirror)
                    job.cause = f"{job.entry.path} is missing on mirror {mirror}"
                    log.error("file missing on mirror", model=name, version=version, file=job.entry.path,
                              mirrors=[mirror])
                    continue
                record = known.get(f"{mirror} {key}")
                if record and record.get("expected_sha256") == job.entry.sha256:
                    ident = job.identity.get(mirror)
                    if ident is not None and ident == record.get("object"):
                        job.excluded.add(mirror)
                        job.cause = (f"{record['error']}, first seen {record.get('seen', '?')}; the object is "
                                     f"unchanged (ETag {ident.get('etag')}), so it is not fetched again")
                        log.warning("mirror object known bad, not fetched again", model=name, version=version,
                                    file=job.entry.path, mirror=mirror, etag=ident.get("etag"))
                        continue
                    # The object changed on the mirror (or cannot be identified): try it again.
                    self.cache.forget_known_bad(mirror, key)
                kept.append((mirror, url))
            return kept

        def finish_hash(job: _Job) -> str:
            """Digest of the downloaded file: the prefix hasher's, re-checked from scratch
            if it disagrees (a piece may have been reported before it reached the file)."""
            path = partial / job.entry.sha256
            size = path.stat().st_size
            digest = job.hasher.finish(size) if job.hasher else sha256_file(path)
            if digest != job.entry.sha256 and job.hasher is not None:
                digest = sha256_file(path)
            return digest

        def retry(job: _Job, delay: float) -> None:
            job.retry_at = time.monotonic() + delay
            pending.append(job)

        def backoff(failures: int) -> float:
            return min(30.0, 0.5 * 2 ** failures) * random.uniform(0.5, 1.5)

        def cleanup_attempt(remove_partials: bool) -> None:
            for gid in list(active):
                self.aria2.forget(gid)
            active.clear()
            if remove_partials:
                for job in [*pending, *hashing.values()]:
                    for suffix in ("", ".aria2"):
                        (partial / f"{job.entry.sha256}{suffix}").unlink(missing_ok=True)

        pool = ThreadPoolExecutor(max_workers=self.hash_workers, thread_name_prefix="sha256")
        try:
            while pending or active or hashing:
                if stop.is_set():
                    cleanup_attempt(remove_partials=False)
                    raise Interrupted("download interrupted; partial files kept for resume")
                now = time.monotonic()
                # Hand aria2 only what it runs at once: URLs are presigned just before
                # use, so a long queue cannot outlive their expiry.
                for job in [j for j in pending if j.retry_at <= now]:
                    if len(active) >= self.cfg.max_concurrent_downloads:
                        break
                    pending.remove(job)
                    start(job)

                for gid, job in list(active.items()):
                    st = self.aria2.status(gid)
                    job.completed = st.completed
                    if job.peers is not None and st.status == "active":
                        watch_peers(job, st, now)
                        if gid not in active:
                            continue
                    if st.status == "active" and job.hasher and (job.prefix_task is None or job.prefix_task.done()):
                        ready = complete_prefix_bytes(st.bitfield, st.piece_length, st.total)
                        if ready - job.hasher.offset >= PREFIX_STEP:
                            job.prefix_task = pool.submit(job.hasher.advance, ready)
                    if st.status == "complete":
                        if job.peers is not None:
                            self.p2p.finished(job.peers, job.entry.size, st.uploaded)
                        self.aria2.forget(gid)
                        del active[gid]
                        hashing[pool.submit(finish_hash, job)] = job
                    elif st.status in {"error", "removed"}:
                        self.aria2.forget(gid)
                        del active[gid]
                        used = sorted({job.uri_mirror.get(u, "?") for u in st.used_uris})
                        if st.error_code == ERR_DISK_FULL:
                            for j in (job, *active.values()):
                                pending.append(j)
                            cleanup_attempt(remove_partials=True)
                            raise DiskFullError(
                                f"disk full while downloading {name}/{version} into {self.cache.root}; "
                                "partial files of this attempt were removed, the current snapshot is untouched")
                        self._handle_error(name, version, job, st.error_code, st.error_message, used, retry, backoff)

                for fut in [f for f in hashing if f.done()]:
                    job = hashing.pop(fut)
                    data = partial / job.entry.sha256
                    digest = fut.result()
                    size = data.stat().st_size
                    job.hasher, job.prefix_task = None, None
                    if digest == job.entry.sha256 and size == job.entry.size:
                        self.cache.add_blob(data, digest)
                        (partial / f"{digest}.aria2").unlink(missing_ok=True)
                        self.cache.file_verified(digest)
                        if job.torrent is not None and self.p2p.cfg.seed:
                            self.p2p.seed(job.torrent)
                        done_bytes += job.entry.size
                        files_done += 1
                        job.completed = 0
                        continue
                    used = sorted(set(job.uri_mirror.values())) if job.peers is None or job.peers.web_seeded else []
                    where = self.cache.quarantine(data, job.entry.sha256)
                    (partial / f"{job.entry.sha256}.aria2").unlink(missing_ok=True)
                    job.cause = mismatch_text(",".join(used + (["peers"] if job.peers else [])), job.entry, digest, size)
                    log.error("checksum mismatch: bytes quarantined", model=name, version=version,
                              file=job.entry.path, mirrors=used, got_sha256=digest, got_size=size,
                              expected_sha256=job.entry.sha256,
                              quarantined=str(where) if where else "not kept (over quarantine_max_bytes)")
                    # Only bytes a mirror alone sent make its object known bad (peers may have sent these).
                    if job.peers is None and len(used) == 1 and job.identity.get(used[0]) is not None:
                        self.cache.mark_known_bad(used[0], self.mirrors.object_key(name, version, job.entry.path), {
                            "error": job.cause, "object": job.identity[used[0]], "model": name,
                            "version": version, "file": job.entry.path, "expected_sha256": job.entry.sha256,
                            "got_sha256": digest, "got_size": size,
                            "seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    job.failures += 1
                    if job.failures > self.cfg.max_tries:
                        raise DownloadError(f"{name}/{version}: {job.cause} (after {job.failures} attempts)")
                    if job.peers is not None:
                        # Peers are unauthenticated: fetch it again over HTTP only.
                        job.http_only, job.peers, job.torrent = True, None, None
                    elif len(used) == 1:
                        job.excluded |= set(used)
                    else:
                        # Bytes came from several mirrors: find the bad one by trying each alone.
                        job.one_mirror = True
                    retry(job, 0.0)

                if progress:
                    in_flight = sum(j.completed for j in active.values()) + sum(j.entry.size for j in hashing.values())
                    progress(done_bytes + in_flight, total, files_done)
                time.sleep(POLL_SECONDS)
        except BaseException:
            cleanup_attempt(remove_partials=False)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if progress:
            progress(total, total, files_done)

    def _handle_error(self, name, version, job: _Job, code: int, message: str, used: list[str], retry, backoff):
        path = job.entry.path
        fields = dict(model=name, version=version, file=path, mirrors=used, aria2_code=code, aria2_message=message)
        if code == ERR_CANNOT_RESUME:
            # The server cannot continue this partial: start the file over.
            log.warning("mirror cannot resume, restarting file", **fields)
            for suffix in ("", ".aria2"):
                (self.cache.partial_dir / f"{job.entry.sha256}{suffix}").unlink(missing_ok=True)
            job.failures += 1
        elif code == ERR_HTTP_STATUS:
            # Usually 403 from an expired presigned URL: presign again and resume.
            job.presigns += 1
            log.warning("HTTP error from mirror, presigning again and resuming", **fields)
            if job.presigns > MAX_REPRESIGNS:
                raise DownloadError(f"{name}/{version}: {path}: mirrors {used} keep refusing the download "
                                    f"(HTTP error, aria2 code {code})")
            retry(job, backoff(job.presigns - 1) if job.presigns > 1 else 0.0)
            return
        elif code == ERR_NOT_FOUND:
            log.error("file missing on mirror", **fields)
            job.excluded |= set(used)
            if not {s.name for s in self.mirrors.sources} - job.excluded:
                raise DownloadError(f"{name}/{version}: {path} is missing on every mirror")
            retry(job, 0.0)
            return
        else:
            job.failures += 1
            log.warning("download failed, backing off", attempt=job.failures, **fields)
        if job.failures > self.cfg.max_tries:
            raise DownloadError(f"{name}/{version}: {path}: download failed {job.failures} times "
                                f"(last: aria2 code {code} {message!r} from mirrors {used})")
        retry(job, backoff(job.failures))
