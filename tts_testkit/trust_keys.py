"""Helpers for tests of the signed channel metadata: real keys, real python-tuf metadata.

`TrustKeys.make(dir)` writes one ed25519 key pair per key the production layout has
(two root keys, threshold 2; targets; snapshot; timestamp; the CI's key; two release
managers' keys), with `tts-mirror keygen`'s code, so every test signs with files the
way an operator does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mirror.signing import generate_keypair
from mirror.trust import public_key

from .loopback_proxy import LoopbackProxy

KEY_NAMES = ("root1", "root2", "targets", "snapshot", "timestamp", "ci", "release1", "release2")


@dataclass
class TrustKeys:
    dir: Path

    @classmethod
    def make(cls, directory: Path, names: tuple[str, ...] = KEY_NAMES) -> "TrustKeys":
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            generate_keypair(directory / f"{name}.key", directory / f"{name}.pub")
        return cls(directory)

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.dir / f"{name}.pub"

    def keys(self, *names: str) -> list[Path]:
        return [self.key(n) for n in names]

    def init_args(self, release_threshold: int = 1) -> list[str]:
        """`tts-mirror trust init` options for this layout (root threshold 2)."""
        args = ["--root-key", str(self.pub("root1")), "--root-key", str(self.pub("root2")),
                "--root-threshold", "2", "--targets-key", str(self.pub("targets")),
                "--snapshot-key", str(self.pub("snapshot")), "--timestamp-key", str(self.pub("timestamp")),
                "--ci-key", str(self.pub("ci")), "--release-key", str(self.pub("release1")),
                "--release-key", str(self.pub("release2")), "--release-threshold", str(release_threshold)]
        for name in KEY_NAMES:
            args += ["--key", str(self.key(name))]
        return args

    def public(self, name: str):
        return public_key(self.pub(name))

    def layout(self) -> dict[str, list]:
        """Role -> public keys, as `trust_ops.init` takes them."""
        return {"root": [self.public("root1"), self.public("root2")], "targets": [self.public("targets")],
                "snapshot": [self.public("snapshot")], "timestamp": [self.public("timestamp")],
                "ci": [self.public("ci")], "release": [self.public("release1"), self.public("release2")]}

    def online(self) -> list[Path]:
        """The signing host's keys (the refresh timer)."""
        return self.keys("snapshot", "timestamp")


class TrickleProxy(LoopbackProxy):
    """A loopback proxy that passes the server's answer on one byte at a time, one byte
    every `interval` seconds: a mirror that answers, slowly enough to hold a reader with
    only a per-read timeout forever. Counts connections."""

    def __init__(self, target_port: int, interval: float = 0.5, only: bytes = b"/tuf/"):
        super().__init__(target_port)
        self.interval = interval
        self.only = only  # trickle requests whose request line has this; pass others on at once
        self.trickled = 0

    async def downstream(self, request: bytes, s_reader, c_writer) -> None:
        import asyncio

        slow = self.only in request.split(b"\r\n", 1)[0]
        self.trickled += slow
        for _ in range(10_000_000):  # bounded
            data = await s_reader.read(1 if slow else 65536)
            if not data:
                break
            c_writer.write(data)
            await c_writer.drain()
            if slow:
                await asyncio.sleep(self.interval)
