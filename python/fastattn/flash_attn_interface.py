"""FlashAttention 2.x's Python API over fastattn's ops, for code written against
`flash_attn`: the same function names, argument names, defaults, layouts and return
values.

    from fastattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

flash-attn puts tokens before heads: (batch, seqlen, heads, head_dim), packed
(total, heads, head_dim), caches (batch, seqlen_cache, kv_heads, head_dim) or paged
(num_blocks, page_block_size, kv_heads, head_dim). fastattn.attention and
decode_attention put heads first, so every tensor goes through as a transposed VIEW
(no copy: the ops take any strides) and `out` comes back as a view of the op's
(batch, heads, seqlen, head_dim) result in flash-attn's shape (`out.reshape(b, s, -1)`
works; `.view` needs `.contiguous()` first). varlen_attention already takes flash-attn's
packed layout.

Masking is flash-attn's: causal and window_size are aligned to the bottom-right corner
(query i sees key j iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q
+ right, right = 0 when causal); a query that sees no key gets 0. Where fastattn
differs, it says so in the docstrings: softmax_lse is -inf (not +inf) for such a
query; dropout draws from torch's generator (not flash-attn's Philox stream);
return_attn_probs gives None for the probabilities; cache_leftpad is refused.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _validate as check
from .ops import attention as dense
from .ops import decode_attention as decode
from .ops.attention import attention
from .ops.decode_attention import decode_attention
from .ops.varlen_attention import varlen_attention

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

DENSE = "(batch, seqlen, nheads, headdim)"
PAGED_KV = "(num_blocks, page_block_size, nheads_k, headdim)"


# ----------------------------------------------------------------------------- checks


def _check_options(softmax_scale, deterministic, flag_name, flag):
    """The options the ops check under another name (scale, return_lse) or not at all
    (deterministic). causal, window_size, softcap, dropout_p and alibi_slopes the ops
    check under flash-attn's names."""
    if softmax_scale is not None:
        check.number("softmax_scale", softmax_scale, positive=True)
    if deterministic is not None:
        check.boolean("deterministic", deterministic)
    check.boolean(flag_name, flag)


def _check_heads(q: Tensor, k: Tensor, v: Tensor, layout: str, k_name: str = "k", v_name: str = "v") -> None:
    """q (..., nheads, headdim), k (..., nheads_k, headdim), v (..., nheads_k, headdim_v):
    head_dim of q and k equal, nheads a multiple of nheads_k, in messages that spell
    flash-attn's layout (the ops would show their own, transposed, shapes). dtype and
    device are left to the ops, which name q, k and v as flash-attn does."""
    if q.shape[-1] != k.shape[-1] or q.shape[-1] == 0:
        raise ValueError(
            f"q and {k_name} must have the same headdim > 0 (last dim of {layout}); got q {tuple(q.shape)} "
            f"and {k_name} {tuple(k.shape)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"{k_name} and {v_name} must agree on every dim but headdim ({layout}); got {k_name} "
            f"{tuple(k.shape)} and {v_name} {tuple(v.shape)}"
        )
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(
            f"nheads of q ({q.shape[-2]}) must be a multiple of nheads_k of {k_name}/{v_name} ({k.shape[-2]}): "
            f"q is {layout}, {k_name} and {v_name} (..., nheads_k, headdim)"
        )


def _unpack(name: str, packed: object, ndim: int, index_dim: int, count: int, layout: str):
    """The `count` tensors stacked along dim `index_dim` of `packed`, as views."""
    check.tensor(name, packed, ndim=ndim)
    if packed.shape[index_dim] != count:
        raise ValueError(f"{name} must have shape {layout} with {count} at dim {index_dim}, got {tuple(packed.shape)}")
    return packed.unbind(index_dim)


