"""Naive PyTorch versions of every fastattn op.

These define what each op computes. They are written as explicit math in the dtype
they are given (the `naive` backend and the benchmarks' baseline); called with float64
inputs they are the tests' oracle. Arguments are assumed valid: the public API in
fastattn/ops validates before it gets here.

Attention masking convention. With query row i, key column j and the alignment
offset `off` (seqlen_k - seqlen_q when bottom-right aligned, 0 when top-left aligned),
key j is visible from query i iff

    i + off - window_left <= j <= i + off + window_right

where a negative window side means "unbounded". causal == window_right = 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


# ----------------------------------------------------------------------------- attention


def attention_visibility(
    seqlen_q: int,
    seqlen_k: int,
    window_left: int,
    window_right: int,
    top_left: bool,
    device: torch.device,
) -> Optional[Tensor]:
    """(seqlen_q, seqlen_k) bool, True where key j is visible from query i; None = all."""
    if window_left < 0 and window_right < 0:
        return None
    offset = 0 if top_left else seqlen_k - seqlen_q
    i = torch.arange(seqlen_q, device=device).unsqueeze(1) + offset
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= j >= i - window_left
    if window_right >= 0:
        visible &= j <= i + window_right
    return visible


def alibi_bias(
    alibi_slopes: Tensor, seqlen_q: int, seqlen_k: int, top_left: bool, dtype: torch.dtype
) -> Tensor:
    """ALiBi as an additive bias, -slope * |i + off - j|, shaped (b or 1, h, sq, sk)."""
    offset = 0 if top_left else seqlen_k - seqlen_q
    i = torch.arange(seqlen_q, device=alibi_slopes.device).unsqueeze(1) + offset
    j = torch.arange(seqlen_k, device=alibi_slopes.device).unsqueeze(0)
    distance = (i - j).abs().to(dtype)  # (sq, sk)
    slopes = alibi_slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)  # (1, h)
    return -slopes[:, :, None, None] * distance  # (b or 1, h, sq, sk)


def dropout_keep_mask(
    shape: tuple[int, ...], dropout_p: float, device: torch.device, generator: Optional[torch.Generator]
) -> Tensor:
    """Bernoulli keep-mask (True = kept) with keep probability 1 - dropout_p."""
    return torch.rand(shape, device=device, generator=generator) >= dropout_p


def _attention_probs(q, k, *, scale, window_size, softcap, alibi_slopes, attn_bias, top_left):
    """Softmax weights of the masked scores, with what the forward and backward share.

    k is already expanded to q's heads. Returns (probs, lse, capped) where capped is
    tanh(raw/softcap) (None without softcap), needed by the softcap derivative.
    """
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (b, h, sq, sk)
    capped = None
    if softcap > 0:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k, top_left, scores.dtype)
    visible = attention_visibility(seqlen_q, seqlen_k, window_size[0], window_size[1], top_left, q.device)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            visible = attn_bias if visible is None else visible & attn_bias
        else:
            scores = scores + attn_bias.to(scores.dtype)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if seqlen_k > 0:
        row_max = scores.amax(dim=-1, keepdim=True)
    else:
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    # A fully masked row has max -inf; shifting by 0 there keeps exp() at 0 instead of NaN.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    lse = (torch.log(row_sum) + row_max).squeeze(-1)  # (b, h, sq)
    return probs, lse, capped


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    """(b, hk, s, d) -> (b, h, s, d): each KV head repeated for its group of query heads."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold_kv_grad(grad: Tensor, kv_heads: int) -> Tensor:
    """(b, h, s, d) -> (b, hk, s, d): sum the gradient over each group of query heads."""
    batch, heads = grad.shape[:2]
    if heads == kv_heads:
        return grad
    return grad.reshape(batch, kv_heads, heads // kv_heads, *grad.shape[2:]).sum(dim=2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
    top_left: bool = False,
):
    """softmax(mask(softcap(scale·QKᵀ) + alibi + bias))·V with the full score matrix.

    q: (b, h, sq, d); k: (b, hk, sk, d); v: (b, hk, sk, dv); h % hk == 0.
    attn_bias: float (added) or bool (True = attend), broadcastable to (b, h, sq, sk).
    dropout: `dropout_mask` (bool, True = kept, broadcastable to (b, h, sq, sk)) if given,
    else drawn from `generator`. lse (b, h, sq) fp32 is of the scores before dropout;
    a fully masked row gives output 0 and lse -inf.
    """
    heads = q.shape[1]
    probs, lse, _ = _attention_probs(
        q, _expand_kv(k, heads), scale=_default_scale(q, scale),
        window_size=(window_size[0], 0 if causal else window_size[1]), softcap=softcap,
        alibi_slopes=alibi_slopes, attn_bias=attn_bias, top_left=top_left,
    )
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = dropout_keep_mask(probs.shape, dropout_p, q.device, generator)
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(probs.to(v.dtype), _expand_kv(v, heads))  # (b, h, sq, dv)
    return (out, lse.float()) if return_lse else out


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dlse: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    top_left: bool = False,
    bias_needs_grad: bool = False,
):
    """Gradients (dq, dk, dv, dbias or None) of `attention` with the same options.

    With P the softmax weights, M the dropout keep-mask (P' = P·M/(1-p)) and S the
    scores after softcap/bias:
        dV = P'ᵀ dO            dP = (dO Vᵀ)·M/(1-p)
        dS = P ∘ (dP - δ),     δ_i = Σ_j P_ij dP_ij - dlse_i   (= rowsum(dO∘O) - dlse)
        dbias = dS summed to the bias shape
        dS_raw = dS ∘ (1 - tanh²) with softcap, else dS
        dQ = scale · dS_raw K  dK = scale · dS_rawᵀ Q   (dK, dV summed over each GQA group)
    The dropout mask is drawn from `generator` exactly as in the forward if not given.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = _default_scale(q, scale)
    k_full, v_full = _expand_kv(k, heads), _expand_kv(v, heads)
    probs, _, capped = _attention_probs(
        q, k_full, scale=scale, window_size=(window_size[0], 0 if causal else window_size[1]),
        softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, top_left=top_left,
    )
    dout = dout.to(q.dtype)
    dprobs = torch.matmul(dout, v_full.transpose(-1, -2))  # (b, h, sq, sk)
    kept = probs
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = dropout_keep_mask(probs.shape, dropout_p, q.device, generator)
        keep_scale = dropout_mask / (1.0 - dropout_p)
        kept = probs * keep_scale
        dprobs = dprobs * keep_scale
    dv = torch.matmul(kept.transpose(-1, -2).to(dout.dtype), dout)  # (b, h, sk, dv)
    delta = (probs * dprobs).sum(dim=-1, keepdim=True)  # (b, h, sq, 1)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype).unsqueeze(-1)
    dscores = probs * (dprobs - delta)  # (b, h, sq, sk)
    dbias = None
    if bias_needs_grad and attn_bias is not None:
        dbias = dscores.sum_to_size(attn_bias.shape).to(attn_bias.dtype)
    if capped is not None:
        dscores = dscores * (1 - capped * capped)
    dq = torch.matmul(dscores, k_full) * scale  # (b, h, sq, d)
    dk = torch.matmul(dscores.transpose(-1, -2), q) * scale  # (b, h, sk, d)
    return dq, _fold_kv_grad(dk, kv_heads), _fold_kv_grad(dv, kv_heads), dbias


def _varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes):
    """Per sequence: (rows of q, rows of k/v, q_i, k_i, v_i as (1, heads, len, d), slopes_i)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        rows_q, rows_k = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        slopes_i = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes_i = alibi_slopes[i]
        yield (rows_q, rows_k,
               q[rows_q].transpose(0, 1).unsqueeze(0),  # (1, h, sq_i, d)
               k[rows_k].transpose(0, 1).unsqueeze(0),  # (1, hk, sk_i, d)
               v[rows_k].transpose(0, 1).unsqueeze(0),  # (1, hk, sk_i, dv)
               slopes_i)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    return_lse: bool = False,
    alibi_slopes: Optional[Tensor] = None,
    **options,
):
    """Attention over packed sequences: q (total_q, h, d), k/v (total_k, hk, d).

    Sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and
    cu_seqlens_k[i]:cu_seqlens_k[i+1] of k/v; masking is per sequence. The lse is
    (h, total_q). `options` are those of `attention` (no attn_bias, no dropout_mask);
    alibi_slopes may be (h,) or (batch, h); dropout draws from `generator` sequence
    by sequence.
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
    for rows_q, _, q_i, k_i, v_i, slopes_i in _varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes):
        out_i, lse_i = attention(q_i, k_i, v_i, alibi_slopes=slopes_i, return_lse=True, **options)
        out[rows_q] = out_i[0].transpose(0, 1)  # (sq_i, h, dv)
        lse[:, rows_q] = lse_i[0]
    return (out, lse) if return_lse else out


def varlen_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    dlse: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    **options,
):
    """Gradients (dq, dk, dv) of `varlen_attention`, sequence by sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows_q, rows_k, q_i, k_i, v_i, slopes_i in _varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes):
        dlse_i = None if dlse is None else dlse[:, rows_q].unsqueeze(0)  # (1, h, sq_i)
        dout_i = dout[rows_q].transpose(0, 1).unsqueeze(0)  # (1, h, sq_i, dv)
        dq_i, dk_i, dv_i, _ = attention_backward(dout_i, q_i, k_i, v_i, dlse=dlse_i,
                                                 alibi_slopes=slopes_i, **options)
        dq[rows_q] = dq_i[0].transpose(0, 1)
        dk[rows_k] = dk_i[0].transpose(0, 1)
        dv[rows_k] = dv_i[0].transpose(0, 1)
    return dq, dk, dv


