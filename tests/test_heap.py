"""The engine's heap policy (runtime/heap.py): after a batch, freed activation buffers stay in
the heap for the next batch (no page fault per page of them), unless the heap holds more than
RETAIN_FREE_BYTES free or a trim is forced."""

from __future__ import annotations

import resource

import pytest
import torch

from runtime import heap

pytestmark = pytest.mark.skipif(heap._MALLINFO2 is None, reason="not glibc >= 2.33: the policy is a no-op there")

# a small "batch": activation buffers of a few MiB, as a stage of the decoder allocates
SIZES = [3 << 20, 1 << 20, 2 << 20, 4 << 20, 2 << 20]
PAGES = sum(SIZES) // 4096


def _batch_faults() -> int:
    """Page faults while allocating and first writing the batch's buffers, then freeing them."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = []
    for size in SIZES:
        buffers.append(torch.empty(size // 4))
        buffers[-1].fill_(1.0)
    del buffers
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _warm() -> None:
    heap.keep_freed_memory()
    for _ in range(4):  # bounded: the heap settles on the batch's layout
        _batch_faults()


def test_memory_kept_between_batches_is_reused_without_faults():
    _warm()
    heap.release_after_batch()  # far below RETAIN_FREE_BYTES: nothing handed back
    assert _batch_faults() < PAGES // 10
    assert heap.free_bytes() >= max(SIZES)


def test_a_forced_or_over_the_limit_release_hands_memory_back(monkeypatch):
    _warm()
    heap.release_after_batch(force=True)
    assert _batch_faults() > PAGES // 2  # the pages were returned: each faults again

    _warm()
    monkeypatch.setattr(heap, "RETAIN_FREE_BYTES", max(SIZES) // 2)  # the kept memory is now "too much"
    heap.release_after_batch()
    assert _batch_faults() > PAGES // 2
