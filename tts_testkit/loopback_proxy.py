"""The life cycle every loopback TCP proxy of the fault tests shares: an asyncio server on
127.0.0.1 (port picked free) on a thread of its own, started and stopped by `with`, each
client connection joined to a new one to the target, the client's bytes passed on as they
come and every open connection cancelled at the end. A subclass says what happens to the
server's answer (`downstream`): cut it, trickle it, count it."""

from __future__ import annotations

import asyncio
import threading


class LoopbackProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:  # cancel open connections first: no coroutine left pending
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
        first = await c_reader.read(65536)  # the request's first bytes: its request line
        s_writer.write(first)

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                s_writer.write(data)
                await s_writer.drain()

        up = asyncio.ensure_future(upstream())
        try:
            await self.downstream(first, s_reader, c_writer)
        except OSError:
            pass
        finally:
            up.cancel()
            for w in (c_writer, s_writer):
                w.close()

    async def downstream(self, request: bytes, s_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        """Pass the server's answer to the client (`request`: the first bytes the client sent)."""
        raise NotImplementedError