def gather_kv_cache(
    cache: Tensor, batch_index: int, length: int, block_table: Optional[Tensor]
) -> Tensor:
    """The first `length` cache entries of one sequence, (kv_heads, length, d)."""
    if block_table is None:
        return cache[batch_index, :, :length]  # (hk, length, d)
    page_size = cache.shape[2]
    num_pages = -(-length // page_size)
    pages = cache[block_table[batch_index, :num_pages].long()]  # (pages, hk, page_size, d)
    return pages.transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_table: Optional[Tensor] = None,
    return_lse: bool = False,
    **options,
):
    """Attention of q_len new queries over a KV cache, one sequence at a time.

    q: (b, h, q_len, d). Contiguous cache: (b, hk, max_len, d). Paged cache:
    (num_pages, hk, page_size, d) with block_table (b, max_pages) int32.
    cache_seqlens (b,) counts the valid entries, the current tokens included; the
    q_len queries are the last q_len positions, causal among themselves (bottom-right).
    `options`: scale, softcap, window_size, alibi_slopes ((h,) or (b, h)).
    """
    alibi_slopes = options.pop("alibi_slopes", None)
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        k_b = gather_kv_cache(k_cache, b, length, block_table).unsqueeze(0)  # (1, hk, L, d)
        v_b = gather_kv_cache(v_cache, b, length, block_table).unsqueeze(0)  # (1, hk, L, dv)
        slopes_b = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes_b = alibi_slopes[b]
        out_b, lse_b = attention(
            q[b : b + 1], k_b, v_b, causal=True, alibi_slopes=slopes_b, return_lse=True, **options
        )
        outs.append(out_b)
        lses.append(lse_b)
    batch, heads, q_len = q.shape[:3]
    out = torch.cat(outs) if outs else q.new_zeros(0, heads, q_len, v_cache.shape[-1])
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else q.new_zeros(0, heads, q_len, dtype=torch.float32)
    return out, lse


