"""Download a set of files with aria2 and verify each one as soon as it lands.

Each file is one transfer task (`transfer.TransferEngine`, aria2 in production) with a
presigned URL from every mirror (aria2 fails over between them) - or, with [p2p], a
torrent with the mirror as web seed - written to `partial/<sha256>` with its `.aria2`
control file, so a restart after any crash resumes where it stopped. A finished file is
hashed in a worker thread while the others keep downloading - hashing is the cost we
hide - and only a matching file is moved into `blobs/`.

One `fetch` call is one `_Attempt`: its loop polls the engine and dispatches each event
to one handler - a file started, progress polled, task complete, task error, hash
finished (match or mismatch), disk full, stop requested. What a failure leads to (retry
after a backoff, presign again, start over, next mirror, mirrors one at a time, HTTP
only, give up) is decided by `fetch_policy.py`, a pure function; how a try runs (HTTP or
peers) by `fetch_strategy.py`; a file's state lives in `fetch_state.FileJob`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import structlog

from mirror.manifest import FileEntry
from tts_common.errors import TtsError

from . import fetch_policy as policy
from .cache import CacheWriter
from .config import Aria2Config
from .fetch_state import FileJob
from .fetch_strategy import HttpStrategy, PeerStrategy, Strategy
from .known_bad import KnownBad
from .mirrors import MirrorSet
from .p2p import PeerToPeer
from .transfer import TaskStatus, TransferEngine

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.1


class DownloadError(TtsError):
    """A file could not be fetched and verified from any mirror."""


class DiskSpaceError(DownloadError):
    """The cache filesystem has too little space for a download: found when the sync is
    planned (nothing fetched yet), or when aria2 ran out of it mid-download."""


class Interrupted(DownloadError):
    """The download was stopped on request (shutdown); partials are kept for resume."""


ProgressFn = Callable[[int, int, int], None]  # (bytes done, bytes total, files done)


class DownloadAccount(Protocol):
    """Where the loop counts what it saw, per model (progress.ProgressReporter: the status
    document, and from it the metrics)."""

    def fetched(self, model: str, source: str, nbytes: int) -> None:
        """`nbytes` arrived for a file of `model`, from "mirror" or "peers"."""

    def mismatch(self, model: str) -> None:
        """A downloaded file of `model` failed its sha256 check."""


class Downloader:
    def __init__(self, aria2: TransferEngine, cache: CacheWriter, mirrors: MirrorSet, cfg: Aria2Config,
                 hash_workers: int = 2, p2p: PeerToPeer | None = None, account: DownloadAccount | None = None):
        self.engine = aria2
        self.account = account
        self.cache = cache
        self.mirrors = mirrors
        self.cfg = cfg
        self.hash_workers = hash_workers
        self.p2p = p2p

    def fetch(self, name: str, version: str, entries: list[FileEntry], progress: ProgressFn | None = None,
              stop: threading.Event | None = None) -> None:
        """Fetch and verify `entries` into blobs/. Raises DownloadError subclasses."""
        _Attempt(self, name, version, entries, progress, stop or threading.Event()).run()


class _Attempt:
    """One `fetch`: its files from queued to verified. A file is in exactly one of
    `pending` (waiting for a slot or its retry time), `active` (a task runs, by gid),
    `hashing` (its final hash runs), or done."""

    def __init__(self, dl: Downloader, name: str, version: str, entries: list[FileEntry],
                 progress: ProgressFn | None, stop: threading.Event):
        self.engine, self.cache, self.mirrors, self.cfg = dl.engine, dl.cache, dl.mirrors, dl.cfg
        self.name, self.version, self.progress, self.stop = name, version, progress, stop
        self.account = dl.account
        self.partial = self.cache.partial_dir
        self.limits = policy.Limits(max_tries=self.cfg.max_tries, file_deadline=self.cfg.file_deadline,
                                    deadline_speed=self.cfg.file_deadline_speed)
        self.known_bad = KnownBad(self.cache, self.mirrors, name, version)
        self.http = HttpStrategy(self.engine)
        # The first strategy that claims a try runs it; HTTP claims every one.
        self.strategies: list[Strategy] = [self.http]
        if dl.p2p is not None:
            self.strategies.insert(0, PeerStrategy(dl.p2p, self.engine, self.presign, self.cfg.presign_expiry))
        self.pool = ThreadPoolExecutor(max_workers=dl.hash_workers, thread_name_prefix="sha256")
        self.total = sum(e.size for e in entries)
        self.pending = [FileJob(e, strategy=self.http) for e in entries]
        self.active: dict[str, FileJob] = {}
        self.hashing: dict[Future, FileJob] = {}
        self.done_bytes = 0
        self.files_done = 0

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self.pending or self.active or self.hashing:
                self.poll()
                time.sleep(POLL_SECONDS)
        except BaseException:
            self.cleanup(remove_partials=False)
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.progress:
            self.progress(self.total, self.total, self.files_done)

    def poll(self) -> None:
        """One turn of the loop: each event since the last turn goes to its handler."""
        if self.stop.is_set():
            self.on_stop()
        now = time.monotonic()
        self.start_due(now)
        for gid, job in list(self.active.items()):
            self.dispatch(job, self.engine.status(gid), now)
        for fut in [f for f in self.hashing if f.done()]:
            job = self.hashing.pop(fut)
            self.on_hashed(job, fut.result())
        if self.progress:
            in_flight = sum(j.completed for j in self.active.values()) + sum(j.entry.size for j in self.hashing.values())
            self.progress(self.done_bytes + in_flight, self.total, self.files_done)

    def start_due(self, now: float) -> None:
        # Hand aria2 only what it runs at once: URLs are presigned just before
        # use, so a long queue cannot outlive their expiry.
        for job in [j for j in self.pending if j.retry_at <= now]:
            if len(self.active) >= self.cfg.max_concurrent_downloads:
                break
            self.pending.remove(job)
            self.on_start(job)

    def dispatch(self, job: FileJob, st: TaskStatus, now: float) -> None:
        if self.account is not None and st.completed > job.counted:
            self.account.fetched(self.name, job.strategy.source(job), st.completed - job.counted)
            job.counted = st.completed
        job.completed = st.completed
        if st.status == "active":
            self.on_progress(job, st, now)
        elif st.status == "complete":
            self.on_complete(job, st)
        elif st.status in {"error", "removed"}:
            self.on_task_error(job, st)

    # -- events --------------------------------------------------------------------------
    def on_start(self, job: FileJob) -> None:
        """A file's turn: resume or start its task (or hash a partial that is complete)."""
        data, control = self.paths(job)
        if data.exists() and not control.exists():
            # Completed by aria2 before a crash, or junk: hashing decides.
            if data.stat().st_size == job.entry.size:
                job.hash.hasher = None
                self.hash(job)
                return
            data.unlink()
        urls = self.known_bad.screen(job, self.presign(job))
        if job.sources.one_mirror:
            urls = urls[:1]
        if not urls:
            self.apply(job, self.decide(job, policy.NoSourceLeft()))
        job.sources.use(urls)
        job.hash.begin(data)
        # What a resumed task reports done at first came before: not fetched now (an upper
        # bound, as aria2 writes partials sparse).
        job.counted = data.stat().st_size if data.exists() and control.exists() else 0
        job.strategy = next(s for s in self.strategies if s.claims(job, control))
        job.gid = job.strategy.start(job, urls, data, control)
        job.started = time.monotonic()
        self.active[job.gid] = job

    def on_progress(self, job: FileJob, st: TaskStatus, now: float) -> None:
        if self.overrun(job, st, now):
            return
        if job.strategy.watch(job, st, now):
            self.end_task(job)
            self.apply(job, self.decide(job, policy.PeersStalled()))
            return
        job.hash.advance(st, self.pool)

    def on_complete(self, job: FileJob, st: TaskStatus) -> None:
        if self.overrun(job, st, None):
            return
        job.strategy.completed(job, st)
        self.end_task(job)
        self.hash(job)

    def on_task_error(self, job: FileJob, st: TaskStatus) -> None:
        self.end_task(job)
        used = job.sources.mirrors_of(st.used_uris)
        decision = self.decide(job, policy.TaskFailed(st.error_code, st.error_message, used))
        if decision.note:
            decision.note.emit(log, model=self.name, version=self.version, file=job.entry.path, mirrors=list(used),
                               aria2_code=st.error_code, aria2_message=st.error_message)
        self.apply(job, decision)

    def on_hashed(self, job: FileJob, digest: str) -> None:
        data = self.paths(job)[0]
        size = data.stat().st_size
        job.hash.clear()
        if digest == job.entry.sha256 and size == job.entry.size:
            self.on_verified(job, data)
        else:
            self.on_mismatch(job, data, digest, size)

    def on_verified(self, job: FileJob, data: Path) -> None:
        self.cache.add_blob(data, job.entry.sha256)
        self.paths(job)[1].unlink(missing_ok=True)
        self.cache.file_verified(job.entry.sha256)
        job.strategy.verified(job)
        self.done_bytes += job.entry.size
        self.files_done += 1
        job.completed = 0

    def on_mismatch(self, job: FileJob, data: Path, digest: str, size: int) -> None:
        """Bad bytes: quarantined, then the policy says whom to blame and what next."""
        served, peers = job.strategy.served_by(job)
        if self.account is not None:
            self.account.mismatch(self.name)
        where = self.cache.quarantine(data, job.entry.sha256)
        self.paths(job)[1].unlink(missing_ok=True)
        decision = self.decide(job, policy.Mismatch(served, peers, job.sources.identified(), digest, size))
        decision.note.emit(log, model=self.name, version=self.version, file=job.entry.path, mirrors=list(served),
                           got_sha256=digest, got_size=size, expected_sha256=job.entry.sha256,
                           quarantined=str(where) if where else "not kept (over quarantine_max_bytes)")
        if decision.known_bad:
            self.known_bad.record(job, decision.known_bad, decision.state.cause, digest, size)
        self.apply(job, decision)

    def overrun(self, job: FileJob, st: TaskStatus, now: float | None) -> bool:
        """More bytes than the manifest signs, or past the try's deadline (`now` None: the
        task completed, only its length counts): the task is stopped and the policy
        decides. True if it was."""
        mirrors, peers = job.strategy.served_by(job)
        if st.used_uris and not peers:
            mirrors = job.sources.mirrors_of(st.used_uris)  # the mirrors aria2 really fetched from
        since = job.strategy.deadline_start(job) if now is not None else None
        deadline = policy.file_deadline(job.entry, self.limits) if since is not None else None
        failure = policy.check_task(job.entry, st.total, st.completed, now - since if since is not None else 0.0,
                                    deadline, mirrors, job.sources.identified(), peers)
        if failure is None:
            return False
        self.end_task(job)
        decision = self.decide(job, failure)
        decision.note.emit(log, model=self.name, version=self.version, file=job.entry.path, mirrors=list(mirrors),
                           expected_size=job.entry.size, reported_size=max(st.total, st.completed))
        if decision.known_bad:
            self.known_bad.record(job, decision.known_bad, decision.state.cause, None, max(st.total, st.completed))
        if decision.discard:
            self.drop_partial(job)  # nothing of an oversize object is kept, not even in quarantine
        self.apply(job, decision)
        return True

    def on_disk_full(self, job: FileJob) -> None:
        self.pending.extend([job, *self.active.values()])
        self.cleanup(remove_partials=True)
        raise DiskSpaceError(
            f"disk full while downloading {self.name}/{self.version} into {self.cache.root}; "
            "partial files of this attempt were removed, the current snapshot is untouched")

    def on_stop(self) -> None:
        self.cleanup(remove_partials=False)
        raise Interrupted("download interrupted; partial files kept for resume")

    # -- carrying out the policy's decisions ------------------------------------------------
    def decide(self, job: FileJob, failure: policy.Failure) -> policy.Decision:
        view = policy.FileView(f"{self.name}/{self.version}", job.entry,
                               frozenset(s.name for s in self.mirrors.sources), frozenset(job.sources.excluded))
        return policy.decide(failure, job.retry, view, self.limits)

    def apply(self, job: FileJob, decision: policy.Decision) -> None:
        job.retry = decision.state
        match decision.action:
            case policy.GiveUp(message=message, drop_partial=drop):
                if drop:
                    self.drop_partial(job)
                raise DownloadError(message)
            case policy.AbortOnFullDisk():
                self.on_disk_full(job)
            case policy.Backoff(delay=delay) | policy.Represign(delay=delay):
                self.retry(job, delay)
            case policy.Restart(delay=delay):
                self.drop_partial(job)
                self.retry(job, delay)
            case policy.NextMirror(exclude=exclude):
                job.sources.excluded |= exclude
                self.retry(job, 0.0)
            case policy.OneMirrorAtATime():
                job.sources.one_mirror = True
                self.retry(job, 0.0)
            case policy.HttpOnly():
                self.drop_partial(job)  # a torrent's control file does not resume over HTTP
                job.peer.http_only = True
                self.retry(job, 0.0)
            case action:
                raise TypeError(f"not a download action: {action!r}")

    # -- helpers -------------------------------------------------------------------------
    def presign(self, job: FileJob) -> list[tuple[str, str]]:
        return self.mirrors.presigned_urls(self.name, self.version, job.entry.path, self.cfg.presign_expiry,
                                           exclude=job.sources.excluded)

    def paths(self, job: FileJob) -> tuple[Path, Path]:
        """The file's partial data and its aria2 control file."""
        sha = job.entry.sha256
        return self.partial / sha, self.partial / f"{sha}.aria2"

    def hash(self, job: FileJob) -> None:
        self.hashing[self.pool.submit(job.hash.digest, self.paths(job)[0], job.entry.sha256)] = job

    def retry(self, job: FileJob, delay: float) -> None:
        job.retry_at = time.monotonic() + delay
        self.pending.append(job)

    def end_task(self, job: FileJob) -> None:
        self.engine.forget(job.gid)
        del self.active[job.gid]

    def drop_partial(self, job: FileJob) -> None:
        for path in self.paths(job):
            path.unlink(missing_ok=True)

    def cleanup(self, remove_partials: bool) -> None:
        for gid in list(self.active):
            self.engine.forget(gid)
        self.active.clear()
        if remove_partials:
            for job in [*self.pending, *self.hashing.values()]:
                self.drop_partial(job)
