"""CPU lanes: independent pieces of one inference step run on N threads, one core each.

Why not torch's own intra-op threads: most VITS ops are small (a few hundred frames), and
splitting every op across cores costs an OpenMP fork/join per op (with the passive wait policy
a futex wake each time). Measured on 2 cores: a one-word sentence ran no faster with 2 intra-op
threads than with 1. Lanes split coarse pieces instead (time chunks of a decoder stage or a
coupling layer, whole requests of a batch), each lane running its piece with one intra-op
thread, so the cores only synchronize a few times per request.

Each piece must be independent of the others and its result must not depend on which lane ran
it; callers cut work so that results are the same as a serial run (see Generator._fast and
CouplingFlow.reverse_packed). The pieces' bodies are TorchScript functions (scripted.py) that
run with the GIL released: pieces written as Python ops ran barely faster on two lanes than on
one, each op waiting for the GIL on return. Callers also leave work that is too small on one
lane, where a hand-off between cores costs more than it saves.
"""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class Lanes:
    """`map(fn, items)` runs fn over items on up to `n` threads and returns results in order.

    The caller's thread is one of the lanes and n - 1 pool threads are the others; all of them
    take the next item from a shared counter until none is left, so unequal items balance and
    a two-piece step costs one hand-off. With n == 1, a single item, or a call from inside a
    lane (nested work), everything runs inline. Pool threads run under torch.inference_mode,
    which is thread-local and would not carry over from the caller.

    Pausing (`paused()`): every item starts at a checkpoint, so while a pause is held, work
    on these lanes stops at its next item (a few milliseconds of compute at most: items are
    chunks of one layer or stage) and goes on where it stopped once the last pause ends. The
    work itself is unchanged, so its results are the same bits. The runtime pauses a long
    batch this way while a short request runs on other lanes (runtime/scheduler.py).
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"lanes must be >= 1, got {n}")
        self.n = n
        self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="vits-lane") if n > 1 else None
        self._lock = threading.Lock()
        self._gate = threading.Condition()
        self._pauses = 0
        self.waiting = 0  # threads stopped at a checkpoint right now (status, tests)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if self._pool is None or len(items) <= 1 or getattr(_in_lane, "active", False):
            inline = []
            for x in items:
                self.checkpoint()
                inline.append(fn(x))
            return inline
        results: list = [None] * len(items)
        counter = itertools.count()

        def drain() -> None:
            _in_lane.active = True
            try:
                while (i := next(counter)) < len(items):
                    self.checkpoint()
                    results[i] = fn(items[i])
            finally:
                _in_lane.active = False

        def pool_drain() -> None:
            with torch.inference_mode():
                drain()

        with self._lock:  # one step at a time; a second caller would only oversubscribe the cores
            futures = [self._pool.submit(pool_drain) for _ in range(min(self.n, len(items)) - 1)]
            try:
                drain()
            finally:
                for f in futures:  # wait for every piece before returning or raising
                    f.exception()
            for f in futures:
                f.result()
        return results

    def checkpoint(self) -> None:
        """Wait here while a pause is held (costs one attribute read when none is)."""
        if self._pauses:
            with self._gate:
                self.waiting += 1
                try:
                    self._gate.wait_for(lambda: self._pauses == 0)
                finally:
                    self.waiting -= 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold a pause for the block (pauses nest and count)."""
        with self._gate:
            self._pauses += 1
        try:
            yield
        finally:
            with self._gate:
                self._pauses -= 1
                if self._pauses == 0:
                    self._gate.notify_all()

    def count(self, length: int, min_piece: int, at_least: int = 1) -> int:
        """How many pieces to cut `length` into: `at_least` (what the caller needs anyway, e.g.
        for cache-sized chunks) rounded up to a multiple of the lane count, so every lane gets
        the same share, but no more pieces than keep `min_piece` each."""
        n = math.ceil(at_least / self.n) * self.n
        return max(at_least, min(n, length // max(1, min_piece)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self.n = 1


SERIAL = Lanes(1)
_in_lane = threading.local()


def pieces(length: int, n_pieces: int) -> list[tuple[int, int]]:
    """Cut [0, length) into n_pieces contiguous ranges of near-equal size."""
    n_pieces = max(1, min(n_pieces, length))
    size = math.ceil(length / n_pieces)
    return [(a, min(a + size, length)) for a in range(0, length, size)]
