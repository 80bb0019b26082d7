"""HiFi-GAN generator (resblock type "2") turning latent frames into a waveform.

For padded batches every conv output is re-masked so that padding stays exactly zero,
which makes the valid part of each waveform identical to decoding the request alone
(a lone request sees zero padding at its end too).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import same_padding
from .config import VitsConfig

_LRELU_SLOPE = 0.1


class PolyphaseUpsample(nn.Module):
    """Transposed conv (stride S) stored as in ConvTranspose1d: weight [Cin, Cout, K], bias [Cout].

    After `fuse()` it runs as one ordinary Conv1d producing S phases per input frame, followed by
    an interleave; on CPU this is much faster than conv_transpose1d and gives the same result.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int):
        super().__init__()
        self.stride = stride
        self.kernel_size = kernel_size
        self.padding = (kernel_size - stride) // 2
        self.weight = nn.Parameter(torch.zeros(cin, cout, kernel_size))
        self.bias = nn.Parameter(torch.zeros(cout))
        self._poly: tuple[torch.Tensor, torch.Tensor, int, int] | None = None

    @torch.no_grad()
    def fuse(self) -> None:
        s, k, p = self.stride, self.kernel_size, self.padding
        cin, cout, _ = self.weight.shape
        # Output sample q*S + r takes input frame n = q + d through tap k = r + p - d*S.
        taps = [(r, d, r + p - d * s) for r in range(s) for d in range(-k, k + 1) if 0 <= r + p - d * s < k]
        d_min = min(d for _, d, _ in taps)
        d_max = max(d for _, d, _ in taps)
        w = self.weight.new_zeros(cout, s, cin, d_max - d_min + 1)
        for r, d, tap in taps:
            w[:, r, :, d - d_min] = self.weight[:, :, tap].transpose(0, 1)
        w = w.reshape(cout * s, cin, d_max - d_min + 1).contiguous()
        b = self.bias.repeat_interleave(s).contiguous()
        self._poly = (w, b, -d_min, d_max)

    def unfuse(self) -> None:
        self._poly = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._poly is None:
            return F.conv_transpose1d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        w, b, pad_l, pad_r = self._poly
        y = F.conv1d(F.pad(x, (pad_l, pad_r)), w, b)  # [B, Cout*S, T]
        bsz, _, t = y.shape
        return y.view(bsz, -1, self.stride, t).transpose(2, 3).reshape(bsz, -1, t * self.stride)


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for conv in self.convs:
            y = conv(F.leaky_relu(x, _LRELU_SLOPE))
            if mask is not None:
                y = y * mask
            x = x + y
        return x


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

    def fuse(self) -> None:
        for up in self.ups:
            up.fuse()

    def forward(self, x: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, T] latent frames (zero beyond each length); frame_lengths None = no padding."""
        masked = frame_lengths is not None and bool((frame_lengths != x.shape[2]).any())

        def mask_at(scale: int, t: int) -> torch.Tensor | None:
            if not masked:
                return None
            steps = torch.arange(t, device=x.device)
            return (steps[None, :] < (frame_lengths * scale)[:, None]).unsqueeze(1).to(x.dtype)

        x = self.conv_pre(x)
        mask = mask_at(1, x.shape[2])
        if mask is not None:
            x = x * mask
        scale = 1
        for i, up in enumerate(self.ups):
            scale *= self.rates[i]
            x = up(F.leaky_relu(x, _LRELU_SLOPE))
            mask = mask_at(scale, x.shape[2])
            if mask is not None:
                x = x * mask
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            acc = blocks[0](x, mask)
            for blk in blocks[1:]:
                acc = acc + blk(x, mask)
            x = acc / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        return torch.tanh(x)
