"""Small building blocks shared by the VITS sub-networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def sequence_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """[B] lengths -> [B, 1, T] float mask (1 inside a sequence, 0 in padding)."""
    if max_len is None:
        max_len = int(lengths.max())
    steps = torch.arange(max_len, device=lengths.device)
    return (steps[None, :] < lengths[:, None]).unsqueeze(1).to(torch.float32)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a [B, C, T] tensor (VITS keeps time last)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.transpose(1, 2), (self.channels,), self.gamma, self.beta, self.eps)
        return y.transpose(1, 2)


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class ChannelsLastConv:
    """A Conv1d run as a 2-D conv on channels-last [B, C, 1, T] activations (memory [B][T][C]),
    oneDNN's fastest layout for these shapes (10-25% over NCW conv1d here).

    (Weights blocked once for oneDNN were tried: 20-60% faster on short sequences, but oneDNN
    picks the block size from the sequence length and re-blocks a mismatched weight with a slow
    generic reorder, 26 ms per call measured, so plain weights it is.)"""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 0, dilation: int = 1,
                 groups: int = 1):
        self.weight = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # [O, I, 1, K]
        self.bias = None if bias is None else bias.contiguous()
        self.padding, self.dilation, self.groups = padding, dilation, groups

    @classmethod
    def of(cls, conv: nn.Conv1d, scale: float = 1.0) -> "ChannelsLastConv":
        return cls(conv.weight.detach() * scale, None if conv.bias is None else conv.bias.detach(),
                   conv.padding[0], conv.dilation[0], conv.groups)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=(0, self.padding), dilation=(1, self.dilation),
                        groups=self.groups)

    def on_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The conv on an input that already carries its `padding` zero frames either side."""
        return F.conv2d(x, self.weight, self.bias, dilation=(1, self.dilation), groups=self.groups)


class TimeMajorConv:
    """A Conv1d for time-major activations [B, T, C] or [T, C].

    Time-major memory is exactly channels-last [B, C, 1, T], so LayerNorm is a plain last-axis
    norm with no transposes, and a conv is one of:
    * 1x1: one matmul against the weight stored transposed ([Cin, Cout]: MKL's plain NN gemm,
      1.3-1.6x faster than F.linear's transposed form for the few-row matrices of one sentence);
    * k taps on up to IM2COL_ROWS frames: the k shifted frames side by side (one copy), then one
      such matmul. oneDNN has no fast path for these short sequences (measured 4-14x below its
      long-sequence throughput: PyTorch sends them to its slow native conv);
    * longer, or grouped: a ChannelsLastConv on a free view of the same memory.
    """

    IM2COL_ROWS = 256

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 0, dilation: int = 1,
                 groups: int = 1):
        self.cout, self.k = weight.shape[0], weight.shape[2]  # weight: [Cout, Cin / groups, K]
        self.padding, self.dilation = padding, dilation
        self.bias = None if bias is None else bias.contiguous()
        self.grouped = groups != 1
        # tap-major rows: row j*Cin + c multiplies input channel c at tap j
        self.weight_t = None if self.grouped else weight.permute(2, 1, 0).reshape(-1, self.cout).contiguous()
        self.conv = (None if self.k == 1 and not self.grouped
                     else ChannelsLastConv(weight, bias, padding, dilation, groups))

    @classmethod
    def of(cls, conv: nn.Conv1d, scale: float = 1.0) -> "TimeMajorConv":
        return cls(conv.weight.detach() * scale, None if conv.bias is None else conv.bias.detach(),
                   conv.padding[0], conv.dilation[0], conv.groups)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(x2, self.weight_t)
        return torch.addmm(self.bias, x2, self.weight_t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, (t, cin) = x.shape[:-2], x.shape[-2:]
        if self.k == 1 and not self.grouped:
            return self._matmul(x.reshape(-1, cin)).view(*lead, t, self.cout)
        xb = x.reshape(-1, t, cin)
        if not self.grouped and t <= self.IM2COL_ROWS:
            p, d = self.padding, self.dilation
            xp = F.pad(xb, (0, 0, p, p))  # zero frames either side, as the conv's own padding
            cols = xp.as_strided((xp.shape[0], t, self.k, cin), (xp.shape[1] * cin, cin, d * cin, 1))
            return self._matmul(cols.reshape(-1, self.k * cin)).view(*lead, t, self.cout)
        y = self.conv(xb.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)  # channels-last out: a view
        return y.reshape(*lead, t, self.cout)


def gaps_between(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, frames) of requests packed end to end -> the frame ranges between them."""
    return [(s0 + n0, s1) for (s0, n0), (s1, _) in zip(segments, segments[1:])]


def zero_frames(x: torch.Tensor, gaps: list[tuple[int, int]], scale: int = 1, offset: int = 0) -> torch.Tensor:
    """Zero, in place, the gap frames of a time-major [..., T, C] tensor (or chunk) whose first row
    is frame `offset` at `scale` rows per latent frame. Returns x."""
    if gaps:
        n = x.shape[-2]
        for a, b in gaps:
            lo, hi = max(a * scale - offset, 0), min(b * scale - offset, n)
            if lo < hi:
                x[..., lo:hi, :].zero_()
    return x
