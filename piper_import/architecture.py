"""The VITS architecture of a Piper voice, read off its tensor shapes and node attributes."""

from __future__ import annotations

import re
from typing import Any

from .errors import PiperImportError
from .graph import Mapping


class _Shapes:
    """Questions about the mapped parameters: a tensor's shape, how many numbered modules
    match a pattern, a node attribute (strides, dilations)."""

    def __init__(self, mapping: Mapping):
        self.mapping = mapping
        self.graph = mapping.graph
        self.names = list(mapping.targets)

    def shape(self, target: str) -> tuple[int, ...]:
        arr = self.mapping.array(target)
        if arr is None:
            raise PiperImportError(f"expected tensor {target!r} not found in the ONNX graph")
        return tuple(arr.shape)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for m in map(rx.fullmatch, self.names) if m})

    def indices(self, pattern: str) -> list[int]:
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for m in map(rx.fullmatch, self.names) if m})

    def node_of(self, target: str, ops: tuple[str, ...]) -> Any:
        node = self.mapping.node(target)
        if node is None or node.op_type not in ops:
            raise PiperImportError(f"no {'/'.join(ops)} node reads {target!r}")
        return node

    def dilation(self, target: str) -> int:
        return int(self.graph.attr(self.node_of(target, ("Conv",)), "dilations", [1])[0])

    def stride(self, target: str) -> int:
        return int(self.graph.attr(self.node_of(target, ("ConvTranspose",)), "strides", [1])[0])


def _text_encoder(q: _Shapes) -> dict[str, Any]:
    n_symbols, hidden = q.shape("enc_p.emb.weight")
    _, n_rel, head_dim = q.shape("enc_p.encoder.attn_layers.0.emb_rel_k")
    filt, _, kernel = q.shape("enc_p.encoder.ffn_layers.0.conv_1.weight")
    if hidden % head_dim or n_rel % 2 == 0:
        raise PiperImportError(f"odd attention shapes: hidden {hidden}, relative table {n_rel}x{head_dim}")
    latent = q.shape("enc_p.proj.weight")[0] // 2
    if latent != hidden:
        raise PiperImportError(f"inter_channels {latent} != hidden_channels {hidden} (piper always ties them)")
    return {
        "num_symbols": n_symbols,
        "hidden_channels": hidden,
        "filter_channels": filt,
        "n_heads": hidden // head_dim,
        "n_layers": q.count(r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight"),
        "kernel_size": kernel,
        "window_size": (n_rel - 1) // 2,
    }


def _duration_predictor(q: _Shapes) -> dict[str, Any]:
    spline_flows = q.indices(r"dp\.flows\.(\d+)\.pre\.weight")
    if not spline_flows:
        raise PiperImportError("no stochastic duration predictor flows (dp.flows.N) found; "
                               "deterministic duration predictors are not supported")
    tail_bound = 5.0
    for node in q.graph.nodes_in(f"/dp/flows.{spline_flows[-1]}/", "LessOrEqual"):
        bound = q.graph.arrays.get(node.input[1], q.graph.constants.get(node.input[1]))
        if bound is not None and bound.size == 1:
            tail_bound = float(bound)
    return {
        "dp_filter_channels": q.shape("dp.pre.weight")[0],
        "dp_kernel_size": q.shape("dp.convs.convs_sep.0.weight")[2],
        "dp_n_flows": len(spline_flows) + 1,  # one flow is skipped in reverse and not exported
        "dp_num_bins": (q.shape(f"dp.flows.{spline_flows[0]}.proj.weight")[0] + 1) // 3,
        "dp_tail_bound": tail_bound,
    }


def _coupling_flows(q: _Shapes) -> dict[str, Any]:
    layers = q.count(r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.weight")
    return {
        "flow_n_flows": q.count(r"flow\.flows\.(\d+)\.pre\.weight"),
        "flow_kernel_size": q.shape("flow.flows.0.enc.in_layers.0.weight")[2],
        "flow_dilation_rate": q.dilation("flow.flows.0.enc.in_layers.1.weight") if layers > 1 else 1,
        "flow_n_layers": layers,
    }


def _decoder(q: _Shapes) -> dict[str, Any]:
    n_ups = q.count(r"dec\.ups\.(\d+)\.weight")
    resblock = "1" if any(re.fullmatch(r"dec\.resblocks\.\d+\.convs1\.\d+\.weight", t) for t in q.names) else "2"
    first = "convs1" if resblock == "1" else "convs"
    n_res = q.count(rf"dec\.resblocks\.(\d+)\.{first}\.0\.weight")
    if n_ups == 0 or n_res % n_ups:
        raise PiperImportError(f"decoder has {n_res} resblocks for {n_ups} upsampling layers")
    kernels = range(n_res // n_ups)
    return {
        "resblock": resblock,
        "resblock_kernel_sizes": [q.shape(f"dec.resblocks.{j}.{first}.0.weight")[2] for j in kernels],
        "resblock_dilation_sizes": [
            [q.dilation(f"dec.resblocks.{j}.{first}.{c}.weight")
             for c in range(q.count(rf"dec\.resblocks\.{j}\.{first}\.(\d+)\.weight"))]
            for j in kernels],
        "upsample_rates": [q.stride(f"dec.ups.{i}.weight") for i in range(n_ups)],
        "upsample_kernel_sizes": [q.shape(f"dec.ups.{i}.weight")[2] for i in range(n_ups)],
        "upsample_initial_channel": q.shape("dec.conv_pre.weight")[0],
    }


def derive_hyperparameters(mapping: Mapping) -> dict[str, Any]:
    """Read the architecture off tensor shapes and node attributes."""
    q = _Shapes(mapping)
    n_speakers, gin = q.shape("emb_g.weight") if "emb_g.weight" in mapping.targets else (0, 0)
    return {
        **_text_encoder(q),
        **_duration_predictor(q),
        **_coupling_flows(q),
        **_decoder(q),
        "gin_channels": gin,
        "n_speakers": max(n_speakers, 1),
    }
