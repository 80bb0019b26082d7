"""Mean-only residual coupling flows with WaveNet-style conditioning stacks (reverse direction)."""

from __future__ import annotations

import torch
from torch import nn

from .common import TimeMajorConv, same_padding, zero_frames
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
        """Prepare the time-major fast path (call again after changing weights)."""
        self._fast = {
            "pre": TimeMajorConv.of(self.pre),
            "layers": [(TimeMajorConv.of(i), TimeMajorConv.of(r))
                       for i, r in zip(self.enc.in_layers, self.enc.res_skip_layers)],
            "post": TimeMajorConv.of(self.post),
        }

    def speaker_frames(self, speaker: list[tuple[int, int, torch.Tensor]], lo: int, hi: int) -> torch.Tensor:
        """Per-frame gate conditioning [hi - lo, 2C*layers] for packed frames lo..hi from
        (start, frames, [gin] embedding) segments; gap frames get zeros (they are re-zeroed)."""
        w, b = self.enc.cond_layer.weight[:, :, 0], self.enc.cond_layer.bias
        for start, n, g in speaker:
            if start <= lo and hi <= start + n:  # one request covers the chunk (no gaps): one row, broadcast
                return (w @ g + b).unsqueeze(0)
        out = w.new_zeros(hi - lo, w.shape[0])
        for start, n, g in speaker:
            a, z = max(start, lo), min(start + n, hi)
            if a < z:
                out[a - lo:z - lo] = w @ g + b
        return out

    def reverse_packed(self, x: torch.Tensor, gaps: list[tuple[int, int]], offset: int = 0,
                       speaker: list[tuple[int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Time-major x [T, C] whose gap frames (shifted by `offset`) are zero and are kept
        zero after every conv, as the mask does in `reverse`. `speaker`: (start, frames, [gin])
        per packed request (multi-speaker voices)."""
        fast, c = self._fast, self.enc.channels
        x0 = x[:, :self.half]
        h = zero_frames(fast["pre"](x0), gaps, 1, offset)
        skip = None
        last = len(fast["layers"]) - 1
        cond = None if speaker is None else self.speaker_frames(speaker, offset, offset + x.shape[0])
        for i, (inp, rs) in enumerate(fast["layers"]):
            a = inp(h)
            if cond is not None:
                a = a + cond[:, 2 * c * i:2 * c * (i + 1)]
            r = rs(torch.tanh(a[:, :c]) * torch.sigmoid(a[:, c:]))
            if i < last:
                h = zero_frames(h + r[:, :c], gaps, 1, offset)
                r = r[:, c:]
            skip = r if skip is None else skip + r
        m = fast["post"](zero_frames(skip, gaps, 1, offset))
        return torch.cat([x0, zero_frames(x[:, self.half:] - m, gaps, 1, offset)], 1)


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
        for layer in self.flows:
            if isinstance(layer, MeanOnlyCoupling):
                layer.fuse()

    def reverse_packed(self, z: torch.Tensor, gaps: list[tuple[int, int]], lanes: Lanes = SERIAL,
                       speaker: list[tuple[int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Time-major z [T, C] with zero `gaps` (requests packed end to end). With several lanes
        each coupling runs on time chunks in parallel, each chunk with `reach()` frames of real
        neighbours either side (cropped afterwards), so the result is that of one pass."""
        for layer in reversed(self.flows):
            if isinstance(layer, MeanOnlyCoupling):
                z = _chunked(layer, z, gaps, lanes, speaker)
            else:
                z = torch.flip(z, [1])
        return z


def _chunked(layer: MeanOnlyCoupling, z: torch.Tensor, gaps: list[tuple[int, int]], lanes: Lanes,
             speaker=None) -> torch.Tensor:
    t = z.shape[0]
    halo = layer.reach()
    n = lanes.count(t, 2 * halo)
    if n == 1:
        return layer.reverse_packed(z, gaps, 0, speaker)

    def chunk(bounds: tuple[int, int]) -> torch.Tensor:
        a, b = bounds
        lo, hi = max(0, a - halo), min(t, b + halo)
        return layer.reverse_packed(z[lo:hi], gaps, lo, speaker)[a - lo:b - lo]

    return torch.cat(lanes.map(chunk, pieces(t, n)), dim=0)
