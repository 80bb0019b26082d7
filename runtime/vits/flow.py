"""Mean-only residual coupling flows with WaveNet-style conditioning stacks (reverse direction)."""

from __future__ import annotations

import torch
from torch import nn

from .common import same_padding
from .config import VitsConfig


class WaveNetStack(nn.Module):
    """Gated dilated convs (tanh * sigmoid) with residual and skip outputs; no global conditioning."""

    def __init__(self, channels: int, kernel_size: int, dilation_rate: int, n_layers: int):
        super().__init__()
        self.channels = channels
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

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        c = self.channels
        skip = None
        last = len(self.in_layers) - 1
        for i, (inp, rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = inp(x)
            acts = torch.tanh(a[:, :c]) * torch.sigmoid(a[:, c:])
            r = rs(acts)
            if i < last:
                x = (x + r[:, :c]) * x_mask
                r = r[:, c:]
            skip = r if skip is None else skip + r
        return skip * x_mask


class MeanOnlyCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WaveNetStack(hidden, kernel_size, dilation_rate, n_layers)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, : self.half], x[:, self.half:]
        h = self.pre(x0) * x_mask
        m = self.post(self.enc(h, x_mask)) * x_mask
        return torch.cat([x0, (x1 - m) * x_mask], 1)


class CouplingFlow(nn.Module):
    """flows.{0,2,4,..} are couplings; the odd slots are channel flips (no parameters)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(cfg.flow_n_flows):
            layers.append(MeanOnlyCoupling(cfg.hidden_channels, cfg.hidden_channels, cfg.flow_kernel_size,
                                           cfg.flow_dilation_rate, cfg.flow_n_layers))
            layers.append(nn.Identity())
        self.flows = nn.ModuleList(layers)

    def reach_frames(self) -> int:
        """Widest one-sided reach of one conv (every conv's input is re-masked)."""
        return max(conv.padding[0] for f in self.flows if isinstance(f, MeanOnlyCoupling)
                   for conv in f.enc.in_layers)

    def reverse(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.flows):
            if isinstance(layer, MeanOnlyCoupling):
                z = layer.reverse(z, mask)
            else:
                z = torch.flip(z, [1])
        return z
