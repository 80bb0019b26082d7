"""One file's state within a download attempt, one part per concern (download.py drives it).

    FileJob
      retry     fetch_policy.RetryState: failures, presigns, the cause the operator sees
      sources   HttpSources: mirrors excluded, URL -> mirror, one mirror at a time, HEAD identities
      peer      PeerState: torrent, PeerFetch, HTTP only (fetch_strategy.PeerStrategy's)
      hash      HashState: the prefix hasher and its running task
      strategy  the fetch_strategy that runs (or last ran) its task
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mirror.hashing import PrefixHasher, complete_prefix_bytes, sha256_file
from mirror.manifest import FileEntry

from .fetch_policy import RetryState
from .p2p import PeerFetch
from .transfer import TaskStatus

if TYPE_CHECKING:
    from .fetch_strategy import Strategy

# Hash a downloading file's completed prefix once this much new data is contiguous.
PREFIX_STEP = 16 * 1024 * 1024


@dataclass
class HttpSources:
    """Which mirrors serve the file over HTTP (or as web seeds)."""
    excluded: set[str] = field(default_factory=set)  # given up on: missing, known bad, sent bad bytes
    uri_mirror: dict[str, str] = field(default_factory=dict)  # presigned URL -> its mirror, for the current try
    one_mirror: bool = False  # after a mismatch from mixed mirrors: try them one at a time
    identities: dict[str, dict | None] = field(default_factory=dict)  # mirror -> object's etag/size/mtime

    def use(self, urls: list[tuple[str, str]]) -> None:
        self.uri_mirror = {url: mirror for mirror, url in urls}

    def mirrors_of(self, uris) -> tuple[str, ...]:
        return tuple(sorted({self.uri_mirror.get(u, "?") for u in uris}))

    def in_use(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.uri_mirror.values())))

    def identified(self) -> frozenset[str]:
        return frozenset(m for m, ident in self.identities.items() if ident is not None)


@dataclass
class PeerState:
    """The file's peer-to-peer side."""
    http_only: bool = False  # never from peers again: they sent bad bytes, stalled, or the partial is HTTP's
    torrent: bytes | None = None  # checked against the manifest's info-hash
    fetch: PeerFetch | None = None  # the current torrent task's stall watch and byte accounting


@dataclass
class HashState:
    """The file's sha256, computed while it downloads: the completed prefix is hashed in a
    worker as it grows, so only the tail is left when the file completes."""
    hasher: PrefixHasher | None = None
    prefix_task: Future | None = None

    def begin(self, path: Path) -> None:
        self.hasher = PrefixHasher(path)

    def clear(self) -> None:
        self.hasher, self.prefix_task = None, None

    def advance(self, st: TaskStatus, pool: Executor) -> None:
        if self.hasher is None or (self.prefix_task is not None and not self.prefix_task.done()):
            return
        ready = complete_prefix_bytes(st.bitfield, st.piece_length, st.total)
        if ready - self.hasher.offset >= PREFIX_STEP:
            self.prefix_task = pool.submit(self.hasher.advance, ready)

    def digest(self, path: Path, expected: str) -> str:
        """Digest of the downloaded file: the prefix hasher's, re-checked from scratch
        if it disagrees (a piece may have been reported before it reached the file)."""
        size = path.stat().st_size
        digest = self.hasher.finish(size) if self.hasher else sha256_file(path)
        if digest != expected and self.hasher is not None:
            digest = sha256_file(path)
        return digest


@dataclass
class FileJob:
    entry: FileEntry
    strategy: Strategy
    retry: RetryState = RetryState()
    sources: HttpSources = field(default_factory=HttpSources)
    peer: PeerState = field(default_factory=PeerState)
    hash: HashState = field(default_factory=HashState)
    gid: str | None = None  # its transfer engine task while one runs
    retry_at: float = 0.0  # monotonic time before which it is not started again
    started: float = 0.0  # monotonic time its current try started (its deadline counts from here)
    completed: int = 0  # bytes its task reported done (progress)
    counted: int = 0  # of those, what the metrics counted as fetched (a resumed part is not)
