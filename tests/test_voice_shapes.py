"""Every Piper voice shape (tts_testkit/voice_factory.py): import by graph structure, parity with
onnxruntime on piper's own exported graph, batch invariance across speakers."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("piper.train.vits.models")

from piper_import import import_piper  # noqa: E402
from tts_testkit import voice_factory  # noqa: E402

pytestmark = pytest.mark.integration

SHAPES = list(voice_factory.SHAPES)
TOL = 1e-4  # of full scale (1.0)


@pytest.fixture(scope="session")
def shape_voices(tmp_path_factory):
    """Each shape built (small: see voice_factory.SMALL), exported and imported once per session."""
    base = tmp_path_factory.mktemp("piper-shapes")
    out = {}
    for shape in SHAPES:
        onnx_path, json_path = voice_factory.build(shape, base / "onnx", small=True)
        out[shape] = (onnx_path, json_path, import_piper(onnx_path, json_path, base / "bundles" / shape))
    return out


@functools.cache
def _engine(bundle_dir):
    from runtime.engine import Engine

    return Engine.load(bundle_dir, device="cpu", threads=2)


@functools.cache
def _session(onnx_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def _ort(onnx_path, ids, speaker=None):
    feed = {"input": np.asarray([ids], np.int64), "input_lengths": np.asarray([len(ids)], np.int64),
            "scales": np.asarray([0.0, 1.0, 0.0], np.float32)}
    if speaker is not None:
        feed["sid"] = np.asarray([speaker], np.int64)
    return _session(onnx_path).run(None, feed)[0].reshape(-1)


def _ids(n, seed):
    rng = np.random.default_rng(seed)
    return [1, 0] + [int(x) for x in rng.integers(3, 120, n)] + [2]


def _close(ours, ref, what):
    assert len(ours) == len(ref), f"{what}: {len(ours)} samples, onnxruntime {len(ref)}"
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, f"{what}: max |diff| {diff:.2e}"
    assert float(np.abs(ref).max()) > 10 * TOL, f"{what}: silent reference proves nothing"


@pytest.mark.parametrize("shape", SHAPES)
def test_import_maps_every_initializer_by_structure(shape_voices, shape):
    onnx_path, json_path, report = shape_voices[shape]
    spec = voice_factory.SHAPES[shape]
    inits = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    assert report.mapped + len(report.unused) == len(inits)
    for name in report.unused:
        assert int(np.prod(inits[name].dims)) <= 64, name
    assert report.shape == {"quality": spec["quality"], "sample_rate": spec["sample_rate"],
                            "num_speakers": spec["speakers"], "language": spec["lang"],
                            "phoneme_type": "espeak", "resblock": spec["resblock"]}
    voice = json.loads((report.out_dir / "voice.json").read_text())
    assert voice["num_speakers"] == spec["speakers"]
    assert voice["hyperparameters"]["hidden_channels"] == spec["hidden"]
    logs_src = [src for src, dst in report.renamed.items() if dst == "dp.flows.0.logs"]
    if spec.get("fold_exp"):
        assert logs_src == ["/dp/flows.0/Exp_output_0"]  # torch 2.0's folded exp(-logs)
    else:
        assert len(logs_src) == 1 and logs_src[0].startswith("onnx::Exp_")  # torch 2.13 keeps the Exp
    if spec.get("share_norms"):
        # the exporter merged the identical LayerNorm tensors; each module still gets its own
        assert report.shared and max(len(v) for v in report.shared.values()) > 20
        assert any("enc_p.encoder.norm_layers_2.1.gamma" in v for v in report.shared.values())
    if spec["speakers"] > 1:
        assert voice["speaker_id_map"] == {s: i for i, s in enumerate(voice_factory.SPEAKERS[:spec["speakers"]])}


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_onnxruntime(shape_voices, shape):
    from runtime.engine import SynthesisRequest

    onnx_path, _, report = shape_voices[shape]
    engine = _engine(report.out_dir)
    multi = engine.num_speakers > 1
    for k, n in enumerate((5, 24)):
        ids = _ids(n, k)
        speaker = k + 1 if multi else None
        ours = engine.synthesize_batch([SynthesisRequest(ids, noise_scale=0, noise_w=0, speaker=speaker)])[0]
        _close(ours, _ort(onnx_path, ids, speaker), f"{shape} {n} phonemes")


def test_mixed_batch_across_speakers_and_lengths(shape_voices):
    """Different speakers of one voice share a batch; each gets its onnxruntime audio."""
    from runtime.engine import SynthesisRequest

    onnx_path, _, report = shape_voices["multi"]
    engine = _engine(report.out_dir)
    cases = [(_ids(n, 10 + n), spk) for n, spk in ((20, 0), (4, 3), (12, 1), (20, 2))]
    reqs = [SynthesisRequest(ids, noise_scale=0, noise_w=0, speaker=spk) for ids, spk in cases]
    batch = engine.synthesize_batch(reqs)
    for (ids, spk), req, wave in zip(cases, reqs, batch):
        ref = _ort(onnx_path, ids, spk)
        _close(wave, ref, f"speaker {spk} in the batch")
        alone = engine.synthesize_batch([req])[0]
        assert float(np.abs(wave - alone).max()) <= 1e-6  # float rounding only (as tests/test_engine_batch.py)
    # same text, different speakers: the conditioning reaches the audio
    assert cases[0][0] == cases[3][0]
    assert float(np.abs(batch[0][:1000] - batch[3][:1000]).max()) > 10 * TOL
    # names from speaker_id_map pick the same speaker as the id
    by_name = engine.synthesize_batch([SynthesisRequest(cases[2][0], noise_scale=0, noise_w=0, speaker="bernd")])[0]
    assert float(np.abs(by_name - batch[2]).max()) <= 1e-6


def test_unknown_speaker_names_the_valid_ones(shape_voices):
    from runtime.engine import SynthesisRequest, UnknownSpeakerError

    engine = _engine(shape_voices["multi"][2].out_dir)
    with pytest.raises(UnknownSpeakerError, match=r"no speaker 'zoe'.*ids 0\.\.3.*anna, bernd, clara, dieter"):
        engine.synthesize_batch([SynthesisRequest([1, 0, 5, 0, 2], speaker="zoe")])
    with pytest.raises(UnknownSpeakerError, match="no speaker id 4"):
        engine.synthesize_batch([SynthesisRequest([1, 0, 5, 0, 2], speaker=4)])
    single = _engine(shape_voices["x_low"][2].out_dir)
    with pytest.raises(UnknownSpeakerError, match="single-speaker"):
        single.synthesize_batch([SynthesisRequest([1, 0, 5, 0, 2], speaker=1)])


def test_streaming_pieces_join_for_a_speaker(shape_voices):
    from runtime.engine import SynthesisRequest

    engine = _engine(shape_voices["multi"][2].out_dir)
    req = SynthesisRequest(_ids(40, 3), noise_scale=0, noise_w=0, speaker="clara")
    firsts = []
    whole = engine.synthesize_progressive(req, firsts.append)
    np.testing.assert_allclose(whole, engine.synthesize_batch([req])[0], atol=1e-6)
    assert len(firsts) == 1 and np.array_equal(whole[:len(firsts[0])], firsts[0])


def test_server_serves_several_voices_and_their_speakers(shape_voices, voice_cache, tmp_path_factory):
    """One runtime serving joe and the multi-speaker voice: speakers by name or id in the
    native API, `voice:speaker` on the OpenAI endpoint, /v1/voices shapes, 404 naming the
    valid speakers; a voice that cannot load does not stop the others."""
    import io
    import time

    import httpx
    import soundfile as sf

    from tts_testkit.runtime_server import publish_to_cache, start_server

    publish_to_cache(voice_cache, "multi", "1.0.0", shape_voices["multi"][2].out_dir)
    engine = _engine(shape_voices["multi"][2].out_dir)
    srv = start_server(tmp_path_factory.mktemp("srv-voices"), voice_cache, models=["joe", "multi", "absent"],
                       max_batch_size=8, max_wait_ms=20, queue_size=32, max_chars=600)
    try:
        models = {}
        with srv.client(5.0) as c:  # joe and multi load while 'absent' waits for the cache
            deadline = time.monotonic() + 180  # safety net only: the loop ends when both loaded
            while time.monotonic() < deadline and srv.process.poll() is None:
                try:
                    models = c.get("/v1/status").json()["models"]
                except httpx.TransportError:  # socket not bound yet
                    models = {}
                if models and models["joe"]["loaded"] and models["multi"]["loaded"]:
                    break
                time.sleep(0.2)
            assert models, srv.log()[-2000:]
            assert models["joe"]["loaded"] and models["multi"]["loaded"] and not models["absent"]["loaded"]
            assert models["multi"]["weights_bytes"] > 0
        with srv.client(120.0) as c:
            voices = {v["name"]: v for v in c.get("/v1/voices").json()["voices"]}
            assert voices["multi"]["num_speakers"] == 4 and voices["multi"]["language"] == "de_DE"
            assert voices["multi"]["speakers"] == {"anna": 0, "bernd": 1, "clara": 2, "dieter": 3}
            assert voices["joe"]["num_speakers"] == 1 and voices["joe"]["quality"] == "medium"

            def wav(resp):
                assert resp.status_code == 200, resp.text
                return sf.read(io.BytesIO(resp.content), dtype="float32")[0]

            body = {"text": "Guten Tag.", "voice": "multi", "format": "wav", "noise_scale": 0, "noise_w": 0}
            by_name = wav(c.post("/v1/synthesize", json=dict(body, speaker="clara")))
            by_id = wav(c.post("/v1/synthesize", json=dict(body, speaker=2)))
            other = wav(c.post("/v1/synthesize", json=dict(body, speaker="anna")))
            assert np.array_equal(by_name, by_id) and not np.array_equal(by_name, other)
            ref = engine.synthesize_text("Guten Tag.", noise_scale=0, noise_w=0, speaker=2)
            assert len(by_name) == len(ref)
            openai = wav(c.post("/v1/audio/speech", json={"model": "tts-1", "voice": "multi:clara",
                                                          "input": "Guten Tag.", "response_format": "wav"}))
            assert len(openai) > 0
            bad = c.post("/v1/synthesize", json=dict(body, speaker="zoe"))
            assert bad.status_code == 404 and "anna, bernd, clara, dieter" in bad.json()["error"]["message"]
            bad = c.post("/v1/audio/speech", json={"voice": "multi:zoe", "input": "x"})
            assert bad.status_code == 404 and bad.json()["error"]["param"] == "voice"
            assert c.post("/v1/synthesize", json={"text": "Hello.", "voice": "joe"}).status_code == 200
    finally:
        srv.stop()
