"""libgomp's wait policy, chosen by each process's entry point before torch loads.

libgomp's default active spin-wait degrades badly when other processes compete for the
cores (measured: 2.9x slower vs 1.06x with PASSIVE on a loaded 2-core box; docs/engine.md).
libgomp reads OMP_WAIT_POLICY once, when torch loads it, so the choice belongs to whatever
starts the process (`tts-runtime serve`, `tts-ctl`, the test suite, the benchmarks) and is
made explicitly there - never as a side effect of importing a module. An explicit
environment value always wins.
"""

from __future__ import annotations

import os
import sys

import structlog

log = structlog.get_logger(__name__)


def prefer_passive_wait() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:  # too late for this process: say so instead of pretending
        log.warning("torch was loaded before the OpenMP wait policy was chosen; it keeps libgomp's default")
