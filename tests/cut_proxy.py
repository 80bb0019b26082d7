"""A loopback TCP proxy for fault tests: slows each connection down and cuts it after
a number of response bytes, so the client must reconnect (and send a new request)
later - which is how an expired presigned URL shows up mid-download. It also counts
connections and response bytes, so a test can tell what a run fetched."""

from __future__ import annotations

import asyncio
import time

from tts_testkit.loopback_proxy import LoopbackProxy


class CuttingProxy(LoopbackProxy):
    def __init__(self, target_port: int, cut_after: int, rate: float):
        super().__init__(target_port)
        self.cut_after = cut_after
        self.rate = rate  # bytes per second per connection
        self.cuts = 0
        self.bytes_down = 0  # server -> client, all connections

    async def downstream(self, request: bytes, s_reader, c_writer) -> None:
        sent, start = 0, time.monotonic()
        while sent < self.cut_after and (data := await s_reader.read(16384)):
            c_writer.write(data)
            await c_writer.drain()
            sent += len(data)
            self.bytes_down += len(data)
            await asyncio.sleep(max(0.0, start + sent / self.rate - time.monotonic()))
        if sent >= self.cut_after:
            self.cuts += 1
