"""Retry delays: exponential, capped, with jitter so a fleet does not retry in step."""

from __future__ import annotations

import random


def backoff_delay(failures: int, base: float, cap: float, rng=random) -> float:
    """Seconds to wait after `failures` consecutive failures (0 for the first retry's
    base): base x 2^failures, at most `cap`, then spread by +-50 % so hundreds of
    nodes that failed together come back at different times. `rng`: the jitter's source
    (tests pass a seeded one)."""
    exponent = min(max(failures, 0), 30)  # 2**30 x any base is past every cap
    return min(cap, base * 2**exponent) * rng.uniform(0.5, 1.5)
