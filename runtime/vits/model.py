"""VITS synthesizer for inference: text encoder -> durations -> prior sample -> flows -> decoder.

Batching contract: every random draw comes from the request's own CPU torch.Generator and
has the request's own length, and every layer masks padding, so a request's waveform does
not depend on what else is in its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import sequence_mask
from .config import VitsConfig
from .decoder import Generator
from .duration import StochasticDurationPredictor
from .flow import CouplingFlow
from .text_encoder import TextEncoder


def _padded_noise(gens: Sequence[torch.Generator], channels: int, lengths: Sequence[int]) -> torch.Tensor:
    """Draw [channels, len_i] from each request's generator (on CPU) and zero-pad to [B, C, max]."""
    out = torch.zeros(len(lengths), channels, max(lengths))
    for i, (g, n) in enumerate(zip(gens, lengths)):
        out[i, :, :n] = torch.randn(channels, n, generator=g)
    return out


class VitsModel(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_p = TextEncoder(cfg)
        self.dp = StochasticDurationPredictor(cfg)
        self.flow = CouplingFlow(cfg)
        self.dec = Generator(cfg)

    def fuse_for_inference(self) -> None:
        """One-off load-time rewrite of the decoder into its fast path (see Generator.fuse)."""
        self.dec.fuse()

    def infer(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        generators: Sequence[torch.Generator],
        noise_scale: torch.Tensor,
        length_scale: torch.Tensor,
        noise_w: torch.Tensor,
    ) -> list[torch.Tensor]:
        """ids [B,T] long, lengths [B] long, scales [B] float (all on the model's device).
        Returns one 1-D waveform per request."""
        dev = ids.device
        x, m_p, logs_p, x_mask = self.enc_p(ids, lengths)

        dp_noise = _padded_noise(generators, 2, lengths.tolist()).to(dev) * noise_w[:, None, None]
        logw = self.dp.reverse(x, x_mask, dp_noise)
        w_ceil = torch.ceil(torch.exp(logw) * x_mask * length_scale[:, None, None])[:, 0]  # [B, Tx]
        cum = torch.cumsum(w_ceil, dim=1)
        y_lengths = cum[:, -1].clamp_min(1).long()
        t_y = int(y_lengths.max())
        y_mask = sequence_mask(y_lengths, t_y)

        # Hard monotonic alignment: frame t belongs to the phoneme whose cumulative span covers it.
        frames = torch.arange(t_y, device=dev, dtype=cum.dtype)
        owner = torch.searchsorted(cum.contiguous(), frames.expand(cum.shape[0], t_y).contiguous(), right=True)
        covered = (frames[None, :] < cum[:, -1:]).unsqueeze(1).to(m_p.dtype)
        owner = owner.clamp_max(ids.shape[1] - 1).unsqueeze(1)
        m = torch.gather(m_p, 2, owner.expand(-1, m_p.shape[1], -1)) * covered
        logs = torch.gather(logs_p, 2, owner.expand(-1, logs_p.shape[1], -1)) * covered

        eps = _padded_noise(generators, m.shape[1], y_lengths.tolist()).to(dev)
        z_p = (m + eps * torch.exp(logs) * noise_scale[:, None, None]) * y_mask
        z = self.flow.reverse(z_p, y_mask)
        return self.dec.decode(z * y_mask, y_lengths.tolist())