# ----------------------------------------------------------------------------- dense


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: Optional[str] = None,
):
    """flash_attn.flash_attn_func on fastattn.attention (forward and backward).

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim),
    nheads % nheads_k == 0 (MQA/GQA). causal and window_size bottom-right aligned.
    alibi_slopes (nheads,) or (batch, nheads): -slope·|i + seqlen_k - seqlen_q - j| is
    added to the scores. softmax_scale defaults to 1/sqrt(headdim).
    Returns out (batch, seqlen_q, nheads, headdim) (a view, see the module docstring)
    or, with return_attn_probs, (out, softmax_lse (batch, nheads, seqlen_q) fp32, None).
    deterministic: accepted; fastattn's backward passes use no atomics, so every one is
    deterministic. backend (keyword, fastattn's own): as in fastattn.attention.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, ndim=4)
    _check_heads(q, k, v, DENSE)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch (dim 0 of {DENSE}); got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    _check_options(softmax_scale, deterministic, "return_attn_probs", return_attn_probs)
    result = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                       scale=softmax_scale, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                       dropout_p=dropout_p, return_lse=return_attn_probs, backend=backend)
    if return_attn_probs:
        out, lse = result
        return out.transpose(1, 2), lse, None
    return result.transpose(1, 2)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: Optional[str] = None,
):
    """flash_attn_func with qkv (batch, seqlen, 3, nheads, headdim) stacked."""
    q, k, v = _unpack("qkv", qkv, 5, 2, 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: Optional[str] = None,
):
    """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim) stacked."""
    k, v = _unpack("kv", kv, 5, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


# ----------------------------------------------------------------------------- varlen


def _gather_paged_kv(q: Tensor, k: Tensor, v: Tensor, block_table: object, cu_seqlens_k: object):
    """Packed (total_k, nheads_k, headdim) keys and values gathered from a paged k, v
    (num_blocks, page_block_size, nheads_k, headdim): sequence b's position p is row
    p % page_block_size of block block_table[b, p // page_block_size]. A gather (a copy),
    differentiable back into the pages. Reads cu_seqlens_k to the host once, after its
    rank, dtype and device are checked."""
    table = check.tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    cu_k = check.cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    check.on_device(q.device, k=k, v=v, block_table=table)
    batch = cu_k.shape[0] - 1
    if table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch, max_num_blocks_per_seq) with batch {batch} "
                         f"(cu_seqlens_k has batch + 1 entries), got {tuple(table.shape)}")
    page = k.shape[1]
    if page == 0:
        raise ValueError(f"k must have page_block_size (dim 1 of {PAGED_KV}) > 0, got shape {tuple(k.shape)}")
    bounds = check.cu_seqlens_values("cu_seqlens_k", cu_k)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if max(lengths, default=0) > table.shape[1] * page:
        raise ValueError(f"the longest sequence of cu_seqlens_k ({max(lengths)}) exceeds block_table's "
                         f"{table.shape[1]} blocks × page_block_size {page}")
    check.block_table_values(table, lengths, page, k.shape[0], "k")
    total = bounds[-1]
    sequence = torch.repeat_interleave(torch.arange(batch, device=k.device),
                                       torch.tensor(lengths, dtype=torch.long, device=k.device),
                                       output_size=total)  # (total_k,)
    starts = torch.tensor(bounds[:-1], dtype=torch.long, device=k.device)
    position = torch.arange(total, device=k.device) - starts[sequence]  # (total_k,) position in its sequence
    blocks = table.long()[sequence, position // page]  # (total_k,)
    rows = position % page
    return k[blocks, rows], v[blocks, rows]


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
):
    """flash_attn.flash_attn_varlen_func on fastattn.varlen_attention (forward and backward).

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_q/k
    (batch + 1,) int32 cumulative lengths; max_seqlen_q/k the longest of each. Every
    option is flash_attn_func's, per sequence. Returns out (total_q, nheads, headdim) or,
    with return_attn_probs, (out, softmax_lse (nheads, total_q) fp32, None).
    block_table (batch, max_num_blocks_per_seq) int32: k and v are paged,
    (num_blocks, page_block_size, nheads_k, headdim); the pages in use are gathered into
    packed k, v first (a copy, unlike the rest of this module).
    """
    _check_options(softmax_scale, deterministic, "return_attn_probs", return_attn_probs)
    if block_table is not None:  # packed q, k, v are varlen_attention's layout: it checks them
        check.tensor("q", q, ndim=3)
        check.tensor("k", k, ndim=4)
        check.tensor("v", v, ndim=4)
        _check_heads(q, k, v, PAGED_KV)
        k, v = _gather_paged_kv(q, k, v, block_table, cu_seqlens_k)
    result = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              scale=softmax_scale, window_size=window_size, softcap=softcap,
                              alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=return_attn_probs,
                              backend=backend)
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: Optional[str] = None,
):
    """flash_attn_varlen_func with qkv (total, 3, nheads, headdim) stacked."""
    q, k, v = _unpack("qkv", qkv, 4, 1, 3, "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: Optional[str] = None,
):
    """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim) stacked."""
    k, v = _unpack("kv", kv, 4, 1, 2, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


# ----------------------------------------------------------------------------- KV cache


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """x (batch, seqlen, heads, headdim) rotated at `positions` (batch, seqlen):
    the first rotary_dim = 2·cos.shape[1] dims, in pairs (x1, x2) -> (x1·cos - x2·sin,
    x1·sin + x2·cos) with cos/sin row positions[b, t]; pairs are dims (2i, 2i+1) when
    interleaved, else (i, i + rotary_dim/2) (GPT-NeoX). Computed in fp32 (fp64 for fp64
    x), returned in x's dtype; the dims past rotary_dim pass through."""
    half = cos.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos.to(compute)[positions][:, :, None, :]  # (b, s, 1, half)
    s = sin.to(compute)[positions][:, :, None, :]
    rotated = x[..., : 2 * half].to(compute)
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half :]), dim=-1)


