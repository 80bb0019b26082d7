"""The Wyoming protocol front end (Home Assistant's voice protocol), on the one Runtime.

Events are the `wyoming` library's types; the bytes are read by wyoming_wire (bounded) and
written by the library. Synthesis goes through the HTTP-free service (synthesis.py), so Wyoming
clients batch with HTTP clients on the one scheduler and each gets only its own audio.

* `describe` -> `info`: one TTS program, every configured voice, streaming supported.
* `synthesize` -> `audio-start`, `audio-chunk`s (16-bit mono PCM at the voice's rate), `audio-stop`:
  the first sentence runs alone and its first piece of audio goes out before it is fully decoded.
* `synthesize-start`, `synthesize-chunk`..., `synthesize-stop` -> one audio cycle per sentence,
  cut as the text arrives (up to MAX_PENDING sentences planned ahead), then `synthesize-stopped`;
  a `synthesize` inside a stream is the compatibility copy of its text and is ignored.
* Every refusal is an `error` event whose `code` is the HTTP API's error kind (`unknown_voice`,
  `text_too_long`, `not_ready`, `queue_full`, ...) or a wire error's code; bytes that are not an
  event within the limits get an `error` and the connection is closed. A connection silent for
  `wyoming_idle_timeout_s` is closed; a client that goes away cancels its queued work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
import structlog
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from .. import audio
from ..frontend import complete_sentences
from .access import account
from .errors import HttpError
from .record import AccessRecord
from .service import Runtime
from .synthesis import ClientGone, Synthesis, admit, job_error, prepare
from .wyoming_info import info_event, resolve_voice
from .wyoming_wire import WireError, WireLimits, read_event

log = structlog.get_logger(__name__)

SAMPLES_PER_CHUNK = 1024  # as wyoming-piper sends them
MAX_PENDING = 8  # sentences of one stream planned ahead of the one playing (memory: bounded)
INBOX = 16  # events read ahead of the handler; past it the client waits (TCP backpressure)
_GONE = object()  # the client closed the connection



@dataclass
class Outcome:
    """What one synthesis answered, for its access record (see `accounted`)."""
    status: int = 200

@dataclass
class Stream:
    """A synthesize-start ... synthesize-stop text stream."""

    voice: str
    speaker: Any
    text: str = ""  # not yet a complete sentence
    chars: int = 0  # all text received, against max_chars
    cycles: int = 0  # sentences planned
    failed: bool = False  # an error was sent: the rest of the stream is ignored until stop
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(MAX_PENDING))
    player: asyncio.Task | None = None


class Connection:
    """One client: a reader task feeds events into a small inbox; the handler answers them."""

    def __init__(self, runtime: Runtime, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: WireLimits, peer: str):
        self.runtime, self.reader, self.writer, self.limits, self.peer = runtime, reader, writer, limits, peer
        self.idle = runtime.config.wyoming_idle_timeout_s
        self.inbox: asyncio.Queue = asyncio.Queue(INBOX)
        self.gone = asyncio.Event()
        self.stream: Stream | None = None

    async def run(self) -> None:
        reading = asyncio.create_task(self._read())
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle):
                        item = await self.inbox.get()
                except TimeoutError:
                    await self.send(Error(f"no event for {self.idle:g} s: closing the connection", "idle_timeout"))
                    return
                if item is _GONE:
                    return
                if isinstance(item, WireError):
                    await self.send(Error(f"{item}; closing the connection", item.code))
                    return
                await self.handle(item)
        except (ConnectionError, TimeoutError, ClientGone):
            pass  # the client went away or stopped reading: nothing to answer
        finally:
            reading.cancel()
            await self._end_stream()
            self.writer.close()

    async def _read(self) -> None:
        try:
            while (event := await read_event(self.reader, self.limits)) is not None:
                await self.inbox.put(event)
        except WireError as exc:
            await self.inbox.put(exc)  # answered in turn, then the connection is closed
            return
        except ConnectionError:
            pass
        self.gone.set()  # first: a synthesis in progress stops even while the inbox is full
        await self.inbox.put(_GONE)

    async def send(self, eventable) -> None:
        """Write one event; a client that does not read for `idle` seconds is given up."""
        async with asyncio.timeout(self.idle):
            await async_write_event(eventable.event(), self.writer)

    async def until_gone(self) -> None:
        await self.gone.wait()

    async def unless_gone(self, work) -> None:
        """Run `work` (a coroutine) unless the client goes first: then it is cancelled (which
        cancels its queued jobs) and ClientGone raised."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled():
            raise ClientGone()
        task.result()

    async def handle(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self.send(info_event(self.runtime))
        elif Synthesize.is_type(kind):
            if self.stream is None:  # inside a stream it repeats the stream's text: ignored
                await self.synthesize(event)
        elif SynthesizeStart.is_type(kind):
            await self.start_stream(event)
        elif SynthesizeChunk.is_type(kind):
            await self.stream_chunk(event)
        elif SynthesizeStop.is_type(kind):
            await self.stop_stream()
        else:
            await self.send(Error(f"unknown event type {kind[:60]!r}: this server speaks describe, synthesize, "
                                  "synthesize-start/-chunk/-stop", "unknown_event"))

    # -- one text: synthesize -------------------------------------------------------------
    async def synthesize(self, event: Event) -> None:
        record = AccessRecord(id=uuid.uuid4().hex[:16])

        async def refuse(exc: HttpError) -> None:
            await self.send(Error(exc.message, exc.kind))

        async with self.accounted(record, "synthesize", refuse):
            text = event_text(event, "synthesize")
            voice, speaker = resolve_voice(self.runtime, event.data.get("voice"))
            synthesis = await self.plan(record, text, voice, speaker, progressive=True)
            await self.unless_gone(self.play(synthesis, record))

    @contextlib.asynccontextmanager
    async def accounted(self, record: AccessRecord, path: str, on_error: Callable[[HttpError], Awaitable[None]]):
        """One synthesis's outcome into its access record and the metrics, however it ends:
        an HttpError is answered by `on_error` (the event ends), a client gone is 499 and goes
        on up. The body may set `outcome.status` itself (a sentence skipped)."""
        outcome = Outcome()
        try:
            yield outcome
        except HttpError as exc:
            outcome.status = exc.status
            record.fail(exc.message, exc.kind)
            await on_error(exc)
        except ClientGone:
            outcome.status = 499
            record.client_gone()
            raise
        finally:
            account(self.runtime, record, endpoint="wyoming", method="WYOMING", path=path,
                    status=outcome.status, synthesis=True)

    async def plan(self, record: AccessRecord, text: str, voice: str, speaker: Any, progressive: bool) -> Synthesis:
        """Checked, planned and queued, its first sentence first. `progressive` (the first audio
        of a request or a stream): the first sentence runs alone and its first piece comes out
        before it is whole - but only while nothing waits in the queue: a job that runs alone
        cannot batch, and with clients queued (8 Home Assistant satellites at once) batching
        their first sentences together gives everyone audio sooner (bench/results/network.md)."""
        record.synthesizing(voice, text)
        model = admit(self.runtime, text, voice, "text")
        synthesis = await prepare(self.runtime, model, voice, text, "text", "voice.speaker", speaker=speaker)
        synthesis.submit(stream=True, progressive=progressive and self.runtime.scheduler.depth == 0)
        return synthesis

    async def play(self, synthesis: Synthesis, record: AccessRecord, lead: np.ndarray | None = None) -> None:
        """One audio cycle: audio-start, the synthesis's audio as it comes, audio-stop. `lead`
        (silence) goes before the audio. Whatever is not played is cancelled."""
        rate = synthesis.sample_rate
        try:
            first = await synthesis.first(self.until_gone)
            await self.send(AudioStart(rate=rate, width=2, channels=1))
            if lead is not None:
                await self.send_pcm(lead, rate)
            produced = 0.0
            async with aclosing(synthesis.audio(first)) as pieces:
                async for piece in pieces:
                    await self.send_pcm(piece.wave, rate)
                    produced += len(piece.wave) / rate
                    if record.first_audio_ms is None:
                        record.first_audio(len(piece.wave) / rate)
                    record.audio_s = produced
            await self.send(AudioStop())
        except (HttpError, ClientGone, ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a job failed after the first sentence (deadline, ...)
            raise job_error(exc) from None
        finally:
            synthesis.cancel(synthesis.jobs[synthesis.done:])
            if synthesis.jobs:
                record.timings(synthesis.jobs[:max(synthesis.done, 1)])

    async def send_pcm(self, wave: np.ndarray, rate: int) -> None:
        pcm = audio.encode(wave, rate, "pcm")
        step = SAMPLES_PER_CHUNK * 2
        for offset in range(0, len(pcm), step):
            await self.send(AudioChunk(rate=rate, width=2, channels=1, audio=pcm[offset:offset + step]))

    # -- a text stream: synthesize-start / -chunk / -stop ---------------------------------------
    async def start_stream(self, event: Event) -> None:
        if self.stream is not None:
            await self.send(Error("synthesize-start inside a stream: send synthesize-stop first", "stream_open"))
            return
        try:
            voice, speaker = resolve_voice(self.runtime, event.data.get("voice"))
        except HttpError as exc:
            await self.send(Error(exc.message, exc.kind))
            return
        self.stream = Stream(voice, speaker)
        self.stream.player = asyncio.create_task(self._player(self.stream))

    async def stream_chunk(self, event: Event) -> None:
        stream = self.stream
        if stream is None:
            await self.send(Error("synthesize-chunk without synthesize-start", "no_stream"))
            return
        try:
            text = event_text(event, "synthesize-chunk", empty_ok=True)
        except HttpError as exc:
            return await self._fail_stream(stream, exc)
        if stream.failed:
            return
        stream.chars += len(text)
        limit = self.runtime.config.max_chars
        if stream.chars > limit:
            return await self._fail_stream(stream, HttpError(
                413, f"text: the stream's text is over the limit of {limit} characters", "text_too_long", "text"))
        sentences, stream.text = complete_sentences(stream.text + text)
        for sentence in sentences:
            await self._queue_sentence(stream, sentence)

    async def stop_stream(self) -> None:
        stream = self.stream
        if stream is None:
            await self.send(Error("synthesize-stop without synthesize-start", "no_stream"))
            return
        if not stream.failed and stream.text.strip():
            await self._queue_sentence(stream, stream.text)
        stream.text = ""
        end = asyncio.ensure_future(stream.queue.put(None))
        await asyncio.wait({end, stream.player}, return_when=asyncio.FIRST_COMPLETED)
        end.cancel()  # done already, or the player is gone and nobody takes it
        await stream.player
        self.stream = None
        await self.send(SynthesizeStopped())

    async def _queue_sentence(self, stream: Stream, sentence: str) -> None:
        if stream.failed or not any(ch.isalnum() for ch in sentence):
            return
        record = AccessRecord(id=uuid.uuid4().hex[:16])
        try:
            synthesis = await self.plan(record, sentence, stream.voice, stream.speaker, progressive=stream.cycles == 0)
        except HttpError as exc:
            record.fail(exc.message, exc.kind)
            account(self.runtime, record, endpoint="wyoming", method="WYOMING", path="synthesize-chunk",
                    status=exc.status, synthesis=True)
            return await self._fail_stream(stream, exc)
        stream.cycles += 1
        put = asyncio.ensure_future(stream.queue.put((synthesis, record, stream.cycles > 1)))
        # A full queue waits for the player; a player that died (client gone) ends the wait.
        await asyncio.wait({put, stream.player}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            synthesis.cancel()
            stream.player.result()  # raises why the player stopped

    async def _player(self, stream: Stream) -> None:
        """Plays the stream's sentences in order, one audio cycle each."""
        async def fail(exc: HttpError) -> None:
            await self._fail_stream(stream, exc)

        while (item := await stream.queue.get()) is not None:
            synthesis, record, pause_first = item
            async with self.accounted(record, "synthesize-chunk", fail) as outcome:
                if stream.failed:
                    synthesis.cancel()
                    outcome.status = 499
                    record.fail("stream failed before this sentence", "cancelled")
                    continue
                await self.unless_gone(self.play(synthesis, record, _pause(synthesis) if pause_first else None))

    async def _fail_stream(self, stream: Stream, exc: HttpError) -> None:
        if not stream.failed:
            stream.failed = True
            await self.send(Error(exc.message, exc.kind))

    async def _end_stream(self) -> None:
        """The connection is over: stop the player and cancel every queued sentence."""
        stream, self.stream = self.stream, None
        if stream is None or stream.player is None:
            return
        stream.failed = True
        stream.player.cancel()
        with contextlib.suppress(BaseException):
            await stream.player
        while not stream.queue.empty():
            item = stream.queue.get_nowait()
            if item is not None:
                item[0].cancel()


def _pause(synthesis: Synthesis) -> np.ndarray:
    from ..models import silence

    return silence(synthesis.sample_rate)


def event_text(event: Event, name: str, empty_ok: bool = False) -> str:
    text = event.data.get("text")
    if not isinstance(text, str) or not (text or empty_ok):
        raise HttpError(422, f"{name} needs 'text' (a string)", "invalid_request_error", "text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HttpError(422, f"text: contains a lone UTF-16 surrogate at character {exc.start}",
                        "invalid_request_error", "text") from None
    return text


class WyomingServer:
    """The Wyoming listeners (sockets opened by listeners.py) and their connections."""

    def __init__(self, runtime: Runtime, sockets: list):
        self.runtime, self.sockets = runtime, sockets
        self.limits = WireLimits.for_text(runtime.config.max_chars)
        self.allowed = runtime.config.wyoming_networks()
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        for sock in self.sockets:
            self.servers.append(await asyncio.start_server(self._connected, sock=sock, limit=self.limits.max_line))
        if self.sockets:
            log.info("wyoming listening", sockets=[_name(s) for s in self.sockets])

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(self.connections, timeout=10)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            peer = writer.get_extra_info("peername")
            if isinstance(peer, tuple) and not self._admitted(peer[0]):
                log.warning("wyoming client refused: address not in wyoming_allow", peer=peer[0])
                with contextlib.suppress(ConnectionError, TimeoutError):
                    async with asyncio.timeout(5):
                        await async_write_event(Error(f"address {peer[0]} is not allowed (wyoming_allow)",
                                                      "forbidden").event(), writer)
                writer.close()
                return
            await Connection(self.runtime, reader, writer, self.limits, str(peer or "unix")).run()
        finally:
            self.connections.discard(task)

    def _admitted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allowed)


def _name(sock) -> str:
    name = sock.getsockname()
    return f"tcp://{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix://{name}"

