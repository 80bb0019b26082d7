"""Scheduler invariants checked in-process without an engine: the worker survives whatever
state its queue is left in by cancellations."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import pytest

from runtime.engine import SynthesisRequest
from runtime.models import LoadedModel, ModelHolder
from runtime.scheduler import Scheduler
from tts_testkit.waits import wait_until

pytestmark = pytest.mark.unit


def test_a_job_waiting_for_a_cancelled_first_sentence_is_dropped_and_the_worker_lives(tmp_path):
    """A stream's later sentences wait for its first (`after`). When only the first is
    cancelled (a client gone between the first sentence's cancellation and the rest's), the
    worker used to ask the cancelled future for its exception, which raises CancelledError,
    and the inference worker thread died: every later request timed out. The hold file keeps
    the worker from starting a batch until the state is set up; no engine is needed, since
    nothing is left to synthesize (the model's engine is a bare object, never called)."""
    hold = tmp_path / "hold"
    hold.touch()
    sched = Scheduler(ModelHolder(), max_wait_ms=0, queue_size=10, hold_file=str(hold))
    sched.start()
    try:
        requests = [SynthesisRequest((1, 2, 3), seed=i) for i in range(3)]
        model = LoadedModel("joe", engine=object(), snapshot=None)  # type: ignore[arg-type]
        jobs = sched.submit("joe", requests, time.monotonic() + 600, first_alone=True, model=model)
        assert all(j.after is jobs[0] for j in jobs[1:])
        sched.cancel(jobs[:1])
        hold.unlink()  # the worker looks at its queue again
        wait_until(lambda: all(j.future.done() for j in jobs[1:]), 60, what="the followers to be dropped")
        for job in jobs[1:]:
            with pytest.raises(CancelledError):
                job.future.result(timeout=0)
        assert sched.alive()
        assert sched.depth == 0
    finally:
        sched.stop()
