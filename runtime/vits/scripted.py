"""TorchScript bodies for the CPU lanes' pieces of work (a coupling layer on a time chunk, a
decoder stage on a time chunk).

Why script them: a piece written in Python runs dozens of small torch ops, and every op takes
the GIL back when it returns. With two lanes, each return waits for the other lane's Python
and costs a futex hand-off between cores (measured here: two threads running 170 us convs
side by side got 1.05x the throughput of one; two processes got 2x). A scripted function runs
its whole body in C++ with the GIL released, so the lanes run side by side for real.

The bodies call exactly the aten ops the eager code did, in the same order, so results are the
same bits. The graph executor's optimizations are switched off for the calling thread
(`_unoptimized`): they profile the first runs and then rewrite the graph (e.g. addmm into mm +
add), which would change float rounding between the first and later calls of one voice.
Compiled once per process on first use (~0.1 s).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

def zero_rows(x: torch.Tensor, gaps: List[Tuple[int, int]], scale: int, offset: int) -> torch.Tensor:
    """Zero, in place, the gap frames of a time-major [..., T, C] tensor whose first row is
    frame `offset` at `scale` rows per latent frame. Returns x."""
    n = x.shape[-2]
    for gap in gaps:
        lo = max(gap[0] * scale - offset, 0)
        hi = min(gap[1] * scale - offset, n)
        if lo < hi:
            x[..., lo:hi, :].zero_()
    return x


def _matmul(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def time_major_conv(x: torch.Tensor, weight_t: Optional[torch.Tensor], bias: Optional[torch.Tensor], k: int,
                    padding: int, dilation: int, weight_cl: Optional[torch.Tensor], groups: int,
                    im2col_rows: int) -> torch.Tensor:
    """common.TimeMajorConv on [..., T, C] (see there for why each form); weight_t None: grouped."""
    lead, t, cin = list(x.shape[:-2]), x.shape[-2], x.shape[-1]
    if weight_t is not None and k == 1:
        return _matmul(x.reshape(-1, cin), weight_t, bias).view(lead + [t, weight_t.shape[1]])
    xb = x.reshape(-1, t, cin)
    if weight_t is not None and t <= im2col_rows:
        xp = F.pad(xb, [0, 0, padding, padding])  # zero frames either side, as the conv's own padding
        cols = xp.as_strided([xp.shape[0], t, k, cin], [xp.shape[1] * cin, cin, dilation * cin, 1])
        return _matmul(cols.reshape(-1, k * cin), weight_t, bias).view(lead + [t, weight_t.shape[1]])
    assert weight_cl is not None
    y = F.conv2d(xb.transpose(1, 2).unsqueeze(2), weight_cl, bias, padding=[0, padding], dilation=[1, dilation],
                 groups=groups).squeeze(2).transpose(1, 2)  # channels-last out: a view
    return y.reshape(lead + [t, y.shape[-1]])


def coupling_reverse(x: torch.Tensor, half: int, channels: int, pre_w: torch.Tensor, pre_b: torch.Tensor,
                     in_w: List[torch.Tensor], in_b: List[torch.Tensor], in_k: List[int], in_pad: List[int],
                     in_dil: List[int], in_cl: List[torch.Tensor], rs_w: List[torch.Tensor],
                     rs_b: List[torch.Tensor], post_w: torch.Tensor, post_b: torch.Tensor,
                     cond: Optional[torch.Tensor], gaps: List[Tuple[int, int]], offset: int,
                     im2col_rows: int) -> torch.Tensor:
    """flow.MeanOnlyCoupling.reverse_packed's body (see there)."""
    c = channels
    x0 = x[:, :half]
    h = zero_rows(torch.addmm(pre_b, x0, pre_w), gaps, 1, offset)
    skip: Optional[torch.Tensor] = None
    last = len(in_w) - 1
    for i in range(len(in_w)):
        a = time_major_conv(h, in_w[i], in_b[i], in_k[i], in_pad[i], in_dil[i], in_cl[i], 1, im2col_rows)
        if cond is not None:
            a = a + cond[:, 2 * c * i:2 * c * (i + 1)]
        r = torch.addmm(rs_b[i], torch.tanh(a[:, :c]) * torch.sigmoid(a[:, c:]), rs_w[i])
        if i < last:
            h = zero_rows(h + r[:, :c], gaps, 1, offset)
            r = r[:, c:]
        skip = r if skip is None else skip + r
    assert skip is not None
    m = torch.addmm(post_b, zero_rows(skip, gaps, 1, offset), post_w)
    return torch.cat([x0, zero_rows(x[:, half:] - m, gaps, 1, offset)], 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, emb_rel_k: torch.Tensor, emb_rel_v: torch.Tensor,
           rel_idx: torch.Tensor, in_band: torch.Tensor, abs_idx: torch.Tensor, in_seq: torch.Tensor,
           key_pad: Optional[torch.Tensor]) -> torch.Tensor:
    """text_encoder.RelativeSelfAttention.attend (see there): q (scaled), k, v [B, H, T, D],
    emb_rel_k/v [2W+1, D], the band tensors of `_band(T)` -> [B, H, T, D]."""
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    rel_logits = q @ emb_rel_k.transpose(0, 1)  # [B,H,T,2W+1]
    scores = q @ k.transpose(2, 3) + torch.gather(rel_logits, 3, rel_idx.expand(b, h, t, t)) * in_band
    if key_pad is not None:
        # exp(-1e4 - max) underflows to exactly 0 in float32, so padded keys contribute nothing
        # and a padded batch matches the unpadded request (a literal: TorchScript reads no globals)
        scores = scores.masked_fill(key_pad, -1e4)
    p = torch.softmax(scores, dim=-1)
    p_rel = torch.gather(p, 3, abs_idx.expand(b, h, t, abs_idx.shape[1])) * in_seq
    return p @ v + p_rel @ emb_rel_v


