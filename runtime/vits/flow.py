"""Mean-only residual coupling flows with WaveNet-style conditioning stacks (reverse direction)."""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from . import scripted
from .common import TimeMajorConv, same_padding
from .config import VitsConfig
from .lanes import SERIAL, Lanes, pieces


class WaveNetStack(nn.Module):
    """Gated dilated convs (tanh * sigmoid) with residual and skip outputs; with `gin` > 0 a
    speaker embedding is projected (cond_layer) and added before each gate."""

    def __init__(self, channels: int, kernel_size: int, dilation_rate: int, n_layers: int, gin: int = 0):
        super().__init__()
        self.channels = channels
        self.cond_layer = nn.Conv1d(gin, 2 * channels * n_layers, 1) if gin else None
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate**i
            self.in_layers.append(
                nn.Conv1d(channels, 2 * channels, kernel_size, dilation=dilation,
                          padding=same_padding(kernel_size, dilation))
            )
            # the last layer only feeds the skip path
            out = 2 * channels if i < n_layers - 1 else channels
            self.res_skip_layers.append(nn.Conv1d(channels, out, 1))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        c = self.channels
        skip = None
        last = len(self.in_layers) - 1
        cond = None if g is None else self.cond_layer(g.unsqueeze(-1))  # [B, 2C*layers, 1]
        for i, (inp, rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = inp(x)
            if cond is not None:
                a = a + cond[:, 2 * c * i:2 * c * (i + 1)]
            acts = torch.tanh(a[:, :c]) * torch.sigmoid(a[:, c:])
            r = rs(acts)
            if i < last:
                x = (x + r[:, :c]) * x_mask
                r = r[:, c:]
            skip = r if skip is None else skip + r
        return skip * x_mask


class MeanOnlyCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 gin: int = 0):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WaveNetStack(hidden, kernel_size, dilation_rate, n_layers, gin)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reach(self) -> int:
        """Frames an output depends on either side: the stacked reach of the WaveNet convs."""
        return sum(conv.padding[0] for conv in self.enc.in_layers)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """Reference form on [B, C, T] with a mask (g: [B, gin] speakers); `reverse_packed` is
        the fast path."""
        x0, x1 = x[:, : self.half], x[:, self.half:]
        h = self.pre(x0) * x_mask
        m = self.post(self.enc(h, x_mask, g)) * x_mask
        return torch.cat([x0, (x1 - m) * x_mask], 1)

    @torch.no_grad()
    def fuse(self) -> None:
        """Prepare the time-major fast path (call again after changing weights): the convs as
        TimeMajorConv, handed to the scripted body (scripted.coupling_reverse) as plain lists."""
        pre, post = TimeMajorConv.of(self.pre), TimeMajorConv.of(self.post)
        layers = [(TimeMajorConv.of(i), TimeMajorConv.of(r)) for i, r in zip(self.enc.in_layers, self.enc.res_skip_layers)]
        self._fast = (
            self.half, self.enc.channels, pre.weight_t, pre.bias,
            [i.weight_t for i, _ in layers], [i.bias for i, _ in layers], [i.k for i, _ in layers],
            [i.padding for i, _ in layers], [i.dilation for i, _ in layers],
            [i.weight_t if i.conv is None else i.conv.weight for i, _ in layers],  # (1x1: unused)
            [r.weight_t for _, r in layers], [r.bias for _, r in layers], post.weight_t, post.bias,
        )

    def speaker_gate(self, g: torch.Tensor) -> torch.Tensor:
        """[gin] speaker embedding -> [2C*layers] gate conditioning (cond_layer's projection)."""
        return self.enc.cond_layer.weight[:, :, 0] @ g + self.enc.cond_layer.bias

    @staticmethod
    def gate_frames(gates: list[tuple[int, int, torch.Tensor]], lo: int, hi: int) -> torch.Tensor:
        """Per-frame gate conditioning [hi - lo, 2C*layers] for packed frames lo..hi from
        (start, frames, `speaker_gate`) segments; gap frames get zeros (they are re-zeroed)."""
        for start, n, vec in gates:
            if start <= lo and hi <= start + n:  # one request covers the chunk (no gaps): one row, broadcast
                return vec.unsqueeze(0)
        out = gates[0][2].new_zeros(hi - lo, gates[0][2].shape[0])
        for start, n, vec in gates:
            a, z = max(start, lo), min(start + n, hi)
            if a < z:
                out[a - lo:z - lo] = vec
        return out

    def reverse_packed(self, x: torch.Tensor, gaps: list[tuple[int, int]], offset: int = 0,
                       gates: list[tuple[int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Time-major x [T, C] whose gap frames (shifted by `offset`) are zero and are kept
        zero after every conv, as the mask does in `reverse`. `gates`: (start, frames,
        `speaker_gate`) per packed request (multi-speaker voices)."""
        cond = None if gates is None else self.gate_frames(gates, offset, offset + x.shape[0])
        return scripted.run("coupling_reverse", x, *self._fast, cond, gaps, offset, TimeMajorConv.IM2COL_ROWS)


class CouplingFlow(nn.Module):
    """flows.{0,2,4,..} are couplings; the odd slots are channel flips (no parameters)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(cfg.flow_n_flows):
            layers.append(MeanOnlyCoupling(cfg.hidden_channels, cfg.hidden_channels, cfg.flow_kernel_size,
                                           cfg.flow_dilation_rate, cfg.flow_n_layers, cfg.gin_channels))
            layers.append(nn.Identity())
        self.flows = nn.ModuleList(layers)
        # speaker embedding bytes -> each coupling's gate conditioning: projecting it reads every
        # coupling's cond_layer (12 MiB for a medium voice, 2.7 ms with cold caches), so it is
        # done once per speaker, not per synthesis
        self._gates: dict[bytes, list[torch.Tensor]] = {}
        self._gates_lock = threading.Lock()  # the express worker synthesizes beside the batch worker

    GATE_CACHE_SPEAKERS = 64

    def speaker_gates(self, g: torch.Tensor) -> list[torch.Tensor]:
        """[gin] embedding -> `speaker_gate` of each coupling, in `self.flows` order (cached)."""
        key = g.detach().float().cpu().numpy().tobytes()
        with self._gates_lock:
            gates = self._gates.get(key)
            if gates is None:
                gates = [layer.speaker_gate(g) if isinstance(layer, MeanOnlyCoupling) else None
                         for layer in self.flows]
                if len(self._gates) >= self.GATE_CACHE_SPEAKERS:
                    self._gates.pop(next(iter(self._gates)))  # oldest first
                self._gates[key] = gates
        return gates

    def reach_frames(self) -> int:
        """Widest one-sided reach of one conv (every conv's input is re-masked)."""
        return max(conv.padding[0] for f in self.flows if isinstance(f, MeanOnlyCoupling)
                   for conv in f.enc.in_layers)

    def reverse(self, z: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """Reference form: z, mask [B, C, T], [B, 1, T], g [B, gin]; `reverse_packed` must match it."""
        for layer in reversed(self.flows):
            if isinstance(layer, MeanOnlyCoupling):
                z = layer.reverse(z, mask, g)
            else:
                z = torch.flip(z, [1])
        return z

    def fuse(self) -> None:
        self._gates.clear()
        for layer in self.flows:
            if isinstance(layer, MeanOnlyCoupling):
                layer.fuse()

    def reverse_packed(self, z: torch.Tensor, gaps: list[tuple[int, int]], lanes: Lanes = SERIAL,
                       speaker: list[tuple[int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Time-major z [T, C] with zero `gaps` (requests packed end to end). With several lanes
        each coupling runs on time chunks in parallel, each chunk with `reach()` frames of real
        neighbours either side (cropped afterwards), so the result is that of one pass."""
        per_request = None if speaker is None else [(s, n, self.speaker_gates(g)) for s, n, g in speaker]
        for i in reversed(range(len(self.flows))):
            layer = self.flows[i]
            if isinstance(layer, MeanOnlyCoupling):
                gates = None if per_request is None else [(s, n, g[i]) for s, n, g in per_request]
                z = _chunked(layer, z, gaps, lanes, gates)
            else:
                z = torch.flip(z, [1])
        return z


# Frames x hidden^2 per chunk below which a chunk on another lane costs more in hand-offs
# between cores than it saves (measured on 2 cores: x_low's 96 channels gain from ~100-frame
# chunks, medium's 192 from ~30).
_PIECE_MIN_WORK = 1_000_000


def _chunked(layer: MeanOnlyCoupling, z: torch.Tensor, gaps: list[tuple[int, int]], lanes: Lanes,
             gates=None) -> torch.Tensor:
    t = z.shape[0]
    halo = layer.reach()
    n = lanes.count(t, max(2 * halo, math.ceil(_PIECE_MIN_WORK / layer.enc.channels**2)))
    if n == 1:
        return layer.reverse_packed(z, gaps, 0, gates)

    def chunk(bounds: tuple[int, int]) -> torch.Tensor:
        a, b = bounds
        lo, hi = max(0, a - halo), min(t, b + halo)
        return layer.reverse_packed(z[lo:hi], gaps, lo, gates)[a - lo:b - lo]

    return torch.cat(lanes.map(chunk, pieces(t, n)), dim=0)