def _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q: Tensor, has_new_kv: bool):
    check.boolean("rotary_interleaved", rotary_interleaved)
    if rotary_cos is None and rotary_sin is None:
        return None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together (or neither)")
    if not has_new_kv:
        raise ValueError("rotary_cos/rotary_sin rotate the new k (and q): pass k and v with them, as flash-attn "
                         "requires")
    cos = check.tensor("rotary_cos", rotary_cos, ndim=2)
    sin = check.tensor("rotary_sin", rotary_sin, ndim=2)
    check.on_device(q.device, rotary_cos=cos, rotary_sin=sin)
    if cos.shape != sin.shape:
        raise ValueError(f"rotary_cos and rotary_sin must have one shape (seqlen_ro, rotary_dim / 2); got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[1] == 0 or 2 * cos.shape[1] > q.shape[-1]:
        raise ValueError(f"rotary_dim = 2 × rotary_cos.shape[1] = {2 * cos.shape[1]} must be in 2..headdim "
                         f"({q.shape[-1]})")
    return cos, sin


def _cache_layout(q, k_cache, v_cache, block_table, cache_batch_idx):
    """Checks the caches; returns (capacity, table) where table is the block table to
    hand to decode_attention: block_table, or cache_batch_idx as a one-page-per-sequence
    table over a contiguous cache, or None."""
    batch = q.shape[0]
    k_cache = check.tensor("k_cache", k_cache, ndim=4)
    v_cache = check.tensor("v_cache", v_cache, ndim=4)
    paged = block_table is not None
    layout = PAGED_KV if paged else "(batch_size_cache, seqlen_cache, nheads_k, headdim)"
    check.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    check.same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    _check_heads(q, k_cache, v_cache, layout, "k_cache", "v_cache")
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache), as in flash-attn: "
                             "put the sequence's blocks in its block_table row instead")
        if k_cache.shape[1] == 0:
            raise ValueError(f"k_cache must have page_block_size (dim 1 of {layout}) > 0 with a block_table, got "
                             f"shape {tuple(k_cache.shape)}")
        table = check.tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        check.on_device(q.device, block_table=table)
        if table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (batch, max_num_blocks_per_seq) with batch {batch}, got "
                             f"{tuple(table.shape)}")
        return table.shape[1] * k_cache.shape[1], table
    if cache_batch_idx is not None:
        index = check.tensor("cache_batch_idx", cache_batch_idx, ndim=1, dtypes=(torch.int32,))
        check.on_device(q.device, cache_batch_idx=index)
        check.shape("cache_batch_idx", index, (batch,), "(batch,)")
        if not check.tracing() and batch and (int(index.min()) < 0 or int(index.max()) >= k_cache.shape[0]):
            raise ValueError(f"cache_batch_idx entries must index rows 0..{k_cache.shape[0] - 1} of k_cache, got "
                             f"{index.tolist()}")
        # A contiguous cache is a paged one with one page of seqlen_cache per sequence.
        return k_cache.shape[1], index.unsqueeze(1)
    if k_cache.shape[0] < batch:
        raise ValueError(f"k_cache has {k_cache.shape[0]} sequences (dim 0 of {layout}) but q has batch {batch}; "
                         "pass cache_batch_idx to pick rows")
    return k_cache.shape[1], None