def attention_part(x: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, out_w: torch.Tensor, heads: int,
                   head_dim: int, emb_rel_k: torch.Tensor, emb_rel_v: torch.Tensor, rel_idx: torch.Tensor,
                   in_band: torch.Tensor, abs_idx: torch.Tensor, in_seq: torch.Tensor,
                   key_pad: Optional[torch.Tensor]) -> torch.Tensor:
    """text_encoder._AttentionPart's body: time-major x [B, T, C] -> its heads' share of the
    output projection [B, T, C] (no bias)."""
    b, t, c = x.shape[0], x.shape[1], x.shape[2]
    qkv = _matmul(x.reshape(-1, c), qkv_w, qkv_b).view(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    out = attend(qkv[0], qkv[1], qkv[2], emb_rel_k, emb_rel_v, rel_idx, in_band, abs_idx, in_seq, key_pad)
    out = out.transpose(1, 2).reshape(b, t, heads * head_dim)
    return _matmul(out.reshape(-1, heads * head_dim), out_w, None).view(b, t, out_w.shape[1])


def feed_forward_part(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, k1: int, pad1: int,
                      cl1: Optional[torch.Tensor], w2: torch.Tensor, k2: int, pad2: int, cl2: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], im2col_rows: int) -> torch.Tensor:
    """text_encoder._FeedForwardPart's body: time-major x [B, T, C] -> its filter channels'
    share of the second conv [B, T, C] (no bias)."""
    y = torch.relu(time_major_conv(x, w1, b1, k1, pad1, 1, cl1, 1, im2col_rows))
    if mask is not None:
        y = y * mask
    return time_major_conv(y, w2, None, k2, pad2, 1, cl2, 1, im2col_rows)


