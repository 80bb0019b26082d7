"""Atomic file writes: readers see the old file or the new one, never half of either.

One scheme for every file the project writes in place: a temporary file beside the
target (same filesystem, so the rename is atomic), created with the final mode (a
0600 secret is never readable by others, not even briefly), written, fsynced,
renamed over the target, and the directory fsynced so the rename survives a crash.
A failure removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: os.PathLike | str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` when the block ends cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: os.PathLike | str, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` with `data` (str is written as UTF-8)."""
    with atomic_writer(path, mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
