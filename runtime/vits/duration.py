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

from . import scripted
from .common import ChannelLayerNorm, TimeMajorConv, same_padding
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


class _TimeMajorDDS:
    """DilatedDepthSeparableConv on time-major [B, T, C] activations. The depthwise 3-tap conv
    is three multiply-adds on shifted frames (oneDNN took ~330 us for one of these few-frame
    convs, the elementwise form a few us), LayerNorm runs on the last axis, and the 1x1 conv is
    one matmul. `mask` [B, T, 1] is None when nothing is padded."""

    def __init__(self, dds: DilatedDepthSeparableConv):
        taps, bias, dilation, norm1, pointwise, pointwise_bias, norm2, eps = [], [], [], [], [], [], [], set()
        for sep, n1, pw, n2 in zip(dds.convs_sep, dds.norms_1, dds.convs_1x1, dds.norms_2):
            if sep.kernel_size[0] != 3:
                raise ValueError(f"time-major DDS conv supports 3 taps, not {sep.kernel_size[0]}")
            taps.append(sep.weight[:, 0, :].t().contiguous())  # [3, C]: tap-major per-channel weights
            bias.append(sep.bias)
            dilation.append(sep.dilation[0])
            norm1.append([n1.gamma, n1.beta])
            pointwise.append(pw.weight[:, :, 0].t().contiguous())  # [Cin, Cout]: one NN matmul
            pointwise_bias.append(pw.bias)
            norm2.append([n2.gamma, n2.beta])
            eps |= {n1.eps, n2.eps}
        if len(eps) != 1:
            raise ValueError(f"DDS LayerNorms with different eps: {sorted(eps)}")
        self.args = (taps, bias, dilation, norm1, pointwise, pointwise_bias, norm2, eps.pop())

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        return scripted.run("dilated_depth_separable", x, *self.args, mask, g)


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
    # Boundary derivatives are pinned so that min_derivative + softplus(c) == 1 (matches the tails).
    edge = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))
    return scripted.run("spline_inverse", y, unnorm_widths, unnorm_heights, unnorm_derivs, float(tail_bound),
                        _MIN_BIN_WIDTH, _MIN_BIN_HEIGHT, _MIN_DERIVATIVE, edge)


