"""How one try of a file runs: over HTTP from the mirrors, or from peers with BitTorrent.

The download attempt (download.py) gives each try of a file to the first strategy that
claims it - peers when [p2p] is on and the file has a usable torrent, else HTTP - and
asks that strategy, not the file, what starting, progress, completion and verification
mean. Both write `partial/<sha256>` with its `.aria2` control file, so resume, prefix
hashing and verification are the same for both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import structlog

from .fetch_state import FileJob
from .p2p import PeerFetch, PeerToPeer
from .transfer import TaskStatus, TransferEngine

log = structlog.get_logger("provisioner.download")  # the download loop's events, one logger

# A torrent task with its web seed that still makes no progress for this many
# stall_seconds falls back to plain HTTP.
HTTP_FALLBACK_STALLS = 12

Urls = list[tuple[str, str]]  # [(mirror, presigned URL)] in priority order


class Strategy(Protocol):
    def claims(self, job: FileJob, control: Path) -> bool:
        """Is this try of the file this strategy's?"""

    def start(self, job: FileJob, urls: Urls, data: Path, control: Path) -> str:
        """Hand the file to the engine; returns the task's gid."""

    def watch(self, job: FileJob, st: TaskStatus, now: float) -> bool:
        """The task is running; True: it stalled beyond help (fall back to HTTP)."""

    def completed(self, job: FileJob, st: TaskStatus) -> None:
        """The task finished (before verification)."""

    def served_by(self, job: FileJob) -> tuple[tuple[str, ...], bool]:
        """(mirrors that may have sent the bytes, whether peers may have)."""

    def verified(self, job: FileJob) -> None:
        """The file's bytes matched and are a blob now."""

    def source(self, job: FileJob) -> str:
        """Where the task's bytes come from now: "mirror" or "peers" (metrics)."""

    def deadline_start(self, job: FileJob) -> float | None:
        """Since when (monotonic) the try's deadline counts; None: no deadline yet."""


def _http_control_file(control: Path) -> bool:
    """Is this an HTTP download's .aria2 control file? (Its header's info-hash length,
    bytes 6-9 big-endian, is 0; a torrent's holds 20.)"""
    try:
        with open(control, "rb") as f:
            header = f.read(10)
    except FileNotFoundError:
        return False
    return len(header) == 10 and int.from_bytes(header[6:10], "big") == 0


class HttpStrategy:
    """Presigned URLs from every mirror left; aria2 fails over between them."""

    def __init__(self, engine: TransferEngine):
        self.engine = engine

    def claims(self, job: FileJob, control: Path) -> bool:
        return True

    def start(self, job: FileJob, urls: Urls, data: Path, control: Path) -> str:
        return self.engine.add([url for _, url in urls], out=data.name, resume=control.exists())

    def watch(self, job: FileJob, st: TaskStatus, now: float) -> bool:
        return False  # aria2 reports a failing mirror as an error

    def completed(self, job: FileJob, st: TaskStatus) -> None:
        pass

    def served_by(self, job: FileJob) -> tuple[tuple[str, ...], bool]:
        return job.sources.in_use(), False

    def verified(self, job: FileJob) -> None:
        pass

    def source(self, job: FileJob) -> str:
        return "mirror"

    def deadline_start(self, job: FileJob) -> float | None:
        return job.started


class PeerStrategy:
    """The fleet's peers first; the mirror as web seed when this node's turn comes or peers
    stall (p2p.py decides which); plain HTTP when neither brings anything."""

    def __init__(self, p2p: PeerToPeer, engine: TransferEngine, presign: Callable[[FileJob], Urls],
                 presign_expiry: float):
        self.p2p = p2p
        self.engine = engine
        self.presign = presign
        self.presign_expiry = presign_expiry

    def claims(self, job: FileJob, control: Path) -> bool:
        if not job.peer.http_only and _http_control_file(control):
            job.peer.http_only = True  # an HTTP download resumes as one: its bytes are kept
        job.peer.torrent = None if job.peer.http_only else self.p2p.torrent(job.entry)
        return job.peer.torrent is not None

    def start(self, job: FileJob, urls: Urls, data: Path, control: Path) -> str:
        # BitTorrent writes partial/<sha256> too (the torrent's name). A resumed partial's
        # bytes were fetched before: not counted again (an upper bound: aria2 allocates
        # sparse files, so this is the size it reached).
        resumed = data.stat().st_size if data.exists() and control.exists() else 0
        fetch = job.peer.fetch = PeerFetch(self.p2p.web_seed_first(job.entry), time.monotonic(), resumed)
        seeds = [url for _, url in urls] if fetch.web_seeded else []
        self.p2p.stop_seeding(job.entry.btih)  # a repair: the damaged blob's seed must go
        gid = self.engine.add_torrent(job.peer.torrent, seeds, data.parent, self.p2p.task_options())
        log.info("fetching from peers", file=job.entry.path, web_seed=fetch.web_seeded)
        return gid

    def watch(self, job: FileJob, st: TaskStatus, now: float) -> bool:
        """Give a download the mirror when peers stall; HTTP when nothing helps."""
        peers, stall = job.peer.fetch, self.p2p.cfg.stall_seconds
        if st.completed > peers.last_completed:
            peers.last_completed, peers.last_progress = st.completed, now
            return False
        stalled = now - peers.last_progress
        if stalled < (stall if peers.web_seeded else self.p2p.stall_window(job.entry)):
            return False
        if peers.web_seeded and stalled > HTTP_FALLBACK_STALLS * stall:
            # Neither peers nor the web seed bring anything: plain HTTP, which
            # reports mirror errors the way the rest of the loop handles them.
            log.warning("no progress from peers or web seed: fetching over HTTP only",
                        file=job.entry.path, stalled_s=round(stalled, 1))
            return True
        # Peers brought nothing for this node's stall window: add the mirror as a web seed (or,
        # on a long download, refresh its presigned URLs before they expire).
        if peers.web_seeded and now - peers.web_seeded_at < self.presign_expiry / 2:
            return False
        if urls := self.presign(job):
            self.engine.set_web_seeds(job.gid, [url for _, url in urls])
            job.sources.use(urls)
        if not peers.web_seeded:
            log.info("no progress from peers: adding the mirror", file=job.entry.path, stalled_s=round(stalled, 1))
            peers.last_progress = now  # the mirror gets its own stall window
            peers.completed_at_web_seed = st.completed
            peers.mirror_since = now
        peers.web_seeded, peers.web_seeded_at = True, now
        return False

    def completed(self, job: FileJob, st: TaskStatus) -> None:
        self.p2p.finished(job.peer.fetch, job.entry.size, st.uploaded)

    def served_by(self, job: FileJob) -> tuple[tuple[str, ...], bool]:
        return (job.sources.in_use() if job.peer.fetch.web_seeded else ()), True

    def source(self, job: FileJob) -> str:
        # As p2p.PeerToPeer.finished counts: once the mirror is a web seed, what arrives is
        # counted as the mirror's (an upper bound: aria2 does not say who sent a piece).
        return "mirror" if job.peer.fetch.web_seeded else "peers"

    def deadline_start(self, job: FileJob) -> float | None:
        # Waiting for peers is bounded by the staggered stall windows (a fleet's fallback to
        # the mirror must stay one node at a time); once the mirror is a web seed, the
        # deadline counts from then, so a trickling web seed cannot hold the file forever.
        return job.peer.fetch.mirror_since

    def verified(self, job: FileJob) -> None:
        if self.p2p.cfg.seed:
            self.p2p.seed(job.peer.torrent)