# ----------------------------------------------------------------------------- norms


def residual_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    """dtype of s = x + residual: fp32 if asked, else the residual's (x's without one)."""
    if residual_in_fp32:
        return torch.float32 if x.dtype != torch.float64 else torch.float64
    return x.dtype if residual is None else residual.dtype


def _add_residual(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> Tensor:
    """s = x + residual in residual_dtype. Without a residual s is x itself: the
    normalization then runs in x's dtype, and only the prenorm output is cast."""
    if residual is None:
        return x
    dtype = residual_dtype(x, residual, residual_in_fp32)
    return x.to(dtype) + residual.to(dtype)


def _prenorm_output(x: Tensor, residual: Optional[Tensor], summed: Tensor, residual_in_fp32: bool) -> Tensor:
    return summed if residual is not None else x.to(residual_dtype(x, None, residual_in_fp32))


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_stats: bool = False,
):
    """(s - mean(s)) / sqrt(var(s) + eps) · weight + bias over the last dim, s = x + residual.

    Output in x's dtype. prenorm=True also returns s (fp32 when residual_in_fp32).
    return_stats=True appends mean and rstd, each (rows,) fp32.
    """
    summed = _add_residual(x, residual, residual_in_fp32)
    mean = summed.mean(dim=-1, keepdim=True)
    centered = summed - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = centered * rstd
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    result = (y.to(x.dtype),)
    if prenorm:
        result += (_prenorm_output(x, residual, summed, residual_in_fp32),)
    if return_stats:
        result += (mean.reshape(-1).float(), rstd.reshape(-1).float())
    return result[0] if len(result) == 1 else result


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor],
    eps: float = 1e-6,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_stats: bool = False,
):
    """s / sqrt(mean(s²) + eps) · weight over the last dim, s = x + residual.

    Output in x's dtype. prenorm=True also returns s; return_stats=True appends rstd
    (rows,) fp32.
    """
    summed = _add_residual(x, residual, residual_in_fp32)
    rstd = torch.rsqrt((summed * summed).mean(dim=-1, keepdim=True) + eps)
    y = summed * rstd
    if weight is not None:
        y = y * weight.to(y.dtype)
    result = (y.to(x.dtype),)
    if prenorm:
        result += (_prenorm_output(x, residual, summed, residual_in_fp32),)
    if return_stats:
        result += (rstd.reshape(-1).float(),)
    return result[0] if len(result) == 1 else result