class ElementwiseAffine(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        return (x - self.m) * torch.exp(-self.logs) * x_mask

    def reverse_time_major(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = (x - self.m[:, 0]) * torch.exp(-self.logs[:, 0])
        return y if mask is None else y * mask


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
        self._fast: tuple | None = None

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, :1], x[:, 1:]
        h = self.convs(self.pre(x0), x_mask, g=g)
        h = (self.proj(h) * x_mask).transpose(1, 2)  # [B, T, 3K-1]
        nb, scale = self.num_bins, 1.0 / math.sqrt(self.filter_channels)
        x1 = rational_quadratic_inverse(
            x1[:, 0], h[..., :nb] * scale, h[..., nb:2 * nb] * scale, h[..., 2 * nb:], self.tail_bound
        ).unsqueeze(1)
        return torch.cat([x0, x1], 1) * x_mask

    def reverse_time_major(self, z: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
        """`reverse` on time-major z [B, T, 2], g [B, T, C] (after `fuse`)."""
        w_pre, b_pre, convs, proj = self._fast
        x0 = z[..., :1]
        h = convs(torch.addcmul(b_pre, x0, w_pre), mask, g=g)  # pre: a 1-channel 1x1 conv is an outer product
        h = proj(h)
        if mask is not None:
            h = h * mask
        nb, scale = self.num_bins, 1.0 / math.sqrt(self.filter_channels)
        x1 = rational_quadratic_inverse(
            z[..., 1], h[..., :nb] * scale, h[..., nb:2 * nb] * scale, h[..., 2 * nb:], self.tail_bound
        ).unsqueeze(-1)
        out = torch.cat([x0, x1], -1)
        return out if mask is None else out * mask

    @torch.no_grad()
    def fuse(self) -> None:
        self._fast = (self.pre.weight[:, 0, 0].contiguous(), self.pre.bias, _TimeMajorDDS(self.convs),
                      TimeMajorConv.of(self.proj))


class StochasticDurationPredictor(nn.Module):
    """Parameter layout: flows.0 affine, flows.{3,5,7} spline flows; flows.1 (the flow that
    reverse inference skips) and the training-only posterior are not part of the exported
    graph, so their slots hold parameterless placeholders."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        fc, k = cfg.dp_filter_channels, cfg.dp_kernel_size
        self.pre = nn.Conv1d(cfg.hidden_channels, fc, 1)
        # speaker conditioning added after `pre` (multi-speaker voices only)
        self.cond = nn.Conv1d(cfg.gin_channels, fc, 1) if cfg.gin_channels else None
        self.proj = nn.Conv1d(fc, fc, 1)
        self.convs = DilatedDepthSeparableConv(fc, k, 3)
        flows: list[nn.Module] = [ElementwiseAffine(2)]
        for i in range(cfg.dp_n_flows):
            # slot 1 is the skipped flow; every other slot after a spline flow is a channel flip
            flows.append(nn.Identity() if i == 0 else ConvSplineFlow(fc, k, 3, cfg.dp_num_bins, cfg.dp_tail_bound))
            flows.append(nn.Identity())
        self.flows = nn.ModuleList(flows)
        self._fast: tuple | None = None

    @torch.no_grad()
    def fuse(self) -> None:
        """Prepare the time-major fast path (`reverse` then takes it); call again after
        changing weights. The reference modules stay for tests."""
        self._fast = (TimeMajorConv.of(self.pre), TimeMajorConv.of(self.proj), _TimeMajorDDS(self.convs))
        for layer in self.flows:
            if isinstance(layer, ConvSplineFlow):
                layer.fuse()

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, noise: torch.Tensor,
                g: torch.Tensor | None = None) -> torch.Tensor:
        """x: encoder hidden [B,C,T]; noise: [B,2,T] already scaled by noise_w; g: [B, gin]
        speaker embeddings (multi-speaker). Returns log-durations [B,1,T]."""
        cond = None if g is None else g @ self.cond.weight[:, :, 0].t() + self.cond.bias  # [B, fc]
        if self._fast is not None:
            return self._reverse_time_major(x, x_mask, noise, cond)
        h = self.convs(self.pre(x), x_mask, None if cond is None else cond.unsqueeze(-1))
        h = self.proj(h) * x_mask
        z = noise
        for spline in self._reverse_steps():
            z = torch.flip(z, [1]) if spline is None else spline.reverse(z, x_mask, h)
        z = self.flows[0].reverse(z, x_mask)
        return z[:, :1]

    def _reverse_steps(self):
        """The reverse pass before the final affine: flip, spline(n-1), flip, ..., spline(1st
        kept), flip; yields each spline flow, or None for a channel flip (slot 1 is skipped)."""
        for idx in range(len(self.flows) - 1, 0, -1):
            layer = self.flows[idx]
            if isinstance(layer, ConvSplineFlow):
                yield layer
            elif idx != 1:
                yield None

    def _reverse_time_major(self, x: torch.Tensor, x_mask: torch.Tensor, noise: torch.Tensor,
                            cond: torch.Tensor | None = None) -> torch.Tensor:
        """`reverse` with every tensor time-major [B, T, C]; no mask arithmetic when nothing is
        padded (a single request). The op overhead of the channel-first form (copies, slow
        few-frame convs) was ~15 ms per sentence for ~1 GFLOP of work."""
        pre, proj, convs = self._fast
        mask = x_mask.transpose(1, 2) if bool((x_mask == 0).any()) else None  # [B, T, 1]
        h = convs(pre(x.transpose(1, 2)), mask, None if cond is None else cond.unsqueeze(1))
        h = proj(h)
        if mask is not None:
            h = h * mask
        z = noise.transpose(1, 2)
        for spline in self._reverse_steps():
            z = torch.flip(z, [-1]) if spline is None else spline.reverse_time_major(z, mask, h)
        z = self.flows[0].reverse_time_major(z, mask)
        return z[..., :1].transpose(1, 2)
