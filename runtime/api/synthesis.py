"""The synthesis service: text -> phoneme ids -> jobs on the scheduler -> audio, for any front end.

Nothing here knows HTTP but its error type: `admit` and `prepare` check a request and plan its
utterances, a `Synthesis` queues them, waits for them (the deadline, and the client going away,
cancel what is left) and hands out a stream's audio in order. Refusals are HttpError; their
`kind` is what a front end without HTTP statuses passes on.

Promises every front end inherits:
* One version per request: the engine that planned the text (phoneme ids) synthesizes every
  utterance of it, and `Synthesis.version` names it; a hot swap between planning and queueing
  plans the request again on the new engine (ModelHolder keeps a replaced engine for its
  queued work).
* Deadlines: a request must have its audio (a stream: its first audio) within deadline_s of
  its admission. A stream that has started is not cut while it makes progress: the rest has
  until deadline_s after its latest audio was handed out (or its first deadline, if later).
* A stream never ends as if complete when it is not: `Synthesis.audio` raises `StreamBroken`
  instead, and the front end must end the stream so its client sees an error (HTTP: abort the
  connection without the final chunk), never as a finished answer.

Nothing here calls the engine: text goes to phoneme ids on the single frontend thread (espeak
is not thread-safe), utterances go to the scheduler's worker thread, and the event loop only
waits on futures.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple

import numpy as np
import structlog

from tts_common.errors import TtsError

from ..models import LoadedModel, join_sentences, plan_utterances, silence
from ..scheduler import DeadlineExceeded, Job, ModelUnavailable, QueueFull, WorkerStopped
from .errors import HttpError
from .service import Runtime

log = structlog.get_logger(__name__)


class ClientGone(TtsError):
    """The client went away while its request waited: its work is cancelled."""


class StreamBroken(TtsError):
    """A stream that had started cannot deliver the rest of its audio (`error` says why). The
    front end must end it so its client sees an error, never as a complete answer."""

    def __init__(self, error: HttpError, delivered: int, total: int):
        super().__init__(f"stream aborted after {delivered} of {total} utterances: {error.message}")
        self.error, self.delivered, self.total = error, delivered, total


REPLAN_TRIES = 3  # hot swaps while one request is being planned (each needs a whole model load)


def admit(runtime: Runtime, text: str, voice: str, param: str) -> LoadedModel:
    """The loaded voice for a request whose text is non-empty and within max_chars (`param`
    names the field that carried the text)."""
    if not text.strip():
        raise HttpError(422, f"{param}: text is empty", "invalid_request_error", param)
    if len(text) > runtime.config.max_chars:
        raise HttpError(413, f"{param}: text is {len(text)} characters, over the limit of {runtime.config.max_chars}",
                        "text_too_long", param)
    if voice not in runtime.config.models:
        raise HttpError(404, f"unknown voice {voice!r}; available: {', '.join(runtime.config.models)}",
                        "unknown_voice", "voice", voices=list(runtime.config.models))
    model = runtime.manager.holder.get(voice)
    if model is None:
        raise HttpError(503, f"not ready: {runtime.manager.reasons.get(voice) or 'loading'}", "not_ready",
                        headers={"Retry-After": "5"})
    return model


async def prepare(runtime: Runtime, model: LoadedModel, voice: str, text: str, param: str,
                  speaker_param: str = "speaker", **scales: Any) -> Synthesis:
    """Plan the text's utterances (on the frontend thread); the deadline starts now. `scales`:
    seed, speaker, length_scale, noise_scale, noise_w, speed, as plan_utterances takes them.
    The plan holds a reference on the engine that made it (released once its jobs are queued);
    an engine replaced while planning is planning again on the new one."""
    deadline = time.monotonic() + runtime.config.deadline_s
    holder = runtime.manager.holder
    for _ in range(REPLAN_TRIES):
        requests, pauses = await _plan(runtime, model, text, param, speaker_param, scales)
        if holder.acquire(model):
            synthesis = Synthesis(runtime, voice, model, requests, pauses, deadline)
            synthesis.lease = weakref.finalize(synthesis, holder.release, model)
            return synthesis
        model = admit(runtime, text, voice, param)  # replaced while planning: the new engine
    raise HttpError(503, f"voice {voice!r} was replaced {REPLAN_TRIES} times while planning", "not_ready",
                    headers={"Retry-After": "1"})


async def _plan(runtime: Runtime, model: LoadedModel, text: str, param: str, speaker_param: str,
                scales: dict[str, Any]) -> tuple[list, list]:
    from ..engine import UnknownSpeakerError
    from ..frontend import EmptyTextError, TextTooLongError

    try:
        requests, pauses = await runtime.frontend(plan_utterances, model.engine, text, **scales)
    except UnknownSpeakerError as exc:
        raise HttpError(404, f"{speaker_param}: {exc}", "unknown_speaker", speaker_param) from None
    except TextTooLongError as exc:
        raise HttpError(413, f"{param}: {exc}", "text_too_long", param) from None
    except EmptyTextError as exc:
        raise HttpError(422, f"{param}: {exc}", "invalid_request_error", param) from None
    if not requests:
        raise HttpError(422, f"{param}: nothing to speak in this text", "invalid_request_error", param)
    total = sum(len(r.phoneme_ids) for r in requests)
    limit = runtime.config.max_request_ids
    if total > limit:  # its audio and its time on the worker grow with it: refuse before queueing
        raise HttpError(413, f"{param}: text is {total} phoneme ids, over the limit of {limit} (max_request_ids)",
                        "text_too_long", param, limit={"max_request_ids": limit, "phoneme_ids": total})
    return requests, pauses


def job_error(exc: BaseException) -> HttpError:
    """What a failed job (scheduler or engine) means for the request."""
    if isinstance(exc, DeadlineExceeded):
        return HttpError(504, "synthesis did not finish within the deadline", "deadline_exceeded")
    if isinstance(exc, (ModelUnavailable, WorkerStopped)):
        return HttpError(503, str(exc), "not_ready", headers={"Retry-After": "5"})
    from ..engine import EngineOOMError  # lazily: torch is loaded by then

    if isinstance(exc, EngineOOMError):  # halving the batch did not help; the worker goes on
        log.error("synthesis out of memory", error=str(exc))
        return HttpError(503, f"insufficient memory: {exc}", "insufficient_memory", headers={"Retry-After": "10"})
    log.error("synthesis failed", error=f"{type(exc).__name__}: {exc}")
    return HttpError(500, f"synthesis failed: {type(exc).__name__}", "synthesis_error")


class Piece(NamedTuple):
    """A stream's audio as it comes: `partial` for the early start of the first sentence (its
    rest follows), else a sentence (or its rest) with the pause after it; `last` ends the request."""

    wave: np.ndarray
    last: bool
    partial: bool


@dataclass(eq=False)
class Synthesis:
    """One request's planned utterances on the scheduler, and what has become of them."""

    runtime: Runtime
    voice: str
    model: LoadedModel  # the engine that planned it; every utterance runs on it
    requests: list  # runtime.engine.SynthesisRequest, one per utterance
    pauses: list  # the pause after each utterance (none after the pieces of a cut sentence)
    deadline: float  # time.monotonic(); a stream's moves on with its progress
    jobs: list[Job] = field(default_factory=list)
    stream: bool = False  # its first utterance runs alone and is awaited alone
    early: asyncio.Future | None = None  # a progressive stream's first piece, once the worker has it
    done: int = 0  # utterances handed out by audio()
    lease: Callable[[], Any] | None = None  # releases prepare()'s reference on the engine, once

    @property
    def sample_rate(self) -> int:
        return self.model.engine.sample_rate

    @property
    def version(self) -> str:
        """The voice version that synthesizes this request, from phonemes to samples."""
        return self.model.version

    def submit(self, *, stream: bool = False, progressive: bool = False) -> None:
        """Queue every utterance, all or none, on the engine that planned them. A stream's first
        runs alone, for an early first byte; `progressive`: its first piece of audio comes back
        (`early`) before it is whole."""
        self.stream = stream
        on_first_piece = None
        if progressive:
            loop = asyncio.get_running_loop()
            early = self.early = loop.create_future()

            def on_first_piece(piece: np.ndarray) -> None:  # the worker thread
                try:
                    loop.call_soon_threadsafe(lambda: early.done() or early.set_result(piece))
                except RuntimeError:  # the loop has closed (shutdown): nobody is waiting for the piece
                    pass
        try:
            self.jobs = self.runtime.scheduler.submit(self.voice, self.requests, self.deadline, first_alone=stream,
                                                      on_first_piece=on_first_piece, model=self.model)
        except QueueFull as exc:
            raise HttpError(503, str(exc), "queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        except WorkerStopped as exc:
            raise HttpError(503, str(exc), "shutting_down", headers={"Retry-After": "5"}) from None
        finally:
            if self.lease is not None:  # the queued jobs hold their own references now
                self.lease()

    def cancel(self, jobs: list[Job] | None = None) -> None:
        self.runtime.scheduler.cancel(self.jobs if jobs is None else jobs)

    def progress(self) -> None:
        """Audio went out: the rest of a stream has until deadline_s from now, or its deadline so
        far if that is later (see the module's doc)."""
        self.deadline = max(self.deadline, time.monotonic() + self.runtime.config.deadline_s)
        self.runtime.scheduler.extend(self.jobs[self.done:], self.deadline)

    async def first(self, client_gone: Callable[[], Awaitable[None]] | None = None) -> list[np.ndarray]:
        """The first wait: every utterance's audio, or a stream's first sentence (or only its
        first piece). On any failure every job is cancelled; a job's failure is an HttpError."""
        try:
            return await self.wait(self.jobs[:1] if self.stream else self.jobs, client_gone, self.early)
        except BaseException as exc:
            self.cancel()
            if isinstance(exc, Exception) and not isinstance(exc, ClientGone):
                raise job_error(exc) from None
            raise

    async def wait(self, jobs: list[Job], client_gone: Callable[[], Awaitable[None]] | None = None,
                   early: asyncio.Future | None = None) -> list[np.ndarray]:
        """Wait for jobs; cancel them if the client goes away (`client_gone` returns) or the
        deadline passes. With `early` (a stream's first piece), return [that piece] as soon as
        it comes, the jobs running on. Audio that is ready is handed out, even past the deadline."""
        if all(job.future.done() and not job.future.cancelled() for job in jobs):
            return [job.future.result() for job in jobs]  # a failed job raises its error
        gathered = asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        watchers = {gathered} if early is None else {gathered, early}
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        if gone is not None:
            watchers.add(gone)
        try:
            done, _ = await asyncio.wait(watchers, timeout=max(0.0, self.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                return gathered.result()
            if early is not None and early in done:
                return [early.result()]
            if gone is not None and gone in done:
                raise ClientGone()
            raise DeadlineExceeded("deadline passed")
        finally:
            if gone is not None:
                gone.cancel()
            first_piece_out = early is not None and early.done()  # then the jobs run on for the rest
            if not gathered.done() and not first_piece_out:
                self.cancel(jobs)
                gathered.cancel()
                try:
                    await gathered
                except BaseException:
                    pass

    def joined(self, waves: list[np.ndarray]) -> np.ndarray:
        """The whole request's audio from every utterance's, with the pauses between sentences."""
        return join_sentences(waves, self.sample_rate, self.pauses)

    async def audio(self, first: list[np.ndarray]) -> AsyncIterator[Piece]:
        """A stream's audio in order, from `first` (what first() returned) on; `done` counts the
        utterances handed out. Ends only once the last utterance is out: any failure on the way
        (the deadline without progress, a failed job) is StreamBroken, the rest cancelled."""
        try:
            async for piece in self._pieces(first):
                yield piece
        except Exception as exc:  # (a client gone is CancelledError/GeneratorExit: not caught here)
            err = exc if isinstance(exc, HttpError) else job_error(exc)
            raise StreamBroken(err, self.done, len(self.jobs)) from None
        finally:
            self.cancel(self.jobs[self.done:])

    async def _pieces(self, first: list[np.ndarray]) -> AsyncIterator[Piece]:
        self.progress()
        for i, job in enumerate(self.jobs):
            wave = first[0] if i == 0 else (await self.wait([job]))[0]
            if i == 0 and self.early is not None and self.early.done() and wave is self.early.result():
                yield Piece(wave, last=False, partial=True)  # only the first piece so far
                self.progress()
                wave = (await self.wait([job]))[0][len(wave):]
            if i < len(self.jobs) - 1 and self.pauses[i]:
                wave = np.concatenate([wave, silence(self.sample_rate, self.pauses[i])])
            yield Piece(wave, last=i == len(self.jobs) - 1, partial=False)
            self.done = i + 1
            self.progress()
