"""The process heap policy of a resident engine (glibc; elsewhere every call is a no-op).

Synthesis allocates and frees the same few-MiB activation buffers over and over. glibc's
defaults hand such memory back to the OS as soon as it is freed (mmap'd chunks, a trimmed heap
top), so the next buffer is fresh memory and every 4 KiB page of it faults on first write:
measured ~12 000 faults, ~10 ms, per 3.5 s sentence of a small voice, an eighth of its time.
Instead freed memory is kept for reuse, up to RETAIN_FREE_BYTES: past that (a huge batch, many
batch shapes) `release_after_batch` trims it all, which bounds a long-running server's RSS as
the old trim-after-every-batch did (330 -> 644 MiB over 40 random batches without any trim).
"""

from __future__ import annotations

import ctypes
import ctypes.util

RETAIN_FREE_BYTES = 256 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc or not
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2
_configured = False


def keep_freed_memory() -> None:
    """Keep freed buffers in the heap for reuse (once per process; the engine calls it at load)."""
    global _configured
    if _configured or _LIBC is None or _MALLINFO2 is None:
        return
    # Fixed values also turn off glibc's own adaptive thresholds.
    _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, RETAIN_FREE_BYTES)
    _configured = True


def free_bytes() -> int:
    """Bytes freed but held by the heap (all arenas); 0 where unknown."""
    return int(_MALLINFO2().fordblks) if _MALLINFO2 is not None else 0


def release_after_batch(force: bool = False) -> None:
    """Hand freed memory back to the OS when the heap holds more than RETAIN_FREE_BYTES of it
    (or always, with `force`: memory measurements). Without mallinfo2 there is no way to tell,
    so it trims every time, as before."""
    if _LIBC is None:
        return
    if force or _MALLINFO2 is None or free_bytes() > RETAIN_FREE_BYTES:
        _LIBC.malloc_trim(0)