def dilated_depth_separable(x: torch.Tensor, taps: List[torch.Tensor], bias: List[torch.Tensor], dilation: List[int],
                            norm1: List[List[torch.Tensor]], pointwise: List[torch.Tensor],
                            pointwise_bias: List[torch.Tensor], norm2: List[List[torch.Tensor]], eps: float,
                            mask: Optional[torch.Tensor], g: Optional[torch.Tensor]) -> torch.Tensor:
    """duration._TimeMajorDDS's body on time-major x [B, T, C]: per layer, the 3-tap dilated
    depthwise conv as multiply-adds on shifted frames (taps [3, C]), LayerNorm, GELU, the 1x1
    conv as one matmul (pointwise [C, C] transposed), LayerNorm, GELU, residual. norm1/norm2:
    [gamma, beta] per layer; mask [B, T, 1] or None (nothing padded)."""
    if g is not None:
        x = x + g
    c = x.shape[-1]
    for i in range(len(taps)):
        w, d = taps[i], dilation[i]
        xm = x if mask is None else x * mask
        y = torch.addcmul(bias[i], xm, w[1])  # centre tap; outer taps read frames t -+ d (zero outside)
        if d < xm.shape[-2]:
            y[..., d:, :].addcmul_(xm[..., :-d, :], w[0])
            y[..., :-d, :].addcmul_(xm[..., d:, :], w[2])
        y = F.gelu(F.layer_norm(y, [c], norm1[i][0], norm1[i][1], eps))
        y = _matmul(y.reshape(-1, c), pointwise[i], pointwise_bias[i]).view(y.shape)
        y = F.gelu(F.layer_norm(y, [c], norm2[i][0], norm2[i][1], eps))
        x = x + y
    return x if mask is None else x * mask


def _knots(unnorm: torch.Tensor, min_size: float, left: float, right: float) -> Tuple[torch.Tensor, torch.Tensor]:
    num_bins = unnorm.shape[-1]
    sizes = min_size + (1 - min_size * num_bins) * torch.softmax(unnorm, dim=-1)
    cum = F.pad(torch.cumsum(sizes, dim=-1), [1, 0], value=0.0)
    cum = (right - left) * cum + left
    cum = torch.cat([torch.full_like(cum[..., :1], left), cum[..., 1:-1], torch.full_like(cum[..., :1], right)], -1)
    return cum, cum[..., 1:] - cum[..., :-1]


def spline_inverse(y: torch.Tensor, unnorm_widths: torch.Tensor, unnorm_heights: torch.Tensor,
                   unnorm_derivs: torch.Tensor, tail_bound: float, min_width: float, min_height: float,
                   min_derivative: float, edge: float) -> torch.Tensor:
    """duration.rational_quadratic_inverse's body (see there)."""
    num_bins = unnorm_widths.shape[-1]
    left, right = -tail_bound, tail_bound
    derivs = min_derivative + F.softplus(F.pad(unnorm_derivs, [1, 1], value=edge))
    cumw, widths = _knots(unnorm_widths, min_width, left, right)
    cumh, heights = _knots(unnorm_heights, min_height, left, right)

    inside = (y >= left) & (y <= right)
    yc = y.clamp(left, right)
    # Bin search on the output knots; nudge the last knot so y == right lands in the last bin.
    search = torch.cat([cumh[..., :-1], cumh[..., -1:] + 1e-6], -1)
    idx = (yc.unsqueeze(-1) >= search).sum(dim=-1, keepdim=True) - 1
    idx = idx.clamp(0, num_bins - 1)

    x_k = torch.gather(cumw, -1, idx).squeeze(-1)
    w_k = torch.gather(widths, -1, idx).squeeze(-1)
    y_k = torch.gather(cumh, -1, idx).squeeze(-1)
    h_k = torch.gather(heights, -1, idx).squeeze(-1)
    s_k = h_k / w_k
    d_k = torch.gather(derivs[..., :-1], -1, idx).squeeze(-1)
    d_k1 = torch.gather(derivs[..., 1:], -1, idx).squeeze(-1)

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


