"""Our PyTorch VITS vs onnxruntime on Piper's own ONNX graph, noise scales at 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.voice_fixtures import ort_synthesize

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "How are you doing today?",
    "Wow!",
    "Please call Stella, and ask her to bring these things with her from the store.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Dr. Smith paid $42.50 for 3 books on the 21st of March.",
    "Is this the real life? Is this just fantasy?",
    "She sells seashells by the seashore.",
    "Numbers like 1, 2, 3 and 1999 are read out loud.",
    "Yes.",
    "The mitochondria is the powerhouse of the cell; everybody knows that.",
    "Don't panic - it's only a test (a short one).",
    "Colorless green ideas sleep furiously.",
    "A journey of a thousand miles begins with a single step.",
    "Why, hello there: nice to meet you!",
    "Peter Piper picked a peck of pickled peppers.",
    "The rain in Spain stays mainly in the plain.",
    "Supercalifragilisticexpialidocious.",
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed "
    "by their Creator with certain unalienable Rights.",
]


@pytest.mark.integration
def test_twenty_sentences_match_onnxruntime(engine, ort_session):
    from runtime.engine import SynthesisRequest

    assert len(SENTENCES) == 20
    worst = 0.0
    for text in SENTENCES:
        for ids in engine.frontend.text_to_sentence_ids(text):
            ref = ort_synthesize(ort_session, ids, noise_scale=0.0, noise_w=0.0)
            ours = engine.synthesize_batch([SynthesisRequest(ids, noise_scale=0.0, noise_w=0.0)])[0]
            assert ours.dtype == np.float32
            assert ours.shape == ref.shape, text
            worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= 1e-3, worst


@pytest.mark.unit
@pytest.mark.parametrize("length_scale", [0.7, 1.6])
def test_length_scale_matches_onnxruntime(engine, ort_session, length_scale):
    from runtime.engine import SynthesisRequest

    ids = engine.frontend.text_to_sentence_ids("Speed changes the length, not the pitch.")[0]
    ref = ort_synthesize(ort_session, ids, noise_scale=0.0, length_scale=length_scale, noise_w=0.0)
    ours = engine.synthesize_batch([SynthesisRequest(ids, noise_scale=0.0, noise_w=0.0, length_scale=length_scale)])[0]
    assert ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) <= 1e-3


@pytest.mark.unit
def test_fast_decoder_matches_reference_decoder(bundle_dir):
    """The channels-last/polyphase decoder is a rewrite of the plain HiFi-GAN forward."""
    import json

    from safetensors.torch import load_file

    from runtime.vits import VitsConfig, VitsModel

    voice = json.loads((bundle_dir / "voice.json").read_text())
    model = VitsModel(VitsConfig.from_dict(voice["hyperparameters"])).eval()
    model.load_state_dict(load_file(str(bundle_dir / "model.safetensors")), strict=True)
    z = torch.randn(1, 192, 37, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model.dec(z)
        model.dec.fuse()
        fast = model.dec(z)
    assert fast.shape == ref.shape == (1, 1, 37 * 256)
    assert float((fast - ref).abs().max()) <= 1e-4
