"""A loopback TCP proxy for fault tests: slows each connection down and cuts it after
a number of response bytes, so the client must reconnect (and send a new request)
later - which is how an expired presigned URL shows up mid-download. It also counts
connections and response bytes, so a test can tell what a run fetched."""

from __future__ import annotations

import asyncio
import threading
import time


class CuttingProxy:
    def __init__(self, target_port: int, cut_after: int, rate: float):
        self.target_port = target_port
        self.cut_after = cut_after
        self.rate = rate  # bytes per second per connection
        self.port = 0
        self.cuts = 0
        self.connections = 0
        self.bytes_down = 0  # server -> client, all connections
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CuttingProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, c_reader, c_writer) -> None:
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            c_writer.close()
            return

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                s_writer.write(data)
                await s_writer.drain()

        async def downstream() -> None:
            sent, start = 0, time.monotonic()
            while sent < self.cut_after and (data := await s_reader.read(16384)):
                c_writer.write(data)
                await c_writer.drain()
                sent += len(data)
                self.bytes_down += len(data)
                await asyncio.sleep(max(0.0, start + sent / self.rate - time.monotonic()))
            if sent >= self.cut_after:
                self.cuts += 1

        up = asyncio.ensure_future(upstream())
        try:
            await downstream()
        except OSError:
            pass
        finally:
            up.cancel()
            for w in (c_writer, s_writer):
                w.close()
