"""The engine's fast paths (time-major encoder and flows, lanes across cores) against the
plain reference modules they rewrite, on the real voice's weights.

Parity with onnxruntime (test_engine_parity.py) covers single requests on CPU; these tests
also cover what only a GPU runs in production (the padded-batch encoder) and every lane count.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytestmark = pytest.mark.unit



def _reference_model(bundle_dir):
    from safetensors.torch import load_file

    from runtime.vits import VitsConfig, VitsModel

    voice = json.loads((bundle_dir / "voice.json").read_text())
    model = VitsModel(VitsConfig.from_dict(voice["hyperparameters"])).eval().requires_grad_(False)
    model.load_state_dict(load_file(str(bundle_dir / "model.safetensors")), strict=True)
    return model  # not fused: every module runs its reference forward


@pytest.fixture(scope="module")
def models(bundle_dir):
    ref = _reference_model(bundle_dir)
    fast = _reference_model(bundle_dir)
    fast.fuse_for_inference()
    return ref, fast


@pytest.mark.parametrize("n_lanes", [1, 2])
def test_fast_encoder_matches_reference_on_a_padded_batch(models, n_lanes):
    from runtime.vits.lanes import Lanes

    ref, fast = models
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([23, 57, 9])
    ids = torch.randint(1, ref.cfg.num_symbols, (3, 57), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n:] = 0
    lanes = Lanes(n_lanes)
    with torch.inference_mode():
        want = ref.enc_p(ids, lengths)
        got = fast.enc_p(ids, lengths, lanes)
    lanes.close()
    x_mask = want[3]
    for name, a, b in zip(("x", "m_p", "logs_p"), want[:3], got[:3]):
        assert a.shape == b.shape, name
        assert float(((a - b) * x_mask).abs().max()) <= 1e-4, name
    # padding stays exactly zero, as the duration predictor and alignment expect
    assert float((got[0] * (1 - x_mask)).abs().max()) == 0.0


@pytest.mark.parametrize("n_lanes", [1, 2, 3])
def test_packed_flows_match_reference_masked_flows(models, n_lanes):
    from runtime.vits.lanes import Lanes

    ref, fast = models
    gen = torch.Generator().manual_seed(6)
    lengths = [40, 301, 7]  # short, longer than the im2col limit, shorter than a halo
    priors = [torch.randn(192, n, generator=gen) for n in lengths]
    packed, segments = fast._pack(priors)
    gaps = [(s0 + n0, s1) for (s0, n0), (s1, _) in zip(segments, segments[1:])]
    lanes = Lanes(n_lanes)
    with torch.inference_mode():
        got = fast.flow.reverse_packed(packed, gaps, lanes)
        for (start, n), z in zip(segments, priors):
            want = ref.flow.reverse(z.unsqueeze(0), torch.ones(1, 1, n))[0].t()
            assert float((got[start:start + n] - want).abs().max()) <= 1e-4, n
        for a, b in gaps:
            assert float(got[a:b].abs().max()) == 0.0  # gaps stay zero for the decoder
    lanes.close()


def test_decoder_lanes_do_not_change_the_waveform(models):
    from runtime.vits.lanes import SERIAL, Lanes

    _, fast = models
    z = torch.randn(1, 192, 230, generator=torch.Generator().manual_seed(7))
    lanes = Lanes(2)
    with torch.inference_mode():
        one = fast.dec.decode_packed(z, [(0, 230)], SERIAL)[0]
        two = fast.dec.decode_packed(z, [(0, 230)], lanes)[0]
    lanes.close()
    assert one.shape == two.shape == (230 * 256,)
    assert float((one - two).abs().max()) <= 1e-5


def test_cpu_engine_runs_its_threads_as_lanes(engine):
    # tests/voice_fixtures.py loads the engine with threads=2
    assert engine.threads == 2
    assert torch.get_num_threads() == 1  # each lane runs its ops on one core


def test_lanes_map_keeps_order_waits_for_all_and_raises():
    from runtime.vits.lanes import Lanes

    lanes = Lanes(2)
    assert lanes.map(lambda x: x * x, range(7)) == [0, 1, 4, 9, 16, 25, 36]
    assert lanes.map(lambda x: x + 1, [41]) == [42]
    assert lanes.map(lambda x: x, []) == []

    # Both pieces must be in flight at once to pass the barrier: the caller and the pool thread
    # really run side by side (a serial run would time out here). A nested call runs inline.
    barrier = threading.Barrier(2, timeout=60)  # a safety net: a serial run never passes it
    threads_seen = set()

    def outer(x):
        threads_seen.add(threading.get_ident())
        barrier.wait()
        return lanes.map(lambda y: y + x, [1, 2])

    assert lanes.map(outer, [10, 20]) == [[11, 12], [21, 22]]
    assert len(threads_seen) == 2

    finished = []

    def piece(x):
        if x == 0:
            raise ValueError("piece 0 failed")
        finished.append(x)
        return x

    with pytest.raises(ValueError, match="piece 0 failed"):
        lanes.map(piece, range(4))
    assert sorted(finished) == [1, 2, 3]  # nothing still running when the error surfaces
    lanes.close()
    assert lanes.n == 1 and lanes.map(lambda x: -x, [1, 2]) == [-1, -2]
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        Lanes(0)


def test_lanes_count_gives_every_lane_a_share():
    from runtime.vits.lanes import Lanes, pieces

    two = Lanes(2)
    assert two.count(1000, 16) == 2
    assert two.count(1000, 16, at_least=3) == 4  # rounded up to a multiple of the lanes
    assert two.count(20, 16) == 1  # too short to be worth splitting
    assert Lanes(1).count(1000, 16, at_least=3) == 3
    assert pieces(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert pieces(2, 5) == [(0, 1), (1, 2)]
    two.close()


def test_time_major_duration_predictor_matches_reference(models):
    ref, fast = models
    gen = torch.Generator().manual_seed(8)
    lengths = torch.tensor([31, 12, 2])  # padded batch (what a GPU runs), and a length below the widest dilation
    x = torch.randn(3, ref.cfg.hidden_channels, 31, generator=gen)
    mask = (torch.arange(31)[None, :] < lengths[:, None]).unsqueeze(1).float()
    x = x * mask
    noise = torch.randn(3, 2, 31, generator=gen) * mask
    with torch.inference_mode():
        want = ref.dp.reverse(x, mask, noise)
        got = fast.dp.reverse(x, mask, noise)
        assert got.shape == want.shape
        assert float(((got - want) * mask).abs().max()) <= 1e-5
        for i, n in enumerate(lengths.tolist()):  # one request alone: the unmasked path
            alone = fast.dp.reverse(x[i:i + 1, :, :n], mask[i:i + 1, :, :n], noise[i:i + 1, :, :n])
            assert float((alone - want[i:i + 1, :, :n]).abs().max()) <= 1e-5, n
