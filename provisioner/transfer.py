"""What the download loop needs from a transfer engine: the one contract it holds aria2 to.

`provisioner/aria2.py`'s `Aria2Process` satisfies it; `download.py`, `fetch_strategy.py`
and `p2p.py` depend on these Protocols, not on that class. A task's status and its
error codes are aria2's (aria2c(1), "EXIT STATUS"): `fetch_policy.py` decides what each
one means for the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Error codes with a handling of their own (fetch_policy.py); any other is a network error.
ERR_NOT_FOUND = 3
ERR_TOO_SLOW = 5  # a connection stayed under --lowest-speed-limit
ERR_CANNOT_RESUME = 8
ERR_DISK_FULL = 9
ERR_HTTP_STATUS = 22  # includes 403 Forbidden (expired presigned URL)


@dataclass(frozen=True)
class TaskStatus:
    gid: str
    status: str  # active | waiting | paused | error | complete | removed
    completed: int
    total: int
    speed: int
    error_code: int
    error_message: str
    used_uris: tuple[str, ...]
    bitfield: str = ""
    piece_length: int = 0
    uploaded: int = 0
    info_hash: str = ""  # BitTorrent tasks only
    dir: str = ""


class TransferEngine(Protocol):
    """Runs file transfers as tasks named by a gid; files stay on disk when a task goes."""

    def add(self, uris: list[str], out: str, resume: bool = False) -> str:
        """Queue one file from any of `uris` (the same bytes) into the work dir as `out`."""

    def add_torrent(self, torrent: bytes, uris: list[str], directory: Path, options: dict[str, str]) -> str:
        """Queue a torrent's file into `directory`; `uris` are web seeds."""

    def status(self, gid: str) -> TaskStatus: ...

    def forget(self, gid: str) -> None:
        """Stop a task and drop its result; its files stay."""

    def set_web_seeds(self, gid: str, uris: list[str]) -> None:
        """Replace a torrent task's web seeds."""


class SeedingEngine(TransferEngine, Protocol):
    """A transfer engine that also lists its BitTorrent tasks (p2p.py seeds with it)."""

    def torrent_tasks(self) -> list[TaskStatus]: ...
