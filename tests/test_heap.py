"""The engine's heap policy (runtime/heap.py): after a batch, freed activation buffers stay in
the heap for the next batch (no page fault per page of them), unless the process has grown by
more than RETAIN_FREE_BYTES since the last trim or a trim is forced."""

from __future__ import annotations

import resource

import pytest
import torch

from runtime import heap

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not heap.available(), reason="not glibc: the policy is a no-op there")]

# a small "batch": activation buffers of a few MiB, as a stage of the decoder allocates
SIZES = [3 << 20, 1 << 20, 2 << 20, 4 << 20, 2 << 20]
PAGES = sum(SIZES) // 4096
BATCHES = 10


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """fill_ runs on this thread, so its page faults are counted by RUSAGE_THREAD alone, not
    mixed with whatever other threads of the test process do meanwhile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch_faults() -> int:
    """Page faults while allocating and first writing the batch's buffers, then freeing them."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    buffers = []
    for size in SIZES:
        buffers.append(torch.empty(size // 4))
        buffers[-1].fill_(1.0)
    del buffers
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def _faults_over_batches(batches: int = BATCHES) -> int:
    """Page faults of `batches` batches with the engine's release after each. Not one batch:
    in a heap fragmented by earlier tests (voices loaded and closed) a batch now and then lands
    on free memory an earlier trim returned, and faults that once. A policy that trims after
    every batch faults every page of every batch: `batches * PAGES`."""
    heap.keep_freed_memory()
    faults = 0
    for _ in range(batches):
        faults += _batch_faults()
        heap.release_after_batch()
    return faults


def test_memory_kept_between_batches_is_reused_without_faults():
    _faults_over_batches()  # the heap settles on the batch's layout
    assert _faults_over_batches() < BATCHES * PAGES // 5


def test_a_forced_or_over_the_limit_release_hands_memory_back(monkeypatch):
    _faults_over_batches()
    heap.release_after_batch(force=True)
    assert _batch_faults() > PAGES // 2  # the pages were returned: each faults again

    _faults_over_batches()
    monkeypatch.setattr(heap, "RETAIN_FREE_BYTES", max(SIZES) // 2)  # the kept memory is now "too much"
    heap.release_after_batch()
    assert _batch_faults() > PAGES // 2


def test_a_large_free_is_trimmed_once_not_after_every_batch():
    # e.g. a voice unloaded: far more than RETAIN_FREE_BYTES freed at once, in heap-sized chunks
    heap.keep_freed_memory()
    big = [torch.ones((8 << 20) // 4) for _ in range((heap.RETAIN_FREE_BYTES >> 23) + 8)]
    big_bytes, rss_with_big = len(big) << 23, heap.rss_bytes()
    del big
    heap.release_after_batch()
    # the process shrank back (most of it: in a fragmented heap some chunks sit between others)
    assert heap.rss_bytes() < rss_with_big - big_bytes // 2
    _faults_over_batches()
    assert _faults_over_batches() < BATCHES * PAGES // 5  # and the batches after it keep their memory
