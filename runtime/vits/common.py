"""Small building blocks shared by the VITS sub-networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import scripted


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return scripted.time_major_conv(x, self.weight_t, self.bias, self.k, self.padding, self.dilation,
                                        None if self.conv is None else self.conv.weight,
                                        1 if self.conv is None else self.conv.groups, self.IM2COL_ROWS)


def gaps_between(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, frames) of requests packed end to end -> the frame ranges between them."""
    return [(s0 + n0, s1) for (s0, n0), (s1, _) in zip(segments, segments[1:])]
