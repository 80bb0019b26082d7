"""Reading a Piper ONNX graph: which module parameter each initializer is.

Initializer names depend on the exporter (torch 1.13 .. 2.13); the graph's structure does
not, so each initializer is mapped by the node(s) that read it - the node's module scope,
op type and input slot - and its shape:
  * generic names (``sid``, ``onnx::Conv_*``): ``/enc_p/emb/Gather`` input 0 ->
    ``enc_p.emb.weight``, ``/flow/flows.0/enc/in_layers.0/Conv`` input 1 -> ``...weight``;
  * shared (deduplicated) initializers, read by several modules directly or through
    ``Identity`` nodes: one parameter per reading scope;
  * the duration predictor's affine log-scale: torch 2.0 folded ``exp(-logs)`` into a
    constant read by ``Mul`` (``/dp/flows.0/Exp_output_0``); later exporters keep the ``Exp``
    node and store ``-logs``. Either is turned back into ``logs``.

``onnx`` is an optional dependency (extra ``import``): it is imported inside the functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PiperImportError


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


class Graph:
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

    def nodes_in(self, prefix: str, op: str) -> list[Any]:
        """The `op` nodes under a module scope (e.g. "/dp/flows.3/")."""
        return [n for n in self.nodes if n.op_type == op and n.name.startswith(prefix)]

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


class Mapping:
    """parameter -> (initializer, transform, node that reads it); built in two passes."""

    def __init__(self, graph: Graph):
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
