"""BitTorrent v1 metadata for model files: one single-file torrent per file.

A file's torrent is a function of its bytes alone: its name is the file's sha256 (the
name of its blob in a node's cache, so a node seeds straight from `blobs/sha256/`), the
piece size is fixed, and the info dictionary holds nothing else (no `private` flag, no
creation date; trackers and web seeds sit outside the info-hash and are given to aria2
at run time). So the same bytes give the same info-hash on every publisher, and the
info-hash signed into the manifest pins the torrent: a swapped torrent is refused.

Torrents live content-addressed in the bucket (`torrents/<sha256>.torrent`); versions
that share a file share its torrent. Piece hashes are SHA-1 and peers are
unauthenticated: a node still checks the whole file's sha256 before it enters `blobs/`.
"""

from __future__ import annotations

import hashlib
import io

import torf

from tts_common.errors import TtsError

# 1 MiB: a 3 GB file is 3,000 pieces (60 KB of piece hashes), small enough that pieces
# spread over many peers at once. Changing it changes every info-hash.
PIECE_SIZE = 1024 * 1024
MAX_TORRENT_BYTES = 4 * 1024 * 1024  # 1 MiB pieces: 20 bytes per MiB, i.e. up to ~200 GiB files


def max_torrent_bytes(size: int) -> int:
    """The largest .torrent a file of `size` bytes has: 20 bytes of SHA-1 per piece and a
    few fixed keys (name = a sha256, length, piece length; ~130 bytes bencoded, 1 KiB
    allowed). A node refuses a torrent over it before reading its body."""
    return 20 * -(-size // PIECE_SIZE) + 1024


class TorrentError(TtsError, ValueError):
    """A torrent does not describe the file the signed manifest names."""


class PieceHasher:
    """SHA-1 of each PIECE_SIZE piece of a stream, fed in chunks of any size."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._current = hashlib.sha1()
        self._filled = 0

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(PIECE_SIZE - self._filled, len(view))
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == PIECE_SIZE:
                self._digests.append(self._current.digest())
                self._current, self._filled = hashlib.sha1(), 0

    def pieces(self) -> bytes:
        tail = [self._current.digest()] if self._filled else []
        return b"".join(self._digests + tail)


def build(sha256: str, size: int, pieces: bytes) -> torf.Torrent:
    if size == 0:
        raise TorrentError("an empty file has no torrent (BitTorrent needs at least one byte)")
    torrent = torf.Torrent(name=sha256, piece_size=PIECE_SIZE, created_by=None, creation_date=None)
    torrent.metainfo["info"]["length"] = size
    torrent.metainfo["info"]["pieces"] = pieces
    return torrent


def torrent_bytes(sha256: str, size: int, pieces: bytes) -> tuple[bytes, str]:
    """The .torrent file and its info-hash (hex) for a file with these hashes."""
    torrent = build(sha256, size, pieces)
    try:
        torrent.validate()
    except torf.TorfError as exc:
        raise TorrentError(f"cannot build the torrent of {sha256}: {exc}") from None
    return torrent.dump(), torrent.infohash


def check(data: bytes, *, btih: str, sha256: str, size: int) -> bytes:
    """Refuse a fetched .torrent unless it is exactly the one the manifest signed."""
    if len(data) > MAX_TORRENT_BYTES:
        raise TorrentError(f"torrent for {sha256} is {len(data)} bytes, over the {MAX_TORRENT_BYTES} byte limit")
    try:
        torrent = torf.Torrent.read_stream(io.BytesIO(data))
    except (torf.TorfError, ValueError) as exc:
        raise TorrentError(f"torrent for {sha256} cannot be read: {exc}") from None
    if torrent.infohash != btih:
        raise TorrentError(f"torrent for {sha256} has info-hash {torrent.infohash}, the manifest signed {btih}")
    info = torrent.metainfo["info"]
    if info.get("name") != sha256 or info.get("length") != size or info.get("piece length") != PIECE_SIZE:
        raise TorrentError(f"torrent {btih} does not describe {sha256} ({size} bytes, {PIECE_SIZE} byte pieces)")
    return data
