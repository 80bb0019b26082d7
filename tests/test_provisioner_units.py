"""Unit checks of small provisioner pieces (no servers needed)."""

from __future__ import annotations

import hashlib
import os

import pytest

from mirror.hashing import PrefixHasher, complete_prefix_bytes, sha256_file

pytestmark = pytest.mark.unit


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
    import threading

    from tts_common.notify import notify

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        assert notify(READY=1)
        assert receiver.recv(4096) == b"READY=1"
        # Nobody reads, so the queue fills: a blocking send would never return. Run the sends
        # in a thread and require it to end (the 60 s join is only a safety net).
        results: list[bool] = []
        sender = threading.Thread(target=lambda: results.extend(notify(STATUS="x" * 1000) for _ in range(2000)),
                                  daemon=True)
        sender.start()
        sender.join(timeout=60)
        assert not sender.is_alive(), "notify() blocked on a full receiver"
        assert results[0] is True and results[-1] is False
    finally:
        receiver.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify(READY=1) is False


def test_watchdog_interval_is_half_of_watchdog_sec(monkeypatch):
    import os

    from tts_common.notify import watchdog_interval

    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert watchdog_interval() == 0.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert watchdog_interval() is None
