"""Bounded waiting: poll a condition until it holds; the bound is a safety net that only a
hang reaches (docs/testing.md, rule 1)."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