def _check_new_kv(k, v, q: Tensor, k_cache: Tensor, v_cache: Tensor):
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if k is None:
        return 0
    check.tensor("k", k, ndim=4)
    check.tensor("v", v, ndim=4)
    check.same_dtype(q=q, k=k, v=v)
    check.on_device(q.device, k=k, v=v)
    new = k.shape[1]
    check.shape("k", k, (q.shape[0], new, k_cache.shape[2], k_cache.shape[3]), "(batch, seqlen_new, nheads_k, headdim)")
    check.shape("v", v, (q.shape[0], new, v_cache.shape[2], v_cache.shape[3]),
                "(batch, seqlen_new, nheads_k, headdim_v)")
    return new


def _cache_seqlens(cache_seqlens, batch: int, capacity: int, device, has_new_kv: bool) -> Tensor:
    """The (batch,) int32 valid lengths of the caches before the new k, v."""
    if cache_seqlens is None:
        if has_new_kv:
            raise ValueError("cache_seqlens is required with k and v (it says where they go), as in flash-attn")
        return torch.full((batch,), capacity, dtype=torch.int32, device=device)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        check.integer("cache_seqlens", cache_seqlens, minimum=0)
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens must be an int or a (batch,) int32 tensor, got {type(cache_seqlens).__name__}")
    seqlens = check.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    check.on_device(device, cache_seqlens=seqlens)
    check.shape("cache_seqlens", seqlens, (batch,), "(batch,)")
    return seqlens