def layer_norm_backward(dy: Tensor, s: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """Gradients (ds, dweight or None, dbias or None) of y = layer_norm(s), rows = all
    leading dims. With x̂ = (s - mean)·rstd and g = dy·weight:
        ds = rstd · (g - mean(g) - x̂ · mean(g·x̂)),  dweight = Σ_rows dy·x̂,  dbias = Σ_rows dy
    """
    dy = dy.to(s.dtype)
    mean = s.mean(dim=-1, keepdim=True)
    centered = s - mean
    rstd = torch.rsqrt((centered * centered).mean(dim=-1, keepdim=True) + eps)
    normalized = centered * rstd
    g = dy if weight is None else dy * weight.to(s.dtype)
    ds = rstd * (g - g.mean(dim=-1, keepdim=True) - normalized * (g * normalized).mean(dim=-1, keepdim=True))
    rows = tuple(range(s.dim() - 1))
    dweight = None if weight is None else (dy * normalized).sum(dim=rows).to(weight.dtype)
    dbias = None if bias is None else dy.sum(dim=rows).to(bias.dtype)
    return ds, dweight, dbias


def rms_norm_backward(dy: Tensor, s: Tensor, weight: Optional[Tensor], eps: float):
    """Gradients (ds, dweight or None) of y = rms_norm(s). With x̂ = s·rstd, g = dy·weight:
        ds = rstd · (g - x̂ · mean(g·x̂)),  dweight = Σ_rows dy·x̂
    """
    dy = dy.to(s.dtype)
    rstd = torch.rsqrt((s * s).mean(dim=-1, keepdim=True) + eps)
    normalized = s * rstd
    g = dy if weight is None else dy * weight.to(s.dtype)
    ds = rstd * (g - normalized * (g * normalized).mean(dim=-1, keepdim=True))
    rows = tuple(range(s.dim() - 1))
    dweight = None if weight is None else (dy * normalized).sum(dim=rows).to(weight.dtype)
    return ds, dweight


# ----------------------------------------------------------------------------- FFN


def activation(x: Tensor, name: str) -> Tensor:
    """The pointwise activations of the FFN ops, written out."""
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if name == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    if name == "relu":
        return torch.clamp_min(x, 0)
    if name == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    activation_name: str = "gelu",
) -> Tensor:
    """act(x·W1ᵀ + b1)·W2ᵀ + b2; weights in nn.Linear's (out_features, in_features) layout."""
    hidden = torch.matmul(x, w1.t())  # (..., h)
    if b1 is not None:
        hidden = hidden + b1
    out = torch.matmul(activation(hidden, activation_name), w2.t())  # (..., d_out)
    if b2 is not None:
        out = out + b2
    return out


