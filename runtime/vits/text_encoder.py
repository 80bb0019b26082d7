"""Prior text encoder: phoneme embedding + transformer with windowed relative-position attention."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import scripted
from .common import ChannelLayerNorm, TimeMajorConv, sequence_mask
from .config import VitsConfig
from .lanes import SERIAL, Lanes

# Work per layer (ids x hidden x filter channels, the feed-forward's multiply-adds per tap) below
# which splitting a layer across lanes costs more in hand-offs between cores than it saves:
# measured on 2 cores, x_low (96/384) gains from ~200 ids, medium (192/768) from ~60.
_SPLIT_MIN_WORK = 8_000_000


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with learned relative-position embeddings for keys and values.

    Only offsets within +-window are embedded (shared by all heads). Instead of padding and
    reshaping a [T, 2T-1] table, we compute the 2W+1 relative logits per query and gather
    them into the band |i - j| <= W of the [T, T] score matrix; the value side gathers the
    band of the attention weights back into [T, 2W+1] form.
    """

    def __init__(self, channels: int, n_heads: int, window_size: int):
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"channels {channels} not divisible by heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = channels // n_heads
        self.window = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        n_rel = 2 * window_size + 1
        self.emb_rel_k = nn.Parameter(torch.zeros(1, n_rel, self.head_dim))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, n_rel, self.head_dim))

    def _band(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.window
        i = torch.arange(t, device=device)
        rel = i[None, :] - i[:, None] + w  # [T, T]: column j relative to row i, shifted to 0..2W
        in_band = (rel >= 0) & (rel <= 2 * w)
        r = torch.arange(2 * w + 1, device=device)
        absj = i[:, None] + r[None, :] - w  # [T, 2W+1]: absolute key index for each offset
        in_seq = (absj >= 0) & (absj < t)
        return rel.clamp(0, 2 * w), in_band, absj.clamp(0, t - 1), in_seq

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        h, d = self.n_heads, self.head_dim
        q = self.conv_q(x).view(b, h, d, t).transpose(2, 3) * (1.0 / math.sqrt(d))  # [B,H,T,D]
        k = self.conv_k(x).view(b, h, d, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, d, t).transpose(2, 3)
        out = self.attend(q, k, v, self._band(t, x.device), attn_mask == 0)
        out = out.transpose(2, 3).reshape(b, c, t)
        return self.conv_o(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: tuple,
               key_pad: torch.Tensor | None) -> torch.Tensor:
        """q (already scaled by 1/sqrt(d)), k, v: [B, H, T, D] for any subset of the heads (the
        relative embeddings are shared by all heads); band: `_band(T)`; key_pad: True where a
        key is padding, or None. Returns [B, H, T, D]."""
        return scripted.attend(q, k, v, self.emb_rel_k[0], self.emb_rel_v[0], *band, key_pad)


class FeedForward(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding=pad)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_1(x * x_mask))
        return self.conv_2(x * x_mask) * x_mask


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        hc = cfg.hidden_channels
        self.attn_layers = nn.ModuleList(
            RelativeSelfAttention(hc, cfg.n_heads, cfg.window_size) for _ in range(cfg.n_layers)
        )
        self.norm_layers_1 = nn.ModuleList(ChannelLayerNorm(hc) for _ in range(cfg.n_layers))
        self.ffn_layers = nn.ModuleList(
            FeedForward(hc, cfg.filter_channels, cfg.kernel_size) for _ in range(cfg.n_layers)
        )
        self.norm_layers_2 = nn.ModuleList(ChannelLayerNorm(hc) for _ in range(cfg.n_layers))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)  # [B,1,T,T]
        x = x * x_mask
        for attn, n1, ffn, n2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = n1(x + attn(x, attn_mask))
            x = n2(x + ffn(x, x_mask))
        return x * x_mask