def _dense_cache(cache: Tensor, table: Optional[Tensor], batch: int, used: int) -> Tensor:
    """(batch, nheads_k, positions, headdim) keys or values of every sequence: a view of a
    contiguous cache; gathered (a copy) from a paged one, up to `used` positions."""
    cache = cache.transpose(1, 2)  # (batch_size_cache | num_blocks, nheads_k, seqlen | page, headdim)
    if table is None:
        return cache[:batch]
    page = cache.shape[2]
    columns = table[:, : max(1, -(-used // page))].long().clamp(0, cache.shape[0] - 1)  # (b, n)
    gathered = cache[columns]  # (b, n, nheads_k, page, headdim)
    return gathered.transpose(1, 2).reshape(batch, cache.shape[1], -1, cache.shape[3])


def _visibility_bias(total: Tensor, seqlen_q: int, positions: int, left: int, right: int,
                     alibi_slopes: Optional[Tensor], heads: int, dtype: torch.dtype):
    """attn_bias for fastattn.attention over a dense cache of `positions` keys: sequence b
    has total[b] keys, its query i sits at total[b] - seqlen_q + i; key j is visible iff
    j < total[b] and the (left, right) window around the query allows it. Bool
    (b, 1, seqlen_q, positions), or with ALiBi float (b, heads, seqlen_q, positions) with
    -slope·|query - key| and -inf where not visible."""
    device = total.device
    key = torch.arange(positions, device=device)  # (S,)
    query = total.long()[:, None] - seqlen_q + torch.arange(seqlen_q, device=device)  # (b, sq)
    visible = key[None, None, :] < total.long()[:, None, None]  # (b, 1, S)
    visible = visible.expand(-1, seqlen_q, -1)
    if right >= 0:
        visible = visible & (key[None, None, :] <= query[:, :, None] + right)
    if left >= 0:
        visible = visible & (key[None, None, :] >= query[:, :, None] - left)
    if alibi_slopes is None:
        return visible[:, None]
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(total.shape[0], heads)
    distance = (query[:, :, None] - key[None, None, :]).abs().to(dtype)  # (b, sq, S)
    bias = -slopes.to(dtype)[:, :, None, None] * distance[:, None]  # (b, h, sq, S)
    return bias.masked_fill(~visible[:, None], float("-inf"))


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    backend: Optional[str] = None,
):
    """flash_attn.flash_attn_with_kvcache on fastattn.decode_attention (forward only).

    q: (batch, seqlen_q, nheads, headdim). k_cache, v_cache: (batch_size_cache,
    seqlen_cache, nheads_k, headdim), or paged (num_blocks, page_block_size, nheads_k,
    headdim) with block_table (batch, max_num_blocks_per_seq) int32.
    cache_seqlens: int or (batch,) int32, the valid length of each cache BEFORE k, v are
    added; None = the whole cache. k, v (batch, seqlen_new, nheads_k, headdim): written
    IN PLACE into the caches at positions cache_seqlens .. cache_seqlens + seqlen_new - 1
    (through the op fastattn::decode_attention_append), then attended to: sequence b
    has seqlen_k = cache_seqlens[b] + seqlen_new keys, and the seqlen_q queries are
    aligned to its end (causal and window_size bottom-right; a query that sees no key,
    e.g. causal with seqlen_k < seqlen_q, gives 0).
    cache_batch_idx (batch,) int32: row of a contiguous cache each sequence uses.
    rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2), with k and v: k is rotated at
    positions cache_seqlens + t before it is written; q at cache_seqlens + t when causal
    or windowed, else at cache_seqlens; rotary_interleaved picks the pairs (see
    apply_rotary). Applied in PyTorch before the kernel (not fused).
    Returns out (batch, seqlen_q, nheads, headdim) or, with return_softmax_lse,
    (out, softmax_lse (batch, nheads, seqlen_q) fp32).

    Runs as one decode_attention call (views of the caches, no copies) when the queries
    are causal among themselves (causal, or a right window of 0, or seqlen_q == 1),
    seqlen_q <= 16 and every sequence has at least seqlen_q keys; otherwise (a prefill,
    non-causal queries, a sequence shorter than seqlen_q) as fastattn.attention over
    the cache with a mask per sequence (a paged or cache_batch_idx cache is then
    gathered into a dense copy first). num_splits is accepted (an int >= 0) and
    ignored: the decode kernel picks its own split. cache_leftpad is refused.
    """
    check.tensor("q", q, ndim=4)
    batch, seqlen_q, heads, _ = q.shape
    capacity, table = _cache_layout(q, k_cache, v_cache, block_table, cache_batch_idx)
    seqlen_new = _check_new_kv(k, v, q, k_cache, v_cache)
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad is not supported by fastattn: keep each sequence's cache starting at "
                         "position 0 (or use block_table to place it)")
    rotary = _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k is not None)
    _check_options(softmax_scale, None, "return_softmax_lse", return_softmax_lse)
    # Used (and the new k, v appended) before decode_attention checks them; causal never reaches an op.
    check.boolean("causal", causal)
    check.window("window_size", window_size)
    check.number("softcap", softcap, minimum=0.0)
    check.integer("num_splits", num_splits, minimum=0)
    seqlens = _cache_seqlens(cache_seqlens, batch, capacity, q.device, k is not None)
    left, right = window_size[0], 0 if causal else window_size[1]
    total = seqlens + seqlen_new if seqlen_new else seqlens  # (batch,) keys per sequence, new ones included
    lengths = None if check.tracing() or batch == 0 else total.tolist()
    if lengths is not None:
        old = seqlens.tolist()
        if min(old) < 0 or max(lengths) > capacity:
            where = "block_table blocks × page_block_size" if block_table is not None else "seqlen_cache"
            raise ValueError(f"cache_seqlens (+ seqlen_new {seqlen_new} of k) must lie in [0, {capacity}] "
                             f"({where}); got cache_seqlens {old}")
        if block_table is not None:
            check.block_table_values(table, lengths, k_cache.shape[1], k_cache.shape[0], "k_cache")

    if rotary is not None:
        cos, sin = rotary
        steps_new = torch.arange(seqlen_new, device=q.device)
        rotated_q_causal = causal or tuple(window_size) != (-1, -1)
        q_positions = seqlens.long()[:, None] + (torch.arange(seqlen_q, device=q.device) if rotated_q_causal
                                                 else torch.zeros(seqlen_q, dtype=torch.long, device=q.device))
        k_positions = seqlens.long()[:, None] + steps_new  # (b, seqlen_new)
        if lengths is not None:
            last = max(int(q_positions.max()) if q_positions.numel() else 0,
                       int(k_positions.max()) if k_positions.numel() else 0)
            if last >= cos.shape[0]:
                raise ValueError(f"rotary_cos/rotary_sin have {cos.shape[0]} positions (seqlen_ro) but position "
                                 f"{last} is needed")
        q = apply_rotary(q, cos, sin, q_positions, rotary_interleaved)
        k = apply_rotary(k, cos, sin, k_positions, rotary_interleaved)

    causal_queries = seqlen_q == 1 or right == 0
    fits_decode = 1 <= seqlen_q <= decode.MAX_QUERY_LEN and (lengths is None or min(lengths) >= seqlen_q)
    q_t = q.transpose(1, 2)  # (batch, nheads, seqlen_q, headdim)
    k_new = None if k is None else k.transpose(1, 2)  # (batch, nheads_k, seqlen_new, headdim)
    v_new = None if v is None else v.transpose(1, 2)
    caches = (k_cache.transpose(1, 2), v_cache.transpose(1, 2))  # (.., nheads_k, seqlen_cache | page, headdim)
    if table is None:
        caches = tuple(c[:batch] for c in caches)
    if causal_queries and fits_decode:
        fused_append = k_new is not None and seqlen_new == seqlen_q
        if k_new is not None and not fused_append:
            _append(k_new, v_new, caches, total, table, q, backend)
        result = decode_attention(q_t, *caches, total, scale=softmax_scale, block_table=table,
                                  window_size=(left, 0), softcap=softcap, alibi_slopes=alibi_slopes,
                                  return_lse=return_softmax_lse, k_new=k_new if fused_append else None,
                                  v_new=v_new if fused_append else None, backend=backend)
    else:
        if k_new is not None:
            _append(k_new, v_new, caches, total, table, q, backend)
        used = capacity if lengths is None else max(lengths, default=0)
        keys, values = (_dense_cache(c, table, batch, used) for c in (k_cache, v_cache))
        bias_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        slopes = dense.check_alibi_slopes(alibi_slopes, batch, heads, q.device)
        bias = _visibility_bias(total, seqlen_q, keys.shape[2], left, right, slopes, heads, bias_dtype)
        result = attention(q_t, keys, values, scale=softmax_scale, softcap=softcap, attn_bias=bias,
                           return_lse=return_softmax_lse, backend=backend)
    if return_softmax_lse:
        out, lse = result
        return out.transpose(1, 2), lse
    return result.transpose(1, 2)


def _append(k_new: Tensor, v_new: Tensor, caches, total: Tensor, table: Optional[Tensor], q: Tensor,
            backend: Optional[str]) -> None:
    """Write k_new, v_new (batch, nheads_k, seqlen_new, headdim) into the caches (views in
    decode_attention's layout) at positions total - seqlen_new .. total - 1, in place,
    through the registered op fastattn::decode_attention_append."""
    call = decode.DecodeCall(q.dtype, q.shape[-1], v_new.shape[-1], table is not None, caches[0].shape[2], 0.0,
                             False)
    name = decode.BACKENDS.resolve(backend, q.device, call)
    decode.decode_attention_append(k_new, v_new, caches[0], caches[1], total, table, name)
