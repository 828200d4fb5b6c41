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
    batch, heads, seqlen_q, _ = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # (b, h, sk, d)
        v = v.repeat_interleave(heads // kv_heads, dim=1)  # (b, h, sk, dv)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (b, h, sq, sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k, top_left, scores.dtype)
    visible = attention_visibility(
        seqlen_q, seqlen_k, window_size[0], 0 if causal else window_size[1], top_left, q.device
    )
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            visible = attn_bias if visible is None else visible & attn_bias
        else:
            scores = scores + attn_bias.to(scores.dtype)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True) if seqlen_k > 0 else scores.new_full(
        (*scores.shape[:-1], 1), float("-inf")
    )
    # A fully masked row has max -inf; shifting by 0 there keeps exp() at 0 instead of NaN.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = dropout_keep_mask(probs.shape, dropout_p, q.device, generator)
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)  # (b, h, sq, dv)
    if not return_lse:
        return out
    lse = (torch.log(row_sum) + row_max).squeeze(-1).float()  # (b, h, sq)
    return out, lse


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    return_lse: bool = False,
    **options,
):
    """Attention over packed sequences: q (total_q, h, d), k/v (total_k, hk, d).

    Sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and
    cu_seqlens_k[i]:cu_seqlens_k[i+1] of k/v; masking is per sequence. The lse is
    (h, total_q). `options` are those of `attention` (no attn_bias); alibi_slopes may
    be (h,) or (batch, h); a dropout_mask is not supported here (use a generator).
    """
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    alibi_slopes = options.pop("alibi_slopes", None)
    outs, lses = [], []
    for i in range(len(bounds_q) - 1):
        q_i = q[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, h, sq_i, d)
        k_i = k[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, hk, sk_i, d)
        v_i = v[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, hk, sk_i, dv)
        slopes_i = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes_i = alibi_slopes[i]
        out_i, lse_i = attention(q_i, k_i, v_i, alibi_slopes=slopes_i, return_lse=True, **options)
        outs.append(out_i[0].transpose(0, 1))  # (sq_i, h, dv)
        lses.append(lse_i[0])  # (h, sq_i)
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, q.shape[1], v.shape[2])
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    return out, lse


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
    dtype = residual_dtype(x, residual, residual_in_fp32)
    return x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)


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
        result += (summed,)
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
        result += (summed,)
    if return_stats:
        result += (rstd.reshape(-1).float(),)
    return result[0] if len(result) == 1 else result


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
