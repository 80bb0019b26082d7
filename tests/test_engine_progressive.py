"""Engine.synthesize_progressive (a stream's first sentence): its first piece comes out before
the rest is decoded, and the pieces join into the same audio synthesize_batch gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.engine import FIRST_PIECE_S, SynthesisRequest

pytestmark = pytest.mark.unit


def _request(engine, text, seed=11):
    return SynthesisRequest(engine.frontend.text_to_sentence_ids(text)[0], seed=seed)


def test_first_piece_is_a_prefix_and_the_whole_matches_a_batch(engine):
    req = _request(engine, "The first piece of this sentence leaves before the rest is decoded.")
    pieces = []
    whole = engine.synthesize_progressive(req, lambda piece: pieces.append(piece.copy()))
    assert len(pieces) == 1
    hop = engine._model.dec.hop
    assert len(pieces[0]) == round(FIRST_PIECE_S * engine.sample_rate / hop) * hop < len(whole)
    np.testing.assert_array_equal(whole[:len(pieces[0])], pieces[0])
    np.testing.assert_allclose(whole, engine.synthesize_batch([req])[0], atol=1e-4)


def test_a_sentence_shorter_than_the_first_piece_comes_whole(engine):
    req = _request(engine, "Hi.")
    pieces = []
    whole = engine.synthesize_progressive(req, pieces.append)
    assert len(pieces) == 1 and len(pieces[0]) == len(whole) < FIRST_PIECE_S * engine.sample_rate
    np.testing.assert_allclose(whole, engine.synthesize_batch([req])[0], atol=1e-4)


def test_decoder_windows_join_into_the_whole_decode(engine):
    dec = engine._model.dec
    z = torch.randn(1, engine._model.cfg.hidden_channels, 120, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = dec.decode_packed(z, [(0, 120)])[0]
        joined = torch.cat([dec.decode_window(z, a, b) for a, b in [(0, 1), (1, 43), (43, 100), (100, 120)]])
    assert joined.shape == whole.shape
    assert float((joined - whole).abs().max()) <= 1e-5


def test_out_of_memory_after_the_first_piece_still_returns_the_whole(bundle_dir, engine):
    from runtime.engine import Engine

    small = Engine.load(bundle_dir, device="cpu")
    dec = small._model.dec
    real = dec.decode_window
    calls = []

    def failing_window(z, a, b, *lanes):
        """Raises the real torch OOM exception for the rest of the sentence (no GPU on CI)."""
        calls.append((a, b))
        if a > 0:
            raise torch.OutOfMemoryError("simulated: the rest does not fit")
        return real(z, a, b, *lanes)

    dec.decode_window = failing_window
    req = _request(engine, "The first piece of this sentence leaves before the rest is decoded.")
    pieces = []
    whole = small.synthesize_progressive(req, pieces.append)
    small.close()
    assert len(calls) == 2 and len(pieces) == 1  # the piece went out once; the whole came from a plain run
    np.testing.assert_allclose(whole, engine.synthesize_batch([req])[0], atol=1e-4)
    np.testing.assert_allclose(whole[:len(pieces[0])], pieces[0], atol=1e-4)


def test_bad_request_is_refused_before_anything_is_handed_out(engine):
    pieces = []
    with pytest.raises(ValueError, match="phoneme_ids is empty"):
        engine.synthesize_progressive(SynthesisRequest([], seed=0), pieces.append)
    assert pieces == []
