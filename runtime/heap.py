"""The process heap policy of a resident engine (glibc; elsewhere every call is a no-op).

Synthesis allocates and frees the same few-MiB activation buffers over and over. Trimming the
heap after every batch (as the engine did) hands those pages back to the OS, so the next batch's
buffers are fresh memory and every 4 KiB page faults on first write: measured ~12 000 faults,
~10 ms, per 3.5 s sentence of a small voice, an eighth of its time. Instead freed memory is
kept for reuse until the process holds RETAIN_FREE_BYTES more than it did right after the last
trim: then (a huge batch, many batch shapes, a voice unloaded) `release_after_batch` trims it
all, which bounds a long-running server's RSS as the old trim did (330 -> 644 MiB over 40
random batches without any trim).

Why RSS and not glibc's count of free bytes: trimmed chunks stay "free" in that count, so once
a voice was unloaded it stayed over any limit and every batch trimmed again (measured: the
multi-speaker voice 20% slower when it ran after a large voice had been closed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

RETAIN_FREE_BYTES = 256 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc or not
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_configured = False
_rss_after_trim: int | None = None


def available() -> bool:
    return _LIBC is not None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def keep_freed_memory() -> None:
    """Keep freed buffers in the heap for reuse (once per process; the engine calls it at load)."""
    global _configured
    if _configured or _LIBC is None:
        return
    # Fixed values also turn off glibc's adaptive thresholds, which hand large chunks back.
    _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, RETAIN_FREE_BYTES)
    _configured = True


def release_after_batch(force: bool = False) -> None:
    """Hand freed memory back to the OS when the process has grown by more than
    RETAIN_FREE_BYTES since the last trim (or always, with `force`: memory measurements)."""
    global _rss_after_trim
    if _LIBC is None:
        return
    if force or _rss_after_trim is None or rss_bytes() - _rss_after_trim > RETAIN_FREE_BYTES:
        _LIBC.malloc_trim(0)
        _rss_after_trim = rss_bytes()
