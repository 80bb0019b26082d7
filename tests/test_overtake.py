"""Short requests overtake a long batch in progress (runtime/scheduler.py "Overtaking").

No verdict depends on speed: the long batch is held at its lanes' next checkpoint by a
pause this test holds itself (Lanes.paused, the mechanism the express worker uses), so
"the short request finished while the long batch was still running" is a fact the test
makes, not a race it hopes to win. The real voice and engine; audio compared bit for bit
with each request synthesized alone.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from runtime.engine import SynthesisRequest
from runtime.models import LoadedModel, ModelHolder
from runtime.scheduler import SHORT_CREDIT_S, Scheduler
from tts_testkit.waits import wait_until

# In-process, but three real-engine batches held mid-way across threads take ~8 s: over the unit
# budget (docs/testing.md), so integration.
pytestmark = pytest.mark.integration


def _scheduler(engine, **kw) -> Scheduler:
    holder = ModelHolder()
    holder._models["joe"] = LoadedModel("joe", engine, None)  # type: ignore[arg-type]
    sched = Scheduler(holder, max_wait_ms=0, queue_size=100, max_batch_size=8, max_batch_ids=800, **kw)
    sched.start()
    return sched


def test_a_short_request_overtakes_a_paused_long_batch_and_no_audio_changes(engine):
    long_ids = engine.frontend.to_ids(" ".join(["overtaking"] * 30))
    short_ids = engine.frontend.to_ids("Hello there.")
    long_req = SynthesisRequest(long_ids, seed=3)
    short_req = SynthesisRequest(short_ids, seed=4)
    alone_long, alone_short = engine.synthesize_batch([long_req])[0], engine.synthesize_batch([short_req])[0]
    assert engine.can_overtake and len(long_ids) > 240 >= len(short_ids)

    sched = _scheduler(engine, express_max_ids=240)
    try:
        deadline = time.monotonic() + 600
        with engine._lanes.paused():  # the long batch will stop at its first checkpoint
            (long_job,) = sched.submit("joe", [long_req], deadline)
            wait_until(lambda: sched.batch_started is not None and engine._lanes.waiting > 0, 120,
                       interval=0.01, what="the long batch to start and stop at a checkpoint")
            (short_job,) = sched.submit("joe", [short_req], deadline)
            short_wave = short_job.future.result(timeout=120)
            assert not long_job.future.done()  # it is still held: the short one overtook it
            assert sched.overtakes == 1
        long_wave = long_job.future.result(timeout=120)
    finally:
        sched.stop()
    assert np.array_equal(short_wave, alone_short)
    assert np.array_equal(long_wave, alone_long)


@pytest.mark.parametrize("express_max_ids,words", [(0, 1), (240, 30)], ids=["overtaking-off", "long-request"])
def test_no_overtaking_when_off_or_for_a_long_request(engine, express_max_ids, words):
    ids = engine.frontend.to_ids(" ".join(["patience"] * 30))
    second_ids = engine.frontend.to_ids(" ".join(["waiting"] * words))
    sched = _scheduler(engine, express_max_ids=express_max_ids)
    try:
        deadline = time.monotonic() + 600
        with engine._lanes.paused():
            (first,) = sched.submit("joe", [SynthesisRequest(ids, seed=1)], deadline)
            wait_until(lambda: engine._lanes.waiting > 0, 120, interval=0.01,
                       what="the first batch to stop at a checkpoint")
            (second,) = sched.submit("joe", [SynthesisRequest(second_ids, seed=2)], deadline)
            # nothing else may run it: it is still queued behind the held batch
            assert second.started is None and sched.depth == 1
        first.future.result(timeout=120)
        second.future.result(timeout=120)
    finally:
        sched.stop()
    assert sched.overtakes == 0  # had it overtaken the held batch, this would count it


def test_short_requests_get_at_most_the_time_long_work_had():
    # The share rule's arithmetic on a clock the test sets (runtime/scheduler.py "Share of short
    # requests"); the flood it bounds is measured in bench/overtake.py.
    sched = Scheduler(ModelHolder(), express_max_ids=240)
    assert not sched.express_allowed(100.0)  # no batch in progress: nothing to overtake
    sched.batch_started, sched._batch_long, sched._express_spent = 100.0, True, 0.0
    assert sched.express_allowed(100.0)  # nothing spent yet
    sched._short_s = sched._express_spent = 3.0  # 3 s of overtaking during this long batch
    assert not sched.express_allowed(105.0)  # the long batch had 2 s of 5: its turn
    assert sched.express_allowed(106.0)  # 3 s of 6: even
    sched._long_s = 10.0  # earlier long batches: credit is capped, a flood cannot spend it all at once
    sched._account([], express=True, elapsed=0.0)
    assert sched._short_s == 10.0 - SHORT_CREDIT_S
    # no long work queued or running: nothing to share, nothing carried over
    sched.batch_started = None
    assert sched.express_allowed(200.0) is False and sched._short_wait(200.0) == 0.0
    assert sched._short_s == sched._long_s == 0.0