def gated_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, *, activation_name: str = "silu"
) -> Tensor:
    """(act(x·W_gateᵀ) ⊙ x·W_upᵀ)·W_downᵀ: SwiGLU with silu, GeGLU with gelu."""
    gate = torch.matmul(x, w_gate.t())  # (..., h)
    up = torch.matmul(x, w_up.t())  # (..., h)
    return torch.matmul(activation(gate, activation_name) * up, w_down.t())  # (..., d_out)


def activation_grad(x: Tensor, name: str) -> Tensor:
    """d act(x) / dx for the activations of `activation`."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + x * pdf
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "silu":
        sig = torch.sigmoid(x)
        return sig * (1.0 + x * (1.0 - sig))
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def ffn_backward(dy, x, w1, b1, w2, b2, *, activation_name="gelu"):
    """Gradients (dx, dw1, db1 or None, dw2, db2 or None) of `ffn`, x as (tokens, d):
        H = x W1ᵀ + b1, A = act(H):  dW2 = dyᵀA, db2 = Σ dy, dH = (dy W2) ∘ act'(H),
        dW1 = dHᵀx, db1 = Σ dH, dx = dH W1
    """
    hidden = torch.matmul(x, w1.t())  # (tokens, h)
    if b1 is not None:
        hidden = hidden + b1
    dy = dy.to(x.dtype)
    dw2 = torch.matmul(dy.t(), activation(hidden, activation_name))  # (d_out, h)
    dhidden = torch.matmul(dy, w2) * activation_grad(hidden, activation_name)  # (tokens, h)
    return (torch.matmul(dhidden, w1), torch.matmul(dhidden.t(), x),
            None if b1 is None else dhidden.sum(0), dw2, None if b2 is None else dy.sum(0))


def gated_ffn_backward(dy, x, w_gate, w_up, w_down, *, activation_name="silu"):
    """Gradients (dx, dw_gate, dw_up, dw_down) of `gated_ffn`, x as (tokens, d):
        G = x W_gateᵀ, U = x W_upᵀ, M = act(G)∘U:  dW_down = dyᵀM, dM = dy W_down,
        dG = dM∘U∘act'(G), dU = dM∘act(G), dW_gate = dGᵀx, dW_up = dUᵀx,
        dx = dG W_gate + dU W_up
    """
    gate = torch.matmul(x, w_gate.t())  # (tokens, h)
    up = torch.matmul(x, w_up.t())  # (tokens, h)
    activated = activation(gate, activation_name)
    dy = dy.to(x.dtype)
    dw_down = torch.matmul(dy.t(), activated * up)  # (d_out, h)
    dmixed = torch.matmul(dy, w_down)  # (tokens, h)
    dgate = dmixed * up * activation_grad(gate, activation_name)
    dup = dmixed * activated
    dx = torch.matmul(dgate, w_gate) + torch.matmul(dup, w_up)
    return dx, torch.matmul(dgate.t(), x), torch.matmul(dup.t(), x), dw_down


# ----------------------------------------------------------------------------- built-ins
# PyTorch's own implementations of the same ops: the `torch` backend.


def torch_activation(x: Tensor, name: str) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return F.silu(x)
