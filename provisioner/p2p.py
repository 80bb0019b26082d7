"""Peer-to-peer fetching and seeding with aria2's BitTorrent engine (docs/p2p.md).

What this module decides, and the download loop does not:

- which torrent a file uses: the mirror's `torrents/<sha256>.torrent`, refused unless
  it is exactly the one whose info-hash the signed manifest names, kept in the cache's
  `torrents/` so seeding needs no mirror after a restart;
- when a node may use the mirror for a file: aria2 has no "prefer peers" setting, so
  a deterministic ranking of the fleet per file picks `web_seed_nodes` nodes that get
  the presigned URLs as web seeds at once; every other node starts on peers only and
  adds the mirror when peers bring no byte for a while: `stall_seconds` times its place
  after the web-seeding nodes, so when the first node dies the next one takes over as
  the fleet's web seed and the rest keep fetching from peers;
- what is seeded: every blob a kept snapshot references, from `blobs/sha256/`
  (verified by our sha256 before it got there), re-added whenever aria2 (re)starts.
"""

from __future__ import annotations

import hashlib
import socket

import structlog

from mirror import torrents as bt
from mirror.manifest import FileEntry, ManifestError
from mirror.remote import MirrorError

from .cache import CacheError, CacheWriter
from .config import P2PConfig
from .mirrors import MirrorSet
from .transfer import SeedingEngine

log = structlog.get_logger(__name__)


def node_id(cfg: P2PConfig) -> str:
    return cfg.node_id or socket.gethostname()


def rank(node: str, fleet: list[str], sha256: str) -> int:
    """This node's place among the fleet for one file: the same order on every node,
    a different one per file (so the mirror's first copies spread over the fleet)."""
    members = sorted(set(fleet) | {node}, key=lambda n: hashlib.sha256(f"{sha256}/{n}".encode()).digest())
    return members.index(node)


class PeerFetch:
    """The p2p side of one file's torrent task: stall watch and byte accounting (fetch_strategy.py)."""

    def __init__(self, web_seeds_now: bool, started: float, resumed: int = 0):
        self.web_seeded = web_seeds_now
        self.web_seeded_at = started if web_seeds_now else None  # last (re)presign of the web seeds
        self.mirror_since = self.web_seeded_at  # when the mirror first became a web seed (the deadline's start)
        self.base = resumed  # bytes of a partial file from before (not fetched now)
        self.last_completed = 0
        self.last_progress = started
        # Bytes completed when the mirror became a web seed: what came before is from
        # peers (exact); what came after is counted as the mirror's (an upper bound:
        # aria2 does not say which source sent which piece).
        self.completed_at_web_seed = resumed if web_seeds_now else None


