"""Streaming sha256 of files (hashlib releases the GIL on large updates, so threads overlap).

`PrefixHasher` hashes a file while it is still being downloaded: aria2 reports which
pieces are complete, and the contiguous run from the start of the file can be hashed
before the rest arrives. When the download ends only the tail is left to hash, so
verification hides behind the download instead of following it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from .torrents import PieceHasher

CHUNK = 1024 * 1024


def _feed(digest, f, length: int, chunk: int = CHUNK) -> int:
    """Feed up to `length` bytes from the file's current position into `digest`."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = f.readinto(view[: min(chunk, length - done)])
        if not n:
            break
        digest.update(view[:n])
        done += n
    return done


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while _feed(digest, f, chunk, chunk):
            pass
    return digest.hexdigest()


class _Both:
    """sha256 and per-piece SHA-1 from one read of the bytes."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.pieces = PieceHasher()

    def update(self, data) -> None:
        self.sha256.update(data)
        self.pieces.update(data)


def hash_file(path: Path, chunk: int = CHUNK) -> tuple[str, bytes]:
    """(sha256 hex, BitTorrent piece hashes) of a file, read once: what `publish` needs."""
    both = _Both()
    with open(path, "rb", buffering=0) as f:
        while _feed(both, f, chunk, chunk):
            pass
    return both.sha256.hexdigest(), both.pieces.pieces()


def complete_prefix_bytes(bitfield: str, piece_length: int, total: int) -> int:
    """Bytes from the start of a file covered by complete pieces (aria2's hex bitfield,
    most significant bit = piece 0)."""
    pieces = 0
    for ch in bitfield:
        nibble = int(ch, 16)
        if nibble == 0xF:
            pieces += 4
            continue
        for bit in (8, 4, 2, 1):
            if not nibble & bit:
                break
            pieces += 1
        break
    return min(pieces * piece_length, total)


class PrefixHasher:
    """sha256 of a growing prefix of a file; thread-safe, calls may arrive out of order."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()

    def advance(self, upto: int) -> None:
        with self._lock:
            if upto <= self.offset:
                return
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset)
                self.offset += _feed(self._digest, f, upto - self.offset)

    def finish(self, size: int) -> str:
        """Hash whatever is left up to `size` and return the hex digest."""
        self.advance(size)
        with self._lock:
            return self._digest.hexdigest()
