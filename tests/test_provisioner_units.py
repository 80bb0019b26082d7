"""Unit checks of small provisioner pieces (no servers needed)."""

from __future__ import annotations

import hashlib
import os

from mirror.hashing import PrefixHasher, complete_prefix_bytes, sha256_file


def test_complete_prefix_bytes_reads_aria2_bitfield():
    assert complete_prefix_bytes("", 1024, 10_000) == 0
    assert complete_prefix_bytes("0f", 1024, 10_000) == 0          # piece 0 missing
    assert complete_prefix_bytes("e0", 1024, 10_000) == 3 * 1024   # 1110 -> 3 pieces
    assert complete_prefix_bytes("ff8", 1024, 100_000) == 9 * 1024
    assert complete_prefix_bytes("fff", 1024, 10_000) == 10_000    # capped at the file size


def test_prefix_hasher_matches_whole_file_hash(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    hasher = PrefixHasher(path)
    hasher.advance(1024 * 1024)
    hasher.advance(512)          # out of order: no-op
    hasher.advance(2 * 1024 * 1024 + 5)
    assert hasher.finish(len(data)) == hashlib.sha256(data).hexdigest() == sha256_file(path)


def test_notify_never_blocks_on_a_full_receiver(tmp_path, monkeypatch):
    import socket
    import time

    from provisioner.notify import notify

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        assert notify(READY=1)
        assert receiver.recv(4096) == b"READY=1"
        start = time.monotonic()
        results = [notify(STATUS="x" * 1000) for _ in range(2000)]  # nobody reads: queue fills
        assert time.monotonic() - start < 5
        assert results[0] is True and results[-1] is False
    finally:
        receiver.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify(READY=1) is False