class TextEncoder(nn.Module):
    """ids [B,T] -> hidden x, prior mean m_p, prior log-std logs_p (all [B,C,T]) and mask [B,1,T]."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.hidden = cfg.hidden_channels
        self.emb = nn.Embedding(cfg.num_symbols, cfg.hidden_channels)
        self.encoder = TransformerEncoder(cfg)
        self.proj = nn.Conv1d(cfg.hidden_channels, 2 * cfg.hidden_channels, 1)
        self._fast: dict | None = None

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, lanes: Lanes = SERIAL):
        """`lanes`: with a fused encoder, each layer's heads and feed-forward channels are split
        across (up to n_heads) lanes."""
        x = self.emb(ids) * math.sqrt(self.hidden)
        x_mask = sequence_mask(lengths, ids.shape[1])
        if self._fast is not None:
            x = self._forward_fast(x, x_mask, bool((lengths < ids.shape[1]).any()), lanes)
            stats = self._fast["proj"](x).transpose(1, 2) * x_mask
            x = x.transpose(1, 2)
        else:
            x = self.encoder(x.transpose(1, 2), x_mask)
            stats = self.proj(x) * x_mask
        m_p, logs_p = torch.split(stats, self.hidden, dim=1)
        return x, m_p, logs_p, x_mask

    @torch.no_grad()
    def fuse(self) -> None:
        """Prepare the time-major fast path: [B, T, C] activations throughout, q/k/v as one
        matmul with the 1/sqrt(d) folded into q, LayerNorm on the last axis without transposes,
        and no mask arithmetic when nothing is padded (a single request). Each layer is also
        cut into independent parts for lanes: part j owns a share of the heads (with their
        columns of the output projection) and a share of the feed-forward channels (with their
        input columns of the second conv); the parts' outputs are summed."""
        enc = self.encoder
        n_heads = enc.attn_layers[0].n_heads
        self._fast = {"proj": TimeMajorConv.of(self.proj), "parts": {}}
        for n_parts in sorted({1, 2} & {p for p in range(1, n_heads + 1) if n_heads % p == 0}):
            layers = []
            for attn, n1, ffn, n2 in zip(enc.attn_layers, enc.norm_layers_1, enc.ffn_layers, enc.norm_layers_2):
                layers.append((_attention_parts(attn, n_parts), attn.conv_o.bias, n1,
                               _ffn_parts(ffn, n_parts), ffn.conv_2.bias, n2))
            self._fast["parts"][n_parts] = layers

    def _forward_fast(self, x: torch.Tensor, x_mask: torch.Tensor, padded: bool, lanes: Lanes) -> torch.Tensor:
        b, t, c = x.shape
        # split a layer across lanes only when it is worth the hand-offs (see _SPLIT_MIN_WORK)
        usable = lanes.n if t * c * self.encoder.ffn_layers[0].conv_1.out_channels >= _SPLIT_MIN_WORK else 1
        n_parts = max(p for p in self._fast["parts"] if p <= usable)
        mask = x_mask.transpose(1, 2) if padded else None  # [B, T, 1]
        band = self.encoder.attn_layers[0]._band(t, x.device)
        key_pad = (x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)) == 0 if padded else None  # [B,1,T,T]
        if padded:
            x = x * mask
        for attn_parts, b_o, n1, ffn_parts, b_2, n2 in self._fast["parts"][n_parts]:
            partial = lanes.map(lambda part, x=x: part(x, band, key_pad), attn_parts)
            x = F.layer_norm(_sum(x, partial, b_o), (c,), n1.gamma, n1.beta, n1.eps)
            xm = x * mask if padded else x
            partial = lanes.map(lambda part, xm=xm: part(xm, mask), ffn_parts)
            y = _sum(None, partial, b_2)
            x = F.layer_norm(x + (y * mask if padded else y), (c,), n2.gamma, n2.beta, n2.eps)
        return x * mask if padded else x


def _sum(x: torch.Tensor | None, parts: list[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    total = parts[0] + bias if x is None else x + parts[0] + bias
    for p in parts[1:]:
        total += p
    return total


class _AttentionPart:
    """Heads [h0, h0 + h) of a RelativeSelfAttention, time-major, with their share of the
    output projection (no bias: the caller adds it once). The body is scripted
    (scripted.attention_part) so lanes run parts side by side without the GIL."""

    def __init__(self, attn: RelativeSelfAttention, h0: int, h: int):
        d = attn.head_dim
        rows = slice(h0 * d, (h0 + h) * d)
        scale = 1.0 / math.sqrt(d)
        w = torch.cat([attn.conv_q.weight[rows] * scale, attn.conv_k.weight[rows], attn.conv_v.weight[rows]])
        b = torch.cat([attn.conv_q.bias[rows] * scale, attn.conv_k.bias[rows], attn.conv_v.bias[rows]])
        qkv, out = TimeMajorConv(w, b), TimeMajorConv(attn.conv_o.weight[:, rows], None)
        self.args = (qkv.weight_t, qkv.bias, out.weight_t, h, d, attn.emb_rel_k[0], attn.emb_rel_v[0])

    def __call__(self, x: torch.Tensor, band, key_pad: torch.Tensor | None) -> torch.Tensor:
        return scripted.run("attention_part", x, *self.args, *band, key_pad)


def _attention_parts(attn: RelativeSelfAttention, n: int) -> list[_AttentionPart]:
    per = attn.n_heads // n
    return [_AttentionPart(attn, j * per, per) for j in range(n)]


class _FeedForwardPart:
    """Filter channels [f0, f1) of a FeedForward: its rows of conv_1, its input columns of
    conv_2 (no bias: the caller adds it once). Scripted body: scripted.feed_forward_part."""

    def __init__(self, ffn: FeedForward, f0: int, f1: int):
        c1, c2 = ffn.conv_1, ffn.conv_2
        conv_1 = TimeMajorConv(c1.weight[f0:f1], c1.bias[f0:f1], c1.padding[0])
        conv_2 = TimeMajorConv(c2.weight[:, f0:f1], None, c2.padding[0])
        self.first = (conv_1.weight_t, conv_1.bias, conv_1.k, conv_1.padding,
                      None if conv_1.conv is None else conv_1.conv.weight)
        self.second = (conv_2.weight_t, conv_2.k, conv_2.padding, None if conv_2.conv is None else conv_2.conv.weight)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return scripted.run("feed_forward_part", x, *self.first, *self.second, mask, TimeMajorConv.IM2COL_ROWS)


def _ffn_parts(ffn: FeedForward, n: int) -> list[_FeedForwardPart]:
    f = ffn.conv_1.weight.shape[0]
    bounds = [round(f * j / n) for j in range(n + 1)]
    return [_FeedForwardPart(ffn, a, b) for a, b in zip(bounds, bounds[1:])]
