"""HiFi-GAN generator (resblock type "2") turning latent frames into a waveform.

Batches are decoded packed end to end along time (see Generator.decode) rather than padded.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .common import same_padding
from .config import VitsConfig

_LRELU_SLOPE = 0.1


class PolyphaseUpsample(nn.Module):
    """Transposed conv (stride S) stored as in ConvTranspose1d: weight [Cin, Cout, K], bias [Cout].

    `polyphase()` rewrites it as one ordinary conv producing the S output phases of each input
    frame as channels (phase-major); in channels-last layout the interleave is then a free view.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int):
        super().__init__()
        self.stride = stride
        self.kernel_size = kernel_size
        self.padding = (kernel_size - stride) // 2
        self.weight = nn.Parameter(torch.zeros(cin, cout, kernel_size))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    @torch.no_grad()
    def polyphase(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """-> (weight [S*Cout, Cin, taps], bias [S*Cout], left pad, right pad)."""
        s, k, p = self.stride, self.kernel_size, self.padding
        cin, cout, _ = self.weight.shape
        # Output sample q*S + r takes input frame n = q + d through tap r + p - d*S.
        taps = [(r, d, r + p - d * s) for r in range(s) for d in range(-k, k + 1) if 0 <= r + p - d * s < k]
        d_min = min(d for _, d, _ in taps)
        d_max = max(d for _, d, _ in taps)
        w = self.weight.new_zeros(s, cout, cin, d_max - d_min + 1)
        for r, d, tap in taps:
            w[r, :, :, d - d_min] = self.weight[:, :, tap].transpose(0, 1)
        return w.reshape(s * cout, cin, -1), self.bias.repeat(s), -d_min, d_max


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, _LRELU_SLOPE))
        return x


class _Conv:
    """A conv prepared for the fast path: 4-D channels-last weight ([O, I, 1, K]) and 2-D padding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pad: tuple[int, int], dilation: int = 1):
        self.weight = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        self.bias = None if bias is None else bias.contiguous()
        self.pad = pad
        self.dilation = dilation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad[0] == self.pad[1]:
            return F.conv2d(x, self.weight, self.bias, padding=(0, self.pad[0]), dilation=(1, self.dilation))
        x = F.pad(x, (self.pad[0], self.pad[1]))
        return F.conv2d(x, self.weight, self.bias, dilation=(1, self.dilation))

    @classmethod
    def of(cls, conv: nn.Conv1d, scale: float = 1.0) -> "_Conv":
        p = conv.padding[0]
        return cls(conv.weight.detach() * scale, None if conv.bias is None else conv.bias.detach(), (p, p),
                   conv.dilation[0])


class Generator(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.rates = cfg.upsample_rates
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.hidden_channels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            cin, cout = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(PolyphaseUpsample(cin, cout, k, rate))
            for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock2(cout, rk, rd))
        self.conv_post = nn.Conv1d(ch // 2 ** len(cfg.upsample_rates), 1, 7, padding=3, bias=False)
        self._plan: dict | None = None

    @torch.no_grad()
    def fuse(self) -> None:
        """Build the fast path: channels-last 2-D convs, polyphase upsampling, and the
        1/num_kernels averaging of the resblocks folded into the next layer's weights
        (leaky ReLU commutes with a positive scale). Call again after changing weights."""
        inv = 1.0 / self.num_kernels
        ups = []
        for i, up in enumerate(self.ups):
            w, b, pl, pr = up.polyphase()
            ups.append(_Conv(w * (inv if i > 0 else 1.0), b, (pl, pr)))
        # Widest one-sided reach of any conv, in latent frames, at the resolution it runs at.
        reach = self.conv_pre.padding[0]
        scale = 1
        for i, up in enumerate(self.ups):
            reach = max(reach, math.ceil(max(ups[i].pad) / scale))
            scale *= self.rates[i]
            for blk in self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]:
                reach = max(reach, *(math.ceil(c.padding[0] / scale) for c in blk.convs))
        self._plan = {
            "gap": reach + 1,
            "pre": _Conv.of(self.conv_pre),
            "ups": ups,
            "res": [[_Conv.of(c) for c in blk.convs] for blk in self.resblocks],
            "post": _Conv.of(self.conv_post, inv),
        }

    def unfuse(self) -> None:
        self._plan = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T] latent frames, every row fully valid -> [B, 1, T*hop]."""
        if self._plan is None:
            return self._reference(x)
        return self._fast(x, [])

    def decode(self, z: torch.Tensor, frame_lengths: list[int]) -> list[torch.Tensor]:
        """Decode a padded batch [B, C, T] into one 1-D waveform per row.

        Rows are packed end to end along time with zero gaps wider than any conv's reach and the
        gaps are re-zeroed after every conv, so each segment sees exactly the zero padding it
        would see alone (batch invariance) while no compute is spent on padding.
        """
        if self._plan is None:
            self.fuse()
        hop = self.hop
        if len(frame_lengths) == 1:
            n = frame_lengths[0]
            return [self._fast(z[:1, :, :n], [])[0, 0]]
        gap = self._plan["gap"]
        parts, gaps, starts, pos = [], [], [], 0
        for i, n in enumerate(frame_lengths):
            if i:
                parts.append(z.new_zeros(z.shape[1], gap))
                gaps.append((pos, pos + gap))
                pos += gap
            starts.append(pos)
            parts.append(z[i, :, :n])
            pos += n
        audio = self._fast(torch.cat(parts, 1).unsqueeze(0), gaps)[0, 0]
        return [audio[s * hop:(s + n) * hop] for s, n in zip(starts, frame_lengths)]

    @property
    def hop(self) -> int:
        n = 1
        for r in self.rates:
            n *= r
        return n

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """Straightforward HiFi-GAN forward; the fast path must match it."""
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, _LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(blk(x) for blk in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    def _fast(self, x: torch.Tensor, gaps: list[tuple[int, int]]) -> torch.Tensor:
        """Channels-last fast path; `gaps` are frame ranges forced to zero after every conv."""
        plan = self._plan
        scale = 1

        def clear(t: torch.Tensor) -> torch.Tensor:
            if gaps:
                mem = t.permute(0, 2, 3, 1)  # channels-last memory order: a time slice is one block
                for a, b in gaps:
                    mem[:, :, a * scale:b * scale].zero_()
            return t

        h = clear(plan["pre"](x.unsqueeze(2).contiguous(memory_format=torch.channels_last)))  # [B, C, 1, T]
        for i, up in enumerate(plan["ups"]):
            s = self.rates[i]
            y = up(F.leaky_relu(h, _LRELU_SLOPE)).contiguous(memory_format=torch.channels_last)
            bsz, _, _, t = y.shape
            scale *= s
            # channels-last memory is [B, T, S*Cout] with phase-major channels == [B, T*S, Cout]
            h = clear(y.permute(0, 2, 3, 1).reshape(bsz, 1, t * s, -1).permute(0, 3, 1, 2))
            acc = None
            for convs in plan["res"][i * self.num_kernels:(i + 1) * self.num_kernels]:
                r = h
                for conv in convs:
                    r = clear(conv(F.leaky_relu(r, _LRELU_SLOPE))).add_(r)
                acc = r if acc is None else acc.add_(r)
            h = acc  # the 1/num_kernels is folded into the next conv's weights
        out = torch.tanh(plan["post"](F.leaky_relu(h)))
        return out[:, :, 0, :]
