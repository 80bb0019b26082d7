"""Stochastic duration predictor, inference (reverse) direction only.

Noise z ~ N(0, I) of shape [B, 2, T] is pushed backwards through a chain of normalizing
flows conditioned on the text encoder output; the first channel is log-duration.
The spline flows use monotonic rational-quadratic splines with linear tails
(Durkan et al., "Neural Spline Flows", 2019), inverted analytically.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .common import ChannelLayerNorm, same_padding
from .config import VitsConfig

_MIN_BIN_WIDTH = 1e-3
_MIN_BIN_HEIGHT = 1e-3
_MIN_DERIVATIVE = 1e-3


class DilatedDepthSeparableConv(nn.Module):
    """Residual stack of depthwise dilated conv -> LN -> GELU -> 1x1 conv -> LN -> GELU."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int):
        super().__init__()
        self.convs_sep = nn.ModuleList()
        self.convs_1x1 = nn.ModuleList()
        self.norms_1 = nn.ModuleList()
        self.norms_2 = nn.ModuleList()
        for i in range(n_layers):
            dilation = kernel_size**i
            self.convs_sep.append(
                nn.Conv1d(channels, channels, kernel_size, groups=channels, dilation=dilation,
                          padding=same_padding(kernel_size, dilation))
            )
            self.convs_1x1.append(nn.Conv1d(channels, channels, 1))
            self.norms_1.append(ChannelLayerNorm(channels))
            self.norms_2.append(ChannelLayerNorm(channels))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        if g is not None:
            x = x + g
        for sep, n1, pw, n2 in zip(self.convs_sep, self.norms_1, self.convs_1x1, self.norms_2):
            y = F.gelu(n1(sep(x * x_mask)))
            y = F.gelu(n2(pw(y)))
            x = x + y
        return x * x_mask


def rational_quadratic_inverse(
    y: torch.Tensor,
    unnorm_widths: torch.Tensor,
    unnorm_heights: torch.Tensor,
    unnorm_derivs: torch.Tensor,
    tail_bound: float,
) -> torch.Tensor:
    """Invert a monotonic rational-quadratic spline on [-B, B]; identity outside (linear tails).

    y: [...]; unnorm_widths/heights: [..., K]; unnorm_derivs: [..., K-1] (interior knots).
    Computed densely for every element on a clamped input, then selected with `where`, so the
    batch never changes which elements take which code path.
    """
    num_bins = unnorm_widths.shape[-1]
    left, right = -tail_bound, tail_bound
    # Boundary derivatives are pinned so that min_derivative + softplus(c) == 1 (matches the tails).
    edge = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))
    derivs = _MIN_DERIVATIVE + F.softplus(F.pad(unnorm_derivs, (1, 1), value=edge))

    def knots(unnorm: torch.Tensor, min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = min_size + (1 - min_size * num_bins) * torch.softmax(unnorm, dim=-1)
        cum = F.pad(torch.cumsum(sizes, dim=-1), (1, 0), value=0.0)
        cum = (right - left) * cum + left
        cum = torch.cat([torch.full_like(cum[..., :1], left), cum[..., 1:-1], torch.full_like(cum[..., :1], right)], -1)
        return cum, cum[..., 1:] - cum[..., :-1]

    cumw, widths = knots(unnorm_widths, _MIN_BIN_WIDTH)
    cumh, heights = knots(unnorm_heights, _MIN_BIN_HEIGHT)

    inside = (y >= left) & (y <= right)
    yc = y.clamp(left, right)
    # Bin search on the output knots; nudge the last knot so y == right lands in the last bin.
    search = torch.cat([cumh[..., :-1], cumh[..., -1:] + 1e-6], -1)
    idx = (yc.unsqueeze(-1) >= search).sum(dim=-1, keepdim=True) - 1
    idx = idx.clamp(0, num_bins - 1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, idx).squeeze(-1)

    x_k, w_k = pick(cumw), pick(widths)
    y_k, h_k = pick(cumh), pick(heights)
    s_k = h_k / w_k
    d_k = pick(derivs[..., :-1])
    d_k1 = pick(derivs[..., 1:])

    # Solve the quadratic a*xi^2 + b*xi + c = 0 for the position xi in [0, 1] within the bin.
    dy = yc - y_k
    slope_sum = d_k + d_k1 - 2 * s_k
    a = dy * slope_sum + h_k * (s_k - d_k)
    b = h_k * d_k - dy * slope_sum
    c = -s_k * dy
    disc = (b * b - 4 * a * c).clamp_min(0)
    xi = (2 * c) / (-b - torch.sqrt(disc))
    x = xi * w_k + x_k
    return torch.where(inside, x, y)


class ElementwiseAffine(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        return (x - self.m) * torch.exp(-self.logs) * x_mask


class ConvSplineFlow(nn.Module):
    """Coupling layer: channel 0 conditions a rational-quadratic spline applied to channel 1."""

    def __init__(self, filter_channels: int, kernel_size: int, n_layers: int, num_bins: int, tail_bound: float):
        super().__init__()
        self.filter_channels = filter_channels
        self.num_bins = num_bins
        self.tail_bound = tail_bound
        self.pre = nn.Conv1d(1, filter_channels, 1)
        self.convs = DilatedDepthSeparableConv(filter_channels, kernel_size, n_layers)
        self.proj = nn.Conv1d(filter_channels, 3 * num_bins - 1, 1)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, :1], x[:, 1:]
        h = self.convs(self.pre(x0), x_mask, g=g)
        h = (self.proj(h) * x_mask).transpose(1, 2)  # [B, T, 3K-1]
        nb, scale = self.num_bins, 1.0 / math.sqrt(self.filter_channels)
        x1 = rational_quadratic_inverse(
            x1[:, 0], h[..., :nb] * scale, h[..., nb:2 * nb] * scale, h[..., 2 * nb:], self.tail_bound
        ).unsqueeze(1)
        return torch.cat([x0, x1], 1) * x_mask


class StochasticDurationPredictor(nn.Module):
    """Parameter layout: flows.0 affine, flows.{3,5,7} spline flows; flows.1 (the flow that
    reverse inference skips) and the training-only posterior are not part of the exported
    graph, so their slots hold parameterless placeholders."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        fc, k = cfg.dp_filter_channels, cfg.dp_kernel_size
        self.pre = nn.Conv1d(cfg.hidden_channels, fc, 1)
        self.proj = nn.Conv1d(fc, fc, 1)
        self.convs = DilatedDepthSeparableConv(fc, k, 3)
        flows: list[nn.Module] = [ElementwiseAffine(2)]
        for i in range(cfg.dp_n_flows):
            # slot 1 is the skipped flow; every other slot after a spline flow is a channel flip
            flows.append(nn.Identity() if i == 0 else ConvSplineFlow(fc, k, 3, cfg.dp_num_bins, cfg.dp_tail_bound))
            flows.append(nn.Identity())
        self.flows = nn.ModuleList(flows)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x: encoder hidden [B,C,T]; noise: [B,2,T] already scaled by noise_w. Returns log-durations [B,1,T]."""
        h = self.convs(self.pre(x), x_mask)
        h = self.proj(h) * x_mask
        z = noise
        # Reverse order: flip, spline(n-1), flip, ..., spline(1st kept), flip, affine.
        for idx in range(len(self.flows) - 1, 0, -1):
            layer = self.flows[idx]
            if isinstance(layer, ConvSplineFlow):
                z = layer.reverse(z, x_mask, h)
            elif idx != 1:
                z = torch.flip(z, [1])
        z = self.flows[0].reverse(z, x_mask)
        return z[:, :1]
