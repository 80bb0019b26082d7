"""HiFi-GAN generator (resblock type "1" or "2") turning latent frames into a waveform.

Batches are decoded packed end to end along time (see Generator.decode) rather than padded.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import scripted
from .common import ChannelsLastConv, gaps_between, same_padding
from .config import VitsConfig
from .lanes import SERIAL, Lanes, pieces

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
    def polyphase(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """-> groups of consecutive output phases that read the same input frames, each as
        (weight [n*Cout, Cin, taps], bias [n*Cout], first frame offset d0). Phase r of output
        frame q reads input frames q+d0 .. q+d0+taps-1; splitting by group skips the all-zero taps
        a single conv over the union of offsets would multiply."""
        s, k, p = self.stride, self.kernel_size, self.padding
        cin, cout, _ = self.weight.shape
        # Output sample q*S + r takes input frame n = q + d through tap r + p - d*S.
        offsets = [[d for d in range(-k, k + 1) if 0 <= r + p - d * s < k] for r in range(s)]
        groups: list[tuple[int, int, int, int]] = []  # (first phase, last phase + 1, d0, taps)
        for r, ds in enumerate(offsets):
            key = (min(ds), max(ds) - min(ds) + 1)
            if groups and groups[-1][2:] == key:
                groups[-1] = (groups[-1][0], r + 1, *key)
            else:
                groups.append((r, r + 1, *key))
        out = []
        for r0, r1, d0, taps in groups:
            w = self.weight.new_zeros(r1 - r0, cout, cin, taps)
            for r in range(r0, r1):
                for d in offsets[r]:
                    w[r - r0, :, :, d - d0] = self.weight[:, :, r + p - d * s].transpose(0, 1)
            out.append((w.reshape((r1 - r0) * cout, cin, taps), self.bias.repeat(r1 - r0), d0))
        return out


class ResBlock2(nn.Module):
    """Residual steps x + conv_d(lrelu(x)), one per dilation."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )

    def steps(self) -> list[tuple[nn.Conv1d, ...]]:
        """Residual steps, each the convs applied in turn (leaky ReLU before each)."""
        return [(c,) for c in self.convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps():
            y = x
            for conv in step:
                y = conv(F.leaky_relu(y, _LRELU_SLOPE))
            x = x + y
        return x


class ResBlock1(ResBlock2):
    """Residual steps x + conv2(lrelu(conv1_d(lrelu(x)))): a dilated conv, then an undilated one."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        nn.Module.__init__(self)
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size)) for _ in dilations
        )

    def steps(self) -> list[tuple[nn.Conv1d, ...]]:
        return list(zip(self.convs1, self.convs2))


def _upsample_args(groups: list[tuple[torch.Tensor, torch.Tensor, int]], scale: float) -> tuple:
    """A polyphase upsampler as scripted.decoder_stage takes it: one channels-last conv per phase
    group (weights, biases), all with one symmetric padding wide enough for every group, and
    where each group's output frames start (output j reads input frames j - pad ..., so phase
    frame q, which reads q + d0 ..., is output q + d0 + pad)."""
    lo = min(d0 for _, _, d0 in groups)
    hi = max(d0 + w.shape[2] - 1 for w, _, d0 in groups)
    pad = max(-lo, hi, 0)
    convs = [ChannelsLastConv(w * scale, b, pad) for w, b, _ in groups]
    return [c.weight for c in convs], [c.bias for c in convs], [d0 + pad for _, _, d0 in groups], pad


class Generator(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.rates = cfg.upsample_rates
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.hidden_channels, ch, 7, padding=3)
        # speaker conditioning added after conv_pre (multi-speaker voices only)
        self.cond = nn.Conv1d(cfg.gin_channels, ch, 1) if cfg.gin_channels else None
        block = ResBlock1 if cfg.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            cin, cout = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(PolyphaseUpsample(cin, cout, k, rate))
            for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block(cout, rk, rd))
        self.conv_post = nn.Conv1d(ch // 2 ** len(cfg.upsample_rates), 1, 7, padding=3, bias=False)
        self._plan: dict | None = None
        # Activation elements (channels x time) per chunk of a stage on the fast path (0 = no
        # chunking): keeps a stage's working set in CPU cache; on GPUs whole-sequence convs win.
        self.chunk_elements = 1 << 19  # 2 MiB of float32: measured best of 2^16..2^20 here

    @torch.no_grad()
    def fuse(self) -> None:
        """Build the fast path: channels-last 2-D convs, polyphase upsampling, and the
        1/num_kernels averaging of the resblocks folded into the next layer's weights
        (leaky ReLU commutes with a positive scale). Call again after changing weights."""
        inv = 1.0 / self.num_kernels
        if self.conv_pre.weight.device.type != "cpu":
            self.chunk_elements = 0
        halos = []
        for i, up in enumerate(self.ups):
            s = self.rates[i]
            reach = max(sum(c.padding[0] for step in blk.steps() for c in step)
                        for blk in self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels])
            if i == len(self.ups) - 1:
                reach += self.conv_post.padding[0]
            # upsampler reads +-ceil(K/S) input frames; resblocks/output conv reach `reach` samples
            halos.append(math.ceil(up.kernel_size / up.stride) + math.ceil(reach / s) + 1)
        res = [[[ChannelsLastConv.of(c) for c in step] for step in blk.steps()] for blk in self.resblocks]
        post = ChannelsLastConv.of(self.conv_post, inv)
        stages = []  # per stage: scripted.decoder_stage's arguments but the input, gaps and offsets
        channels = []
        for i, up in enumerate(self.ups):
            blocks = res[i * self.num_kernels:(i + 1) * self.num_kernels]
            flat = [conv for steps in blocks for step in steps for conv in step]
            last = i == len(self.ups) - 1
            stages.append((
                *_upsample_args(up.polyphase(), inv if i > 0 else 1.0), self.rates[i],
                [c.weight for c in flat], [c.bias for c in flat], [c.padding for c in flat],
                [c.dilation for c in flat], [len(steps) for steps in blocks], len(blocks[0][0]),
                post.weight if last else None, post.padding,
            ))
            channels.append(flat[0].weight.shape[0])
        self._plan = {"halo": halos, "pre": ChannelsLastConv.of(self.conv_pre), "stages": stages, "channels": channels}

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, T] latent frames, every row fully valid; g: [B, gin] speaker embeddings
        (multi-speaker) -> [B, 1, T*hop]."""
        if self._plan is None:
            return self._reference(x, g)
        if g is None:
            return self._fast(x, [])
        return torch.cat([self._fast(x[i:i + 1], [], cond=[(0, x.shape[2], self.speaker_bias(g[i]))])
                          for i in range(x.shape[0])])

    @torch.no_grad()
    def speaker_bias(self, g: torch.Tensor) -> torch.Tensor:
        """[gin] speaker embedding -> the [C] vector added to every frame after conv_pre."""
        return self.cond.weight[:, :, 0] @ g + self.cond.bias

    def decode_packed(self, z: torch.Tensor, segments: list[tuple[int, int]], lanes: Lanes = SERIAL,
                      speaker: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Decode requests packed end to end along time: z [1, C, L], segments (start, frames).

        Frames between segments must be zero and at least `reach_frames() + 1` wide; they are
        re-zeroed after every conv, so each segment sees exactly the zero padding it would see
        alone (batch invariance) while no compute is spent on padding. `lanes` decode time
        chunks of each stage in parallel. `speaker`: one [gin] embedding per segment
        (multi-speaker voices), so requests for different speakers share a batch.
        """
        if self._plan is None:
            self.fuse()
        gaps = gaps_between(segments)
        cond = None if speaker is None else [(s, n, self.speaker_bias(g)) for (s, n), g in zip(segments, speaker)]
        audio = self._fast(z, gaps, lanes, cond)[0, 0]
        hop = self.hop
        return [audio[s * hop:(s + n) * hop] for s, n in segments]

    def decode_window(self, z: torch.Tensor, a: int, b: int, lanes: Lanes = SERIAL,
                      speaker: torch.Tensor | None = None) -> torch.Tensor:
        """The audio of latent frames [a, b) of one request z [1, C, n], decoded from frames
        a - R .. b + R only (R = `receptive_frames()`): the samples a whole decode gives there,
        so windows decoded one after another join into the whole (streaming)."""
        if self._plan is None:
            self.fuse()
        n, r, hop = z.shape[2], self.receptive_frames(), self.hop
        lo, hi = max(0, a - r), min(n, b + r)
        cond = None if speaker is None else [(0, hi - lo, self.speaker_bias(speaker))]
        audio = self._fast(z[:, :, lo:hi], [], lanes, cond)[0, 0]
        return audio[(a - lo) * hop:(b - lo) * hop]

    def receptive_frames(self) -> int:
        """Latent frames either side of a frame that its samples depend on, through every
        conv of the decoder (an upper bound: the sum of each stage's halo, see `fuse`)."""
        if self._plan is None:
            self.fuse()
        frames, scale = self.conv_pre.padding[0], 1
        for rate, halo in zip(self.rates, self._plan["halo"]):
            frames += math.ceil(halo / scale)
            scale *= rate
        return frames

    def reach_frames(self) -> int:
        """Widest one-sided reach of any conv, in latent frames, at the resolution it runs at."""
        reach = self.conv_pre.padding[0]
        scale = 1
        for i, up in enumerate(self.ups):
            reach = max(reach, math.ceil((up.kernel_size // up.stride) / scale))
            scale *= self.rates[i]
            for blk in self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]:
                reach = max(reach, *(math.ceil(c.padding[0] / scale) for step in blk.steps() for c in step))
        return reach

    @property
    def hop(self) -> int:
        n = 1
        for r in self.rates:
            n *= r
        return n

    def _reference(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """Straightforward HiFi-GAN forward; the fast path must match it."""
        x = self.conv_pre(x)
        if g is not None:
            x = x + self.cond(g.unsqueeze(-1))
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, _LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(blk(x) for blk in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    def _fast(self, x: torch.Tensor, gaps: list[tuple[int, int]], lanes: Lanes = SERIAL,
              cond: list[tuple[int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Channels-last fast path; `gaps` are frame ranges forced to zero after every conv;
        `cond`: (start, frames, [C] speaker vector) added to those frames after conv_pre.

        Each upsampling stage (upsample + its resblocks, + the output conv for the last one) runs
        over time chunks of about `chunk_elements` activations with a halo wider than the
        stage's receptive field, so its many intermediate tensors stay in cache instead of
        streaming through memory at full length; with several lanes the chunks of a stage run in
        parallel (at least one per lane). Halos are real neighbouring data and are cropped; the
        sequence ends get the convs' own zero padding, so results do not depend on chunking.
        """
        plan = self._plan
        h = plan["pre"](x.unsqueeze(2).contiguous(memory_format=torch.channels_last))  # [B, C, 1, T]
        if cond:
            tm = h.permute(0, 2, 3, 1)[:, 0]  # channels-last memory is time-major [B, T, C]
            for start, n, vec in cond:
                tm[:, start:start + n] += vec
        scripted.clear_channels_last(h, gaps, 1, 0)
        scale = 1
        for i in range(len(plan["stages"])):
            s = self.rates[i]
            t_in = h.shape[3]
            c_out = plan["channels"][i]
            halo = plan["halo"][i]
            cache_chunks = math.ceil(t_in / max(1, self.chunk_elements // (c_out * s))) if self.chunk_elements else 1
            n_chunks = lanes.count(t_in, 2 * halo, at_least=cache_chunks)
            if n_chunks == 1:
                h = self._stage(i, h, gaps, scale, 0)
            else:
                def chunk(bounds: tuple[int, int], h=h, i=i, s=s, halo=halo, scale=scale) -> torch.Tensor:
                    a, b = bounds
                    lo, hi = max(0, a - halo), min(t_in, b + halo)
                    y = self._stage(i, h[:, :, :, lo:hi], gaps, scale, lo)
                    return y[:, :, :, (a - lo) * s:(b - lo) * s]

                h = torch.cat(lanes.map(chunk, pieces(t_in, n_chunks)), dim=3)
            scale *= s
        return h[:, :, 0, :]

    def _stage(self, i: int, h: torch.Tensor, gaps: list[tuple[int, int]], scale: int, offset: int) -> torch.Tensor:
        """Stage i on input frames starting at `offset` (input resolution `scale` samples/frame):
        upsample, resblocks (+ the output conv for the last stage), gap frames re-zeroed after
        every conv. Its body is scripted (scripted.decoder_stage) so lanes run it without the GIL."""
        return scripted.run("decoder_stage", h, *self._plan["stages"][i], gaps, scale, offset)
