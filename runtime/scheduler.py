"""Bounded queue + one inference worker thread with dynamic batching.

A job is one utterance (a sentence, or a piece of a long one) of one request. Jobs wait
in a bounded list; admission is all-or-nothing per request, and a full queue is
`QueueFull` (503 + Retry-After), never an unbounded backlog. The bound is on what one request
cannot exhaust alone: queued requests (`queue_size`) and queued work in phoneme ids
(`queue_ids`, at least max_request_ids + express_max_ids, so a short request still fits
beside the largest one). Each job carries its own seed; the engine is batch-invariant per
seed, so batching never changes a request's audio, and results go back through each job's
own future.

One version per request: a job runs on the engine its request was planned with
(`Job.model`), never on whichever is loaded when its batch starts, and holds a reference on
it (ModelHolder.acquire/release) so a replaced engine is closed only after its last job.

Batches (the worker thread is the only place engine calls happen):
* Turn-taking: the next batch is anchored at the request that has waited longest since
  its last batch finished (or since it arrived), so a short request waits behind at most
  about one batch of a long one, never behind all of it, and no request starves.
* Cost bound: a batch's padded size (longest utterance x batch size) stays within
  `max_batch_ids` - one utterance alone always runs, and the front end bounds that
  (`max_utterance_ids`). Batch-mates are the jobs of the same engine closest in length to
  the anchor, never one that would pad the batch past `MATE_STRETCH` x the anchor's length,
  so a long utterance never drags short ones into a huge tensor.

Overtaking (CPU engines): a short request (at most `express_max_ids` phoneme ids in all) does
not wait for a long batch in progress. A second thread runs it at once on lanes of its own while
the long batch's lanes stand paused at their next checkpoint (Engine.synthesize_batch with
express=True), then the long batch goes on exactly where it stopped - the same computation,
so nobody's audio changes. Both batches stay within `max_batch_ids`, so memory is at most two
bounded batches.

Share of short requests: while long work is queued or running, short requests - overtaking or
taking their turn - get at most as much of the worker's time as long ones (plus up to
`SHORT_CREDIT_S` the long work ran ahead), so any flood of short requests slows a long one at
most about 2x; past its share a short request waits for its turn like any other.

Deadlines: a job whose deadline passed before it ran is failed with
`DeadlineExceeded` and dropped; a cancelled job (client gone, or the handler gave up)
is skipped; `extend` moves the deadline of a stream that makes progress. A job may wait for
another job (`after`) - streaming uses that to send its first sentence alone and the rest
together. CUDA out-of-memory handling (halve the batch, CPU fallback) lives in the engine.

Hold (fault drills and tests): while the file named by $TTS_RUNTIME_HOLD_FILE exists, the
worker starts no batch - or, when the file holds a number N, N more batches and then none.
Requests queue, time out and are refused exactly as behind a stalled worker, whatever the
machine's speed; the watchdog still sees a live worker.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import structlog

from tts_common.errors import TtsError

from .engine_api import SynthesisEngine
from .models import LoadedModel, ModelHolder

if TYPE_CHECKING:
    import numpy as np

    from .engine import SynthesisRequest

log = structlog.get_logger(__name__)

IDLE_TICK_S = 0.5  # the worker wakes at least this often (heartbeat for the watchdog)
HOLD_FILE_ENV = "TTS_RUNTIME_HOLD_FILE"
MATE_STRETCH = 1.25  # a batch-mate may pad the anchor's batch to at most this x its length
# How far long work may run ahead of short requests' share and still count: a long request that
# ran alone for minutes does not bank minutes for a later flood of short ones to spend at once.
SHORT_CREDIT_S = 1.0


class QueueFull(TtsError):
    def __init__(self, retry_after: int):
        super().__init__(f"queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


class DeadlineExceeded(TtsError):
    pass


class ModelUnavailable(TtsError):
    pass


class ModelReplaced(ModelUnavailable):
    """The engine a request was planned with was replaced before its jobs were queued: plan
    it again on the new one."""


class WorkerStopped(TtsError):
    pass


@dataclass(eq=False)
class Job:
    voice: str
    request: SynthesisRequest
    deadline: float  # time.monotonic(); a stream's moves on as it makes progress (Scheduler.extend)
    after: "Job | None" = None
    # Set for a stream's first sentence: called from the worker thread with the first piece of
    # audio as soon as it exists (see Engine.synthesize_progressive); such a job runs alone.
    on_first_piece: Callable[[np.ndarray], None] | None = None
    group: int = 0  # the request it belongs to (turn-taking is per request)
    request_ids: int = 0  # phoneme ids of that whole request (which requests may overtake)
    model: LoadedModel | None = None  # the engine its request was planned with: it runs there
    short: bool = False  # its request is short (request_ids <= express_max_ids): may overtake
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None

    @property
    def length(self) -> int:
        return len(self.request.phoneme_ids)

    @property
    def queue_seconds(self) -> float:
        return ((self.started or time.monotonic()) - self.enqueued)

    def eligible(self) -> bool:
        return self.after is None or self.after.future.done()


class Scheduler:
    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_batch_size: int = 8,
        max_batch_ids: int = 2400,
        max_wait_ms: float = 10.0,
        queue_size: int = 64,
        queue_ids: int = 1_000_000,
        express_max_ids: int = 0,
        on_batch: Callable[[int, float], None] | None = None,  # (batch size, seconds)
        hold_file: str | None = None,
    ):
        self.holder = holder
        self.express_max_ids = express_max_ids
        self.hold_file = hold_file if hold_file is not None else os.environ.get(HOLD_FILE_ENV) or None
        self.max_batch_size = max_batch_size
        self.max_batch_ids = max_batch_ids
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size  # queued requests
        self.queue_ids = queue_ids  # queued phoneme ids, all requests
        self.on_batch = on_batch
        self._pending: list[Job] = []
        self._groups = 0
        self._last_turn: dict[int, float] = {}  # request -> when its last batch finished
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._express_thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.batch_started: float | None = None
        self._batch_long = False  # the batch in progress serves long work
        self._express_spent = 0.0  # overtaking time during the batch in progress
        # worker seconds given to short and to long requests while long work was waiting
        self._short_s = 0.0
        self._long_s = 0.0
        self.overtakes = 0  # express batches run (status)
        self.batches_served = 0
        self.jobs_served = 0
        # the largest work the engine has been given (status/metrics; tests check the bounds)
        self.longest_utterance = 0
        self.largest_batch_ids = 0
        self._batch_seconds = 0.5  # moving average, for Retry-After

    # -- client side (event loop) -------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def queued_requests(self) -> int:
        return len({j.group for j in self._pending})

    @property
    def queued_ids(self) -> int:
        return sum(j.length for j in self._pending)

    def retry_after(self) -> int:
        batches_ahead = max(1, math.ceil(self.depth / self.max_batch_size))
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def submit(self, voice: str, requests: list[SynthesisRequest], deadline: float, *, first_alone: bool = False,
               on_first_piece: Callable[[np.ndarray], None] | None = None,
               model: LoadedModel | None = None) -> list[Job]:
        """Queue one request's utterances, all or none, to run on `model` (the engine they were
        planned with, on which the caller holds a reference; default: the voice's engine now).
        With first_alone the later sentences
        wait until the first is done (streaming: early first byte). With on_first_piece the
        first sentence runs alone and hands out its first piece of audio before the rest of it
        is decoded. ModelReplaced: the voice's engine was replaced meanwhile (default model)."""
        if not requests:
            return []
        leased = model is not None
        model = model if leased else self.holder.get(voice)
        if model is None:
            raise ModelUnavailable(f"voice {voice!r} is not loaded")
        with self._cond:
            if self._stop:
                raise WorkerStopped("the inference worker is stopping")
            total = sum(len(req.phoneme_ids) for req in requests)
            self._check_room(total)
            if not self.holder.acquire(model, len(requests), retired_ok=leased):
                raise ModelReplaced(f"voice {voice!r} {model.version} was replaced; plan again")
            self._groups += 1
            short = 0 < total <= self.express_max_ids
            jobs = [Job(voice, req, deadline, group=self._groups, request_ids=total, model=model, short=short)
                    for req in requests]
            jobs[0].on_first_piece = on_first_piece
            for job in jobs:
                job.future.add_done_callback(lambda _f, m=model: self.holder.release(m))
            if first_alone:
                for job in jobs[1:]:
                    job.after = jobs[0]
            self._pending.extend(jobs)
            self._cond.notify_all()  # the worker, and the express worker if a batch is running
        return jobs

    def _check_room(self, ids: int) -> None:
        """Under the lock: QueueFull unless one more request of `ids` ids fits. Anything fits an
        empty queue (a request over queue_ids alone is still admitted there)."""
        if not self._pending:
            return
        if self.queued_requests + 1 > self.queue_size or self.queued_ids + ids > self.queue_ids:
            raise QueueFull(self.retry_after())

    def extend(self, jobs: list[Job], deadline: float) -> None:
        """Move the deadline of jobs not yet run to `deadline` (a stream that made progress)."""
        with self._cond:
            for job in jobs:
                job.deadline = max(job.deadline, deadline)

    def cancel(self, jobs: list[Job]) -> None:
        """Drop jobs that have not started (client gone or gave up)."""
        with self._cond:
            for job in jobs:
                if job.future.cancel():
                    try:
                        self._pending.remove(job)
                    except ValueError:
                        pass
            self._cond.notify()

    # -- worker ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._thread.start()
        if self.express_max_ids > 0:
            self._express_thread = threading.Thread(target=self._run, args=(True,), name="express-worker",
                                                    daemon=True)
            self._express_thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            leftover, self._pending = self._pending, []
            self._cond.notify_all()
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerStopped("the runtime is shutting down"))
        for thread in (self._thread, self._express_thread):
            if thread:
                thread.join(timeout=timeout)

    def alive(self, stuck_after: float = 300.0) -> bool:
        """The worker thread runs and is either idle-ticking or inside a batch that has
        not been running for an absurd time."""
        if self._thread is None or not self._thread.is_alive():
            return False
        if self._express_thread is not None and not self._express_thread.is_alive():
            return False
        started = self.batch_started
        if started is not None:
            return time.monotonic() - started < stuck_after
        return time.monotonic() - self.heartbeat < max(10 * IDLE_TICK_S, 5.0)

    def _run(self, express: bool = False) -> None:
        next_batch = self._next_express if express else self._next_batch
        while True:
            batch = next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch, express)

    def held(self) -> bool:
        """The hold file exists and allows no more batches (see the module's doc)."""
        return self.hold_file is not None and os.path.exists(self.hold_file) and self._hold_allows() == 0

    def _hold_allows(self) -> int | None:
        """How many more batches the hold file allows (None: no limit, it holds no number)."""
        try:
            text = open(self.hold_file).read().strip()  # type: ignore[arg-type]
        except OSError:
            return None
        return int(text) if text.isdigit() else 0

    def _take_hold_ticket(self) -> bool:
        """Under the lock, as a batch is about to start: False when held; with a counted hold,
        one batch of its count is used up."""
        if self.hold_file is None or not os.path.exists(self.hold_file):
            return True
        left = self._hold_allows()
        if left is None:
            return True
        if left <= 0:
            return False
        with open(self.hold_file, "w") as fh:  # the drill's own file: the next batch sees one less
            fh.write(str(left - 1))
        return True

    def _drop_dead(self, now: float) -> None:
        keep = []
        for job in self._pending:
            if job.future.cancelled():
                continue
            if now >= job.deadline:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            first = job.after.future if job.after is not None else None
            if first is not None and first.cancelled():
                # the stream's first sentence was cancelled (its client is gone): so are the rest.
                # Asking a cancelled future for its exception raises, which killed this worker.
                job.future.cancel()
                continue
            if first is not None and first.done() and first.exception() is not None:
                # the stream's first sentence failed: the rest would be wasted work
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(first.exception())
                continue
            keep.append(job)
        self._pending = keep

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self.heartbeat = time.monotonic()
                if self._stop:
                    return None
                self._drop_dead(time.monotonic())
                eligible = [j for j in self._pending if j.eligible()]
                if eligible and not self.held():
                    break
                self._cond.wait(IDLE_TICK_S)
            anchor = self._anchor(self._turn_candidates(eligible))
            # Wait a little for batch-mates, measured from the anchor's arrival (a progressive
            # job takes none: it is there for its first byte).
            fill_until = anchor.enqueued + (0.0 if anchor.on_first_piece else self.max_wait)
            while not self._stop:
                same = [j for j in self._pending if j.model is anchor.model and j.eligible()]
                left = fill_until - time.monotonic()
                if len(same) >= self.max_batch_size or left <= 0:
                    break
                self._cond.wait(left)
            self._drop_dead(time.monotonic())
            eligible = [j for j in self._pending if j.eligible()]
            if not eligible or not self._take_hold_ticket():
                return []
            if not any(j is anchor for j in eligible):  # cancelled or expired meanwhile
                anchor = self._anchor(self._turn_candidates(eligible))
            chosen = self._fill(anchor, [j for j in eligible if j.model is anchor.model])
            return self._take(chosen)

    def _take(self, chosen: list[Job]) -> list[Job]:
        """Under the lock: the chosen jobs leave the queue; those not cancelled meanwhile run."""
        picked = set(map(id, chosen))
        self._pending = [j for j in self._pending if id(j) not in picked]
        return [j for j in chosen if j.future.set_running_or_notify_cancel()]

    def _anchor(self, eligible: list[Job]) -> Job:
        """The first job of the request whose turn it is: the one waiting longest since its
        last batch finished (a new request: since it arrived)."""
        def waited_since(job: Job) -> tuple[float, int]:
            return (self._last_turn.get(job.group, job.enqueued), job.group)

        return min(eligible, key=waited_since)  # min keeps the first of equals: queue order

    def _turn_candidates(self, eligible: list[Job]) -> list[Job]:
        """Whose turn it may be: everyone's, unless short requests have had their share of the
        worker's time while long work waits - then only long work's."""
        if self._short_wait(time.monotonic()) <= 0:
            return eligible
        longs = [j for j in eligible if not j.short]
        return longs or eligible

    def _fill(self, anchor: Job, candidates: list[Job]) -> list[Job]:
        """The anchor plus batch-mates, within max_batch_size and max_batch_ids."""
        if anchor.on_first_piece is not None:
            return [anchor]
        cap = max(anchor.length * MATE_STRETCH, anchor.length + 8)
        others = sorted((j for j in candidates if j is not anchor and j.on_first_piece is None and j.length <= cap),
                        key=lambda j: (abs(j.length - anchor.length), j.enqueued))
        chosen, padded = [anchor], anchor.length
        for job in others:
            if len(chosen) >= self.max_batch_size:
                break
            width = max(padded, job.length)
            if width * (len(chosen) + 1) <= self.max_batch_ids:
                chosen.append(job)
                padded = width
        return chosen

    def _execute(self, batch: list[Job], express: bool = False) -> None:
        longest = max(job.length for job in batch)
        self.longest_utterance = max(self.longest_utterance, longest)
        self.largest_batch_ids = max(self.largest_batch_ids, longest * len(batch))
        now = time.monotonic()
        with self._cond:
            if not express:
                self.batch_started, self._express_spent = now, 0.0
                self._batch_long = not all(job.short for job in batch)
                self._cond.notify_all()  # a short request already queued may overtake now
        for job in batch:
            job.started = now
        try:
            with (self.holder.express_lock if express else self.holder.lock):
                model = batch[0].model
                if model is None or model.closed:
                    raise ModelUnavailable(f"voice {batch[0].voice!r} is not loaded")
                waves = self._synthesize(model.engine, batch, express)
            finished = time.monotonic()
            self._took_turn(batch, finished)
            self._account(batch, express, finished - now)
            for job, wave in zip(batch, waves):
                job.finished = finished
                job.future.set_result(wave)
            if self.on_batch:
                self.on_batch(len(batch), finished - now)
        except Exception as exc:
            self._took_turn(batch, time.monotonic())
            log.error("batch failed", voice=batch[0].voice, size=len(batch), error=f"{type(exc).__name__}: {exc}")
            for job in batch:
                job.finished = time.monotonic()
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            if not express:
                self.batch_started = None
            self.heartbeat = time.monotonic()
            with self._cond:
                self._cond.notify_all()  # the express worker watches batches start and end

    def _account(self, batch: list[Job], express: bool, elapsed: float) -> None:
        """A batch is done: count its time to short or long work (the share rule) and stats."""
        with self._cond:
            if express:
                self._express_spent += elapsed
                self.overtakes += 1
                self._short_s += elapsed
            else:
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
                if self._batch_long:  # less the time it stood paused for overtaking
                    self._long_s += max(0.0, elapsed - self._express_spent)
                else:
                    self._short_s += elapsed
            self._short_s = max(self._short_s, self._long_s - SHORT_CREDIT_S)
            self.batches_served += 1
            self.jobs_served += len(batch)

    def _took_turn(self, batch: list[Job], when: float) -> None:
        with self._cond:
            for job in batch:
                self._last_turn[job.group] = when
            # forget requests with nothing left queued (the table stays as small as the queue)
            waiting = {j.group for j in self._pending}
            for group in [g for g in self._last_turn if g not in waiting]:
                del self._last_turn[group]

    def _synthesize(self, engine: SynthesisEngine, batch: list[Job], express: bool = False) -> list[np.ndarray]:
        # CUDA out-of-memory (halve and retry, CPU fallback) is handled inside the engine.
        extra = {"express": True} if express else {}
        if len(batch) == 1 and batch[0].on_first_piece is not None:
            return [engine.synthesize_progressive(batch[0].request, batch[0].on_first_piece, **extra)]
        return list(engine.synthesize_batch([job.request for job in batch], **extra))

    # -- the share of short requests, and overtaking ---------------------------------------
    def _short_wait(self, now: float) -> float:
        """Under the lock: 0 when a short request may run now, else how much longer long work
        must run first (short requests get at most the time long ones had while they wait)."""
        long_running = self.batch_started is not None and self._batch_long
        if not long_running and not any(not j.short for j in self._pending):
            self._short_s = self._long_s = 0.0  # no long work: nothing to share with
            return 0.0
        long_s = self._long_s
        if long_running:
            long_s += max(0.0, now - self.batch_started - self._express_spent)  # type: ignore[operator]
        return max(0.0, self._short_s - long_s)

    def express_allowed(self, now: float) -> bool:
        """A batch is in progress and short requests have not used up their share."""
        return self.batch_started is not None and self._short_wait(now) <= 0

    def _can_overtake(self, job: Job) -> bool:
        if not job.short or not job.eligible() or job.model is None:
            return False
        return getattr(job.model.engine, "can_overtake", False)

    def _next_express(self) -> list[Job] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                now = time.monotonic()
                wait = IDLE_TICK_S
                if self.batch_started is not None and not self.held():
                    self._drop_dead(now)
                    short = [j for j in self._pending if self._can_overtake(j)]
                    if short:
                        behind = self._short_wait(now)
                        if behind <= 0 and self._take_hold_ticket():
                            break
                        wait = min(wait, max(0.001, behind))  # the long batch's share first
                self._cond.wait(wait)
            anchor = self._anchor(short)
            return self._take(self._fill(anchor, [j for j in short if j.model is anchor.model]))
