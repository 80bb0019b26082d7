"""VITS synthesizer for inference: text encoder -> durations -> prior sample -> flows -> decoder.

Batching contract: every random draw comes from the request's own CPU torch.Generator and
has the request's own length. The text encoder and duration predictor run on a padded batch
with masks; the flows and decoder run on the requests packed end to end along time with zero
gaps that are re-masked after every conv. Either way a request's waveform does not depend on
what else is in its batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .common import gaps_between
from .config import VitsConfig
from .decoder import Generator
from .duration import StochasticDurationPredictor
from .flow import CouplingFlow
from .lanes import SERIAL, Lanes
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
        if cfg.n_speakers > 1:
            self.emb_g = nn.Embedding(cfg.n_speakers, cfg.gin_channels)

    def speaker_embeddings(self, speakers: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """[B] speaker ids -> [B, gin] embeddings (None for a single-speaker voice)."""
        if self.cfg.n_speakers <= 1:
            return None
        if speakers is None:
            speakers = torch.zeros(batch, dtype=torch.long, device=self.emb_g.weight.device)
        return self.emb_g(speakers.to(self.emb_g.weight.device))

    def fuse_for_inference(self) -> None:
        """One-off load-time rewrite of the encoder, duration predictor, flows and decoder into
        their fast paths."""
        self.enc_p.fuse()
        self.dp.fuse()
        self.flow.fuse()
        self.dec.fuse()

    def infer(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        generators: Sequence[torch.Generator],
        noise_scale: torch.Tensor,
        length_scale: torch.Tensor,
        noise_w: torch.Tensor,
        lanes: Lanes = SERIAL,
        speakers: torch.Tensor | None = None,
        speed: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """ids [B,T] long, lengths [B] long, scales [B] float (all on the model's device),
        speakers [B] long (multi-speaker voices; None: speaker 0), speed [B] float (None: 1).
        Returns one 1-D waveform per request. `lanes` (CPU) run requests' priors and time
        chunks of the flows and decoder in parallel. Requests for different speakers batch
        together: each one's speaker vector conditions only its own frames."""
        g = self.speaker_embeddings(speakers, ids.shape[0])
        z, segments = self.latents(ids, lengths, generators, noise_scale, length_scale, noise_w, lanes, g, speed)
        return self.dec.decode_packed(z.t().unsqueeze(0), segments, lanes, None if g is None else list(g))

    def infer_progressive(self, ids: torch.Tensor, lengths: torch.Tensor, generators: Sequence[torch.Generator],
                          noise_scale: torch.Tensor, length_scale: torch.Tensor, noise_w: torch.Tensor,
                          first_frames: int, on_first: Callable[[torch.Tensor], None],
                          lanes: Lanes = SERIAL, speakers: torch.Tensor | None = None,
                          speed: torch.Tensor | None = None) -> torch.Tensor:
        """`infer` for one request, handing its first `first_frames` latent frames of audio to
        `on_first` as soon as they are decoded (the whole waveform if it is no longer), then
        returning the whole waveform. Both pieces come from `Generator.decode_window`, so
        they join into the audio `infer` gives."""
        g = self.speaker_embeddings(speakers, ids.shape[0])
        z, segments = self.latents(ids, lengths, generators, noise_scale, length_scale, noise_w, lanes, g, speed)
        z = z.t().unsqueeze(0)
        n = segments[0][1]
        spk = None if g is None else g[0]
        first = self.dec.decode_window(z, 0, min(first_frames, n), lanes, spk)
        on_first(first)
        if n <= first_frames:
            return first
        return torch.cat([first, self.dec.decode_window(z, first_frames, n, lanes, spk)])

    def latents(self, ids, lengths, generators, noise_scale, length_scale, noise_w,
                lanes: Lanes = SERIAL, g: torch.Tensor | None = None,
                speed: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Everything before the decoder: the requests' latent frames packed end to end,
        time-major [L, C], with (start, frames) per request. g: [B, gin] speaker embeddings."""
        dev = ids.device
        if dev.type == "cpu" and len(generators) > 1:
            # On CPU padding is pure waste (and attention is quadratic in it): one request at a time.
            # Requests spread over the lanes, each running its encoder on one core.
            def prior(i: int) -> torch.Tensor:
                n, sl = int(lengths[i]), slice(i, i + 1)
                return self._prior(ids[sl, :n], lengths[sl], generators[sl], noise_scale[sl], length_scale[sl],
                                   noise_w[sl], g=None if g is None else g[sl],
                                   speed=None if speed is None else speed[sl])[0]

            priors = lanes.map(prior, range(len(generators)))
        else:
            priors = self._prior(ids, lengths, generators, noise_scale, length_scale, noise_w, lanes, g, speed)
        # Flows and decoder run on the requests packed end to end (no compute on padding),
        # time-major [frames, C]: the layout of their fast convs.
        packed, segments = self._pack(priors)
        speaker = None if g is None else [(s, n, gi) for (s, n), gi in zip(segments, g)]
        return self.flow.reverse_packed(packed, gaps_between(segments), lanes, speaker), segments

    def _prior(self, ids, lengths, generators, noise_scale, length_scale, noise_w,
               lanes: Lanes = SERIAL, g: torch.Tensor | None = None,
               speed: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Text encoder + durations + prior sample for a padded (sub)batch -> [C, frames_i] each.

        `speed` s rescales the phonemes' frame boundaries (the cumulative durations) by 1/s and
        rounds them, so the utterance lasts 1/s of its speed-1 length to within a frame, however
        short the phonemes get: a phoneme whose span rounds to nothing is skipped (fast), none
        is stretched past its share (slow). Scaling length_scale instead (piper's knob) cannot
        do that: each phoneme's ceil() keeps at least one frame and rounds every one up."""
        dev = ids.device
        x, m_p, logs_p, x_mask = self.enc_p(ids, lengths, lanes)

        dp_noise = _padded_noise(generators, 2, lengths.tolist()).to(dev) * noise_w[:, None, None]
        logw = self.dp.reverse(x, x_mask, dp_noise, g)
        w_ceil = torch.ceil(torch.exp(logw) * x_mask * length_scale[:, None, None])[:, 0]  # [B, Tx]
        cum = torch.cumsum(w_ceil, dim=1)
        if speed is not None and bool((speed != 1).any()):
            cum = torch.round(cum / speed[:, None])
        y_lengths = cum[:, -1].clamp_min(1).long()
        t_y = int(y_lengths.max())

        # Hard monotonic alignment: frame t belongs to the phoneme whose cumulative span covers it.
        frames = torch.arange(t_y, device=dev, dtype=cum.dtype)
        owner = torch.searchsorted(cum.contiguous(), frames.expand(cum.shape[0], t_y).contiguous(), right=True)
        covered = (frames[None, :] < cum[:, -1:]).unsqueeze(1).to(m_p.dtype)
        owner = owner.clamp_max(ids.shape[1] - 1).unsqueeze(1)
        m = torch.gather(m_p, 2, owner.expand(-1, m_p.shape[1], -1)) * covered
        logs = torch.gather(logs_p, 2, owner.expand(-1, logs_p.shape[1], -1)) * covered

        n_frames = y_lengths.tolist()
        eps = _padded_noise(generators, m.shape[1], n_frames).to(dev)
        z_p = m + eps * torch.exp(logs) * noise_scale[:, None, None]
        return [z_p[i, :, :n] for i, n in enumerate(n_frames)]

    def _pack(self, priors: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """[C, n_i] each -> time-major [L, C] with zero gaps wider than any conv's reach,
        + (start, n_i) per request."""
        gap = max(self.dec.reach_frames(), self.flow.reach_frames()) + 1
        parts, segments, pos = [], [], 0
        for i, z in enumerate(priors):
            if i:
                parts.append(z.new_zeros(gap, z.shape[0]))
                pos += gap
            parts.append(z.t())
            segments.append((pos, z.shape[1]))
            pos += z.shape[1]
        return torch.cat(parts, 0), segments
