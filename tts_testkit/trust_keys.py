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


class TrickleProxy:
    """A loopback proxy that passes the server's answer on one byte at a time, one byte
    every `interval` seconds: a mirror that answers, slowly enough to hold a reader with
    only a per-read timeout forever. Counts connections."""

    def __init__(self, target_port: int, interval: float = 0.5, only: bytes = b"/tuf/"):
        import asyncio
        import threading

        self.target_port = target_port
        self.interval = interval
        self.only = only  # trickle requests whose request line has this; pass others on at once
        self.trickled = 0
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TrickleProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        import asyncio

        async def shutdown() -> None:  # cancel open connections first: no coroutine left pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, c_reader, c_writer) -> None:
        import asyncio

        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            c_writer.close()
            return

        first = await c_reader.read(65536)
        slow = self.only in first.split(b"\r\n", 1)[0]
        self.trickled += slow
        s_writer.write(first)

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                s_writer.write(data)
                await s_writer.drain()

        up = asyncio.ensure_future(upstream())
        try:
            for _ in range(10_000_000):  # bounded
                data = await s_reader.read(1 if slow else 65536)
                if not data:
                    break
                c_writer.write(data)
                await c_writer.drain()
                if slow:
                    await asyncio.sleep(self.interval)
        except OSError:
            pass
        finally:
            up.cancel()
            for w in (c_writer, s_writer):
                w.close()