class PeerToPeer:
    def __init__(self, cfg: P2PConfig, cache: CacheWriter, mirrors: MirrorSet, aria2: SeedingEngine):
        self.cfg = cfg
        self.cache = cache
        self.mirrors = mirrors
        self.aria2 = aria2
        self.node = node_id(cfg)
        # Totals since start, for status.json: bytes that arrived from peers and from
        # the mirror (see PeerFetch), bytes that download tasks uploaded before they
        # were removed (seeds report their own).
        self.peer_bytes = 0
        self.mirror_bytes = 0
        self.uploaded_by_downloads = 0

    def finished(self, fetch: PeerFetch, size: int, uploaded: int) -> None:
        fetched = max(0, size - min(fetch.base, size))
        mirror = 0
        if fetch.completed_at_web_seed is not None:
            mirror = max(0, min(fetched, size - max(fetch.completed_at_web_seed, fetch.base)))
        self.mirror_bytes += mirror
        self.peer_bytes += fetched - mirror
        self.uploaded_by_downloads += uploaded

    def task_options(self) -> dict[str, str]:
        # seed-time 0: the download task stops when complete; seeding starts from
        # blobs/ after our sha256 check (Seeder).
        return {"bt-tracker": ",".join(self.cfg.trackers), "seed-time": "0"}

    def seed(self, torrent: bytes) -> str:
        """Seed a verified blob from blobs/ (our sha256 already matched: no re-check)."""
        options = {"bt-tracker": ",".join(self.cfg.trackers), "bt-seed-unverified": "true", "seed-ratio": "0.0"}
        return self.aria2.add_torrent(torrent, [], self.cache.blobs_dir, options)

    def seeding(self) -> dict[str, str]:
        """info-hash -> gid of every task seeding from blobs/."""
        blobs = str(self.cache.blobs_dir)
        return {t.info_hash: t.gid for t in self.aria2.torrent_tasks() if t.dir == blobs}

    def stop_seeding(self, btih: str) -> None:
        if gid := self.seeding().get(btih):
            self.aria2.forget(gid)

    def web_seed_first(self, entry: FileEntry) -> bool:
        return rank(self.node, self.cfg.fleet, entry.sha256) < self.cfg.web_seed_nodes

    def stall_window(self, entry: FileEntry) -> float:
        """Seconds without progress before this node adds the mirror: staggered by rank,
        so the fleet's fallback is one node at a time, not all at once."""
        place = rank(self.node, self.cfg.fleet, entry.sha256) - self.cfg.web_seed_nodes + 1
        return self.cfg.stall_seconds * max(1, place)

    def torrent(self, entry: FileEntry) -> bytes | None:
        """The file's checked torrent, or None (then the file comes over HTTP only)."""
        if not entry.btih:
            return None
        local = self.cache.torrent_path(entry.sha256)
        try:
            return bt.check(local.read_bytes(), btih=entry.btih, sha256=entry.sha256, size=entry.size)
        except FileNotFoundError:
            pass
        except bt.TorrentError as exc:
            log.warning("cached torrent refused, fetching it again", file=entry.path, error=str(exc))
        try:
            data = self.mirrors.fetch_torrent(entry.sha256, entry.size)
            bt.check(data, btih=entry.btih, sha256=entry.sha256, size=entry.size)
        except (MirrorError, bt.TorrentError, ManifestError) as exc:
            log.warning("no usable torrent: fetching this file from the mirror only", file=entry.path,
                        sha256=entry.sha256, error=str(exc))
            return None
        self.cache.save_torrent(entry.sha256, data)
        return data


class Seeder:
    """Keeps aria2 seeding exactly the blobs the kept snapshots reference. (A blob a
    download verifies is seeded at once, before its snapshot exists: peers waiting for
    it must not wait for this node's whole pass.)"""

    def __init__(self, p2p: PeerToPeer):
        self.p2p = p2p
        self.cfg = p2p.cfg
        self.cache = p2p.cache
        self.aria2 = p2p.aria2

    def wanted(self) -> dict[str, tuple[str, bytes]]:
        """info-hash -> (sha256, torrent) for every seedable blob."""
        found: dict[str, tuple[str, bytes]] = {}
        for name in self.cache.models():
            for snap in self.cache.snapshots(name):
                try:
                    files = snap.manifest().files
                except (CacheError, ManifestError, OSError):
                    continue
                for entry in files:
                    if not entry.btih or entry.btih in found or not self.cache.has_blob(entry.sha256, entry.size):
                        continue
                    try:
                        data = bt.check(self.cache.torrent_path(entry.sha256).read_bytes(), btih=entry.btih,
                                        sha256=entry.sha256, size=entry.size)
                    except (OSError, bt.TorrentError):
                        continue  # fetched over HTTP, or published before torrents: nothing to seed
                    found[entry.btih] = (entry.sha256, data)
        return found

    def reconcile(self) -> dict[str, int]:
        """Add missing seeds, drop seeds of blobs gone; returns {"seeding", "uploaded"}."""
        if not self.cfg.seed:
            return self.counts()
        wanted = self.wanted()
        seeding = self.p2p.seeding()
        for btih, gid in seeding.items():
            if btih not in wanted:
                self.aria2.forget(gid)
                log.info("seed stopped: blob no longer kept", btih=btih)
        for btih, (sha256, torrent) in wanted.items():
            if btih not in seeding:
                self.p2p.seed(torrent)
                log.info("seeding", sha256=sha256, btih=btih)
        return self.counts()

    def counts(self) -> dict[str, int]:
        """Blobs seeded and bytes uploaded by every torrent task, from one listing."""
        tasks = self.aria2.torrent_tasks()
        blobs = str(self.cache.blobs_dir)
        return {"seeding": sum(t.dir == blobs for t in tasks) if self.cfg.seed else 0,
                "uploaded": sum(t.uploaded for t in tasks)}
