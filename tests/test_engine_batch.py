"""Batching: a request's audio does not depend on its batch-mates; seeds; OOM splitting; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.engine import Engine, EngineError, EngineOOMError, SynthesisRequest

pytestmark = pytest.mark.unit

TEXTS = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Yes, indeed!",
    "How much wood would a woodchuck chuck?",
    "One, two, three, four, five, six, seven.",
    "Good morning everyone, and welcome to the show.",
]


def _requests(engine):
    reqs = []
    for i, text in enumerate(TEXTS):
        ids = engine.frontend.text_to_sentence_ids(text)[0]
        # varied per-request scales too: each row of the batch carries its own
        reqs.append(SynthesisRequest(ids, seed=100 + i, length_scale=0.9 + 0.05 * i, noise_scale=0.667, noise_w=0.8))
    return reqs


def test_batch_invariance_with_noise(engine):
    reqs = _requests(engine)
    assert len({len(r.phoneme_ids) for r in reqs}) == len(reqs)  # all different lengths
    alone = [engine.synthesize_batch([r])[0] for r in reqs]
    together = engine.synthesize_batch(reqs)
    shuffled_order = [5, 2, 7, 0, 3, 1, 6, 4]
    shuffled = engine.synthesize_batch([reqs[i] for i in shuffled_order])
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.shape == b.shape, i
        assert float(np.abs(a - b).max()) <= 1e-4, i
    for pos, i in enumerate(shuffled_order):
        assert float(np.abs(alone[i] - shuffled[pos]).max()) <= 1e-4


def test_seeds_are_deterministic_and_matter(engine):
    ids = engine.frontend.text_to_sentence_ids("Seeds make noise reproducible.")[0]
    a, b, c = engine.synthesize_batch([SynthesisRequest(ids, seed=7), SynthesisRequest(ids, seed=7),
                                       SynthesisRequest(ids, seed=8)])
    # same seed: same audio (up to float reassociation from the position in the packed batch)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.shape != c.shape or float(np.abs(a - c).max()) > 1e-3


def test_synthesize_text_joins_sentences(engine):
    one = engine.synthesize_text("Hello there.")
    two = engine.synthesize_text("Hello there. General Kenobi!")
    assert one.dtype == np.float32 and one.ndim == 1
    assert len(two) > len(one) + int(0.2 * engine.sample_rate)
    assert np.abs(one).max() > 0.05  # not silence
    assert engine.sample_rate == 22050 and engine.device == "cpu" and engine.voice_name == "en_US-joe-medium"


def test_length_scale_changes_duration(engine):
    ids = engine.frontend.text_to_sentence_ids("Slow and fast.")[0]
    fast, slow = engine.synthesize_batch([SynthesisRequest(ids, length_scale=0.5, noise_w=0.0),
                                          SynthesisRequest(ids, length_scale=2.0, noise_w=0.0)])
    assert 3.0 < len(slow) / len(fast) < 5.0


def test_bad_requests_name_the_problem(engine):
    with pytest.raises(ValueError, match="request 1: phoneme_ids is empty"):
        engine.synthesize_batch([SynthesisRequest([1, 0, 2]), SynthesisRequest([])])
    with pytest.raises(ValueError, match="out of range"):
        engine.synthesize_batch([SynthesisRequest([1, 999, 2])])
    with pytest.raises(ValueError, match="length_scale"):
        engine.synthesize_batch([SynthesisRequest([1, 0, 2], length_scale=0.0)])
    with pytest.raises(ValueError, match="noise_scale"):
        engine.synthesize_batch([SynthesisRequest([1, 0, 2], noise_scale=float("nan"))])
    assert engine.synthesize_batch([]) == []


class _SmallMemoryEngine(Engine):
    """Raises the real torch OOM exception for batches larger than `limit` (no GPU on CI)."""

    limit = 2
    sizes: list[int]

    def _forward(self, model, reqs, dev, lanes):
        self.sizes.append(len(reqs))
        if len(reqs) > self.limit:
            raise torch.OutOfMemoryError("simulated: batch too large")
        return super()._forward(model, reqs, dev, lanes)


def test_oom_halves_the_batch_and_keeps_results(bundle_dir, engine):
    small = _SmallMemoryEngine.load(bundle_dir, device="cpu")
    small.sizes = []
    reqs = _requests(engine)[:5]
    out = small.synthesize_batch(reqs)
    assert small.sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, 3 -> 1 + 2
    assert small.stats["oom_splits"] == 2
    for a, r in zip(out, reqs):
        np.testing.assert_allclose(a, engine.synthesize_batch([r])[0], atol=1e-4)
    small.limit = 0
    with pytest.raises(EngineOOMError, match="single request"):
        small.synthesize_batch(reqs[:1])  # on CPU there is nowhere to fall back to
    small.close()
    with pytest.raises(EngineError, match="closed"):
        small.synthesize_batch(reqs[:1])


def test_device_and_bundle_errors(bundle_dir, tmp_path):
    with pytest.raises(ValueError, match="device must be"):
        Engine.load(bundle_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA is not available"):
            Engine.load(bundle_dir, device="cuda", cpu_fallback=False)
        fallback = Engine.load(bundle_dir, device="cuda", cpu_fallback=True)
        assert fallback.device == "cpu"
        fallback.close()
    with pytest.raises(EngineError, match="no voice.json"):
        Engine.load(tmp_path)
    (tmp_path / "voice.json").write_text((bundle_dir / "voice.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EngineError, match="safetensors"):
        Engine.load(tmp_path)
