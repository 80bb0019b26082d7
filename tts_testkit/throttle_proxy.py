"""A TCP proxy for benchmarks: per-connection bandwidth cap, added latency, byte counts.

The kernel here has no netem qdisc, so the "WAN" between the provisioner and the
mirror is simulated in user space. Every accepted connection gets:

- one round trip of connection set-up delay (2 x --delay-ms), as a TCP handshake would;
- a delay line in each direction: each chunk is delivered --delay-ms after it was read,
  so a request/response round trip costs 2 x --delay-ms;
- its own token bucket in each direction capping it at --rate-mib MiB/s (0: no cap);
  aggregate throughput grows with the number of connections, as on a real link whose
  bottleneck is per flow (a window-limited TCP stream, a per-connection shaper).

Bytes are forwarded unchanged, so S3 presigned URLs signed for the proxy's
host:port verify on the server behind it (the Host header is part of the signature).

Counters (bytes server->client, bytes client->server, connections accepted) are kept
in a small shared file (--stats-file, four little-endian u64) that the benchmark reads
with `read_stats` at any time without talking to this process.

    python -m tts_testkit.throttle_proxy --listen-port 9100 --target-port 9000 \
        --rate-mib 40 --delay-ms 10 --stats-file /tmp/proxy.stats
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import signal
import struct
import time
from pathlib import Path

MiB = 1024 * 1024
CHUNK = 64 * 1024
QUEUE_CHUNKS = 8
_FMT = "<4Q"  # down, up, connections, active
_SIZE = struct.calcsize(_FMT)


def read_stats(path: Path) -> dict[str, int]:
    """Counters of a running (or finished) proxy; readable from any process."""
    down, up, conns, active = struct.unpack(_FMT, Path(path).read_bytes()[:_SIZE])
    return {"down": down, "up": up, "connections": conns, "active": active}


class _Stats:
    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, mmap.PAGESIZE)
        self._map = mmap.mmap(fd, mmap.PAGESIZE)
        os.close(fd)
        self.values = [0, 0, 0, 0]

    def add(self, index: int, n: int) -> None:
        self.values[index] += n
        struct.pack_into(_FMT, self._map, 0, *self.values)


class _Bucket:
    """Token bucket that may go into debt: the writer sleeps the debt off (exact mean rate)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = float(CHUNK)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(float(CHUNK), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float, delay: float,
                stats: _Stats, index: int) -> None:
    # Bounded delay line: holds at most 512 KiB (above 40 MiB/s x 10 ms), so the delay
    # and the bucket limit the flow, while bytes parked here (forwarded later or lost when
    # the client drops the connection) stay few; back-pressure beyond it.
    line: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
    bucket = _Bucket(rate)

    async def feed() -> None:
        try:
            while data := await reader.read(CHUNK):
                await line.put((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await line.put((0.0, b""))

    feeder = asyncio.create_task(feed())
    try:
        while True:
            due, data = await line.get()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
            stats.add(index, len(data))
    except (ConnectionError, OSError):
        pass
    finally:
        feeder.cancel()


async def _handle(client_r, client_w, target: tuple[str, int], rate: float, delay: float, stats: _Stats) -> None:
    stats.add(2, 1)
    stats.add(3, 1)
    try:
        if delay:
            await asyncio.sleep(2 * delay)  # the handshake's round trip
        try:
            server_r, server_w = await asyncio.open_connection(*target, limit=4 * CHUNK)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pipe(client_r, server_w, rate, delay, stats, 1),
            _pipe(server_r, client_w, rate, delay, stats, 0),
        )
        for w in (server_w, client_w):
            w.close()
    finally:
        stats.add(3, -1)


async def _serve(args) -> None:
    stats = _Stats(args.stats_file)
    rate, delay = args.rate_mib * MiB, args.delay_ms / 1000.0
    target = (args.target_host, args.target_port)
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, target, rate, delay, stats), args.listen_host, args.listen_port,
        limit=4 * CHUNK, backlog=256)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)  # the benchmark waits for this line
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-host", default="127.0.0.1", help="an address in the mirror's namespace (bench/p2p.py)")
    ap.add_argument("--listen-port", type=int, required=True)
    ap.add_argument("--target-host", default="127.0.0.1")
    ap.add_argument("--target-port", type=int, required=True)
    ap.add_argument("--rate-mib", type=float, default=0.0, help="per connection and direction, 0 = no cap")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (a round trip costs twice)")
    ap.add_argument("--stats-file", type=Path, required=True)
    args = ap.parse_args()
    try:
        import uvloop  # faster event loop when installed: the proxy must not be the bottleneck
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