def clear_channels_last(t: torch.Tensor, gaps: List[Tuple[int, int]], scale: int, offset: int) -> torch.Tensor:
    """zero_rows on a channels-last [B, C, 1, T] tensor (its memory is time-major)."""
    if len(gaps) > 0:
        zero_rows(t.permute(0, 2, 3, 1)[:, 0], gaps, scale, offset)
    return t


def _leaky_relu_padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """leaky_relu of a channels-last [B, C, 1, T] tensor, written between `pad` zero frames on
    either side -> channels-last [B, C, 1, T + 2*pad], ready for a conv with no padding of its
    own. oneDNN runs the same conv up to 1.5x faster on an input padded beforehand than with a
    padding of ~8 or more frames of its own (32 channels: 60 vs 88 GFLOPS measured), and writing
    the activation into the padded buffer takes the pass that leaky_relu needs anyway."""
    b, c, _, t = x.shape
    buf = torch.empty([b, 1, t + 2 * pad, c], dtype=x.dtype, device=x.device)
    buf[:, :, :pad].zero_()
    buf[:, :, t + pad:].zero_()
    torch._C._nn.leaky_relu(x.permute(0, 2, 3, 1), 0.1, out=buf[:, :, pad:pad + t])
    return buf.permute(0, 3, 1, 2)


def decoder_stage(h: torch.Tensor, up_w: List[torch.Tensor], up_b: List[torch.Tensor], up_start: List[int],
                  up_pad: int, rate: int, res_w: List[torch.Tensor], res_b: List[torch.Tensor], res_pad: List[int],
                  res_dil: List[int], block_steps: List[int], convs_per_step: int, post_w: Optional[torch.Tensor],
                  post_pad: int, gaps: List[Tuple[int, int]], scale: int, offset: int) -> torch.Tensor:
    """decoder.Generator._stage's body (see there): polyphase upsampling, the resblocks summed
    (their 1/num_kernels folded into the next weights), and for the last stage the output conv."""
    x = F.leaky_relu(h, 0.1)  # HiFi-GAN's slope (a literal: TorchScript reads no globals)
    t = x.shape[3]
    phases: List[torch.Tensor] = []
    for j in range(len(up_w)):
        y = F.conv2d(x, up_w[j], up_b[j], padding=[0, up_pad])
        phases.append(y[:, :, :, up_start[j]:up_start[j] + t])
    y = (phases[0] if len(phases) == 1 else torch.cat(phases, dim=1)).contiguous(memory_format=torch.channels_last)
    bsz = y.shape[0]
    scale_out, off_out = scale * rate, offset * rate
    # channels-last memory is [B, T, S*Cout] with phase-major channels == [B, T*S, Cout]
    h = clear_channels_last(y.permute(0, 2, 3, 1).reshape(bsz, 1, t * rate, -1).permute(0, 3, 1, 2), gaps, scale_out, off_out)
    acc: Optional[torch.Tensor] = None
    k = 0
    for n_steps in block_steps:
        r = h
        for _step in range(n_steps):
            y = r
            for _conv in range(convs_per_step):
                y = clear_channels_last(F.conv2d(_leaky_relu_padded(y, res_pad[k]), res_w[k], res_b[k], dilation=[1, res_dil[k]]),
                           gaps, scale_out, off_out)
                k += 1
            r = y.add_(r)
        acc = r if acc is None else acc.add_(r)
    assert acc is not None
    if post_w is None:
        return acc
    return torch.tanh(F.conv2d(F.leaky_relu(acc), post_w, None, padding=[0, post_pad]))


@functools.cache
def _compiled(name: str) -> Callable:
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit.script deprecated in favour of torch.compile/export; neither
        # fits here (compile needs a C++ toolchain on every server, export has no GIL-free
        # eager call). torch is pinned by the constraints file, so the warning is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(globals()[name])


def run(name: str, *args):
    """Run the scripted `name` (compiled on first use) with graph optimizations off for this
    thread (see the module docstring)."""
    if torch._C._get_graph_executor_optimize():
        torch._C._set_graph_executor_optimize(False)
    return _compiled(name)(*args)
