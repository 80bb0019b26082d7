"""Piper voice importer: complete mapping, strict loading, clear failures on unknown graphs."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from piper_import import PiperImportError, bundled_voice_paths, import_piper

pytestmark = pytest.mark.unit

onnx = pytest.importorskip("onnx")


@functools.cache
def _source_model():
    return onnx.load(str(bundled_voice_paths()[0]))


def _tampered(tmp_path, edit):
    model = onnx.ModelProto()
    model.CopyFrom(_source_model())
    edit(model.graph)
    path = tmp_path / "tampered.onnx"
    onnx.save(model, str(path))
    return path


def _remove(graph, name):
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            del graph.initializer[i]
            return
    raise AssertionError(f"{name} not in graph")


def test_every_initializer_is_mapped_or_reported_unused(import_report):
    names = [i.name for i in _source_model().graph.initializer]
    assert import_report.mapped + len(import_report.unused) == len(names)
    assert set(import_report.unused) <= set(names)
    # unused ones are graph plumbing (shape constants, folded scalars), never weights
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in _source_model().graph.initializer}
    for name in import_report.unused:
        assert arrays[name].size <= 64, name
    assert import_report.renamed["sid"] == "enc_p.emb.weight"
    assert import_report.renamed["/dp/flows.0/Exp_output_0"] == "dp.flows.0.logs"
    conv = {k: v for k, v in import_report.renamed.items() if k.startswith("onnx::Conv_")}
    assert len(conv) == 32
    assert all(v.startswith("flow.flows.") and ".enc." in v for v in conv.values())


def test_bundle_loads_strictly_and_keeps_weights(bundle_dir):
    import torch
    from safetensors.torch import load_file

    from runtime.vits import VitsConfig, VitsModel

    voice = json.loads((bundle_dir / "voice.json").read_text())
    state = load_file(str(bundle_dir / "model.safetensors"))
    model = VitsModel(VitsConfig.from_dict(voice["hyperparameters"]))
    model.load_state_dict(state, strict=True)
    assert sum(t.numel() for t in state.values()) == voice["parameters"]
    assert 15.6e6 < voice["parameters"] < 15.7e6
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in _source_model().graph.initializer}
    np.testing.assert_array_equal(state["enc_p.emb.weight"].numpy(), arrays["sid"])
    np.testing.assert_array_equal(state["dec.ups.0.weight"].numpy(), arrays["dec.ups.0.weight"])
    np.testing.assert_allclose(torch.exp(-state["dp.flows.0.logs"]).numpy(), arrays["/dp/flows.0/Exp_output_0"],
                               rtol=1e-6)


def test_voice_json_and_model_card(bundle_dir):
    voice = json.loads((bundle_dir / "voice.json").read_text())
    src = json.loads(bundled_voice_paths()[1].read_text())
    assert voice["sample_rate"] == 22050
    assert voice["espeak_voice"] == "en-us"
    assert voice["phoneme_id_map"] == src["phoneme_id_map"]
    assert voice["num_symbols"] == 256
    assert voice["inference"] == {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8}
    hp = voice["hyperparameters"]
    assert hp["upsample_rates"] == [8, 8, 4] and hp["resblock_dilation_sizes"] == [[1, 2], [2, 6], [3, 12]]
    assert hp["n_heads"] == 2 and hp["window_size"] == 4 and hp["flow_kernel_size"] == 5
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "CC0" in card and "Provenance" in card and voice["source"]["onnx_sha256"] in card


@pytest.mark.parametrize("victim", ["dec.conv_post.weight", "onnx::Conv_8240", "sid", "/dp/flows.0/Exp_output_0"])
def test_missing_expected_initializer_is_refused(tmp_path, victim):
    src = _tampered(tmp_path, lambda g: _remove(g, victim))
    out = tmp_path / "out"
    with pytest.raises(PiperImportError, match="missing|not found"):
        import_piper(src, bundled_voice_paths()[1], out)
    assert not (out / "model.safetensors").exists()  # never a partial bundle


def test_wrong_shape_is_refused(tmp_path):
    def edit(graph):
        for init in graph.initializer:
            if init.name == "dp.pre.bias":
                init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(191, dtype=np.float32), "dp.pre.bias"))

    with pytest.raises(PiperImportError, match="shape mismatch.*dp.pre.bias"):
        import_piper(_tampered(tmp_path, edit), bundled_voice_paths()[1], tmp_path / "out")


def test_unknown_extra_weight_is_refused(tmp_path):
    def edit(graph):
        graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((4, 192), dtype=np.float32), "emb_g.weight"))

    with pytest.raises(PiperImportError, match=r"unrecognised weight.*'emb_g.weight' \[4, 192\].*no node"):
        import_piper(_tampered(tmp_path, edit), bundled_voice_paths()[1], tmp_path / "out")


def test_bad_inputs_give_clear_errors(tmp_path):
    onnx_path, json_path = bundled_voice_paths()
    with pytest.raises(PiperImportError, match="does not exist"):
        import_piper(tmp_path / "nope.onnx", json_path, tmp_path / "out")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(PiperImportError, match="not a readable ONNX"):
        import_piper(garbage, json_path, tmp_path / "out")
    bad_json = tmp_path / "voice.json"
    bad_json.write_text("{")
    with pytest.raises(PiperImportError, match="not readable JSON"):
        import_piper(onnx_path, bad_json, tmp_path / "out")
    cfg = json.loads(json_path.read_text())
    cfg["num_speakers"] = 4
    bad_json.write_text(json.dumps(cfg))
    with pytest.raises(PiperImportError, match="num_speakers 4 but the graph's speaker embedding has 1"):
        import_piper(onnx_path, bad_json, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("ptype", ["pinyin", "japanese", "hebrew", "thai", "klingon"])
def test_unsupported_phoneme_types_are_refused_at_import(tmp_path, ptype):
    onnx_path, json_path = bundled_voice_paths()
    cfg = json.loads(json_path.read_text())
    cfg["phoneme_type"] = ptype
    bad_json = tmp_path / "voice.json"
    bad_json.write_text(json.dumps(cfg))
    with pytest.raises(PiperImportError, match=f"phoneme_type.*{ptype}"):
        import_piper(onnx_path, bad_json, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_node_reading_a_weight_the_module_lacks_is_named(tmp_path):
    def edit(graph):
        for node in graph.node:
            if node.name == "/dec/conv_post/Conv":
                node.name = "/dec/conv_last/Conv"  # a module this engine does not have

    with pytest.raises(PiperImportError, match="node '/dec/conv_last/Conv' .* as 'dec.conv_last.weight'"):
        import_piper(_tampered(tmp_path, edit), bundled_voice_paths()[1], tmp_path / "out")
