"""Decoding attention in Triton (flash-decoding): a few new queries over a (paged) KV cache.

Notation, per sequence b with L = cache_seqlens[b] valid cache entries; the query heads
h = kvh·group + g (g < group) share kv head kvh; query t < q_len sits at position
p_t = L - q_len + t (the newest positions, causal among themselves):

    s_htj  = scale · q_ht·k_j         (softcap: c_htj = softcap · tanh(s_htj / softcap))
    x_htj  = c_htj - slope_bh·|p_t - j|                                     (ALiBi)
    x_htj  = -inf unless p_t - window_left <= j <= p_t    (window_left unbounded if -1)
    lse_ht = log Σ_j exp(x_htj)   (fp32, natural log),   o_ht = Σ_j exp(x_htj - lse_ht) v_j

Split-KV, first kernel: the keys some query sees, [max(0, p_0 - window_left), L), are cut
into NUM_SPLITS ranges of whole BLOCK_N tiles; program (split s, kv head and row block,
b) runs the online softmax over its range for BLOCK_M query rows r = g·q_len + t of its
kv head together, so each K/V tile is loaded once for the whole group:
    m' = max(m, max_j x·log2e);  l' = l·2^(m - m') + Σ_j 2^(x·log2e - m')
    acc' = acc·2^(m - m') + 2^(x·log2e - m') V
    o_s = acc / l,  lse_s = (m + log2 l)·ln2        (o_s = 0, lse_s = -inf for no keys)
Tiles that every row sees whole run without the visibility mask. With one split the
first kernel writes o and lse itself; otherwise o_s, lse_s go to fp32 partials and the
combine kernel, per (b, h, t):
    M = max_s lse_s,  w_s = exp(lse_s - M),  lse = M + log Σ_s w_s,  o = Σ_s w_s o_s / Σ_s w_s
Paged cache: key j of sequence b is row j mod page_size of page block_table[b, j div
page_size] (any page_size; a power of two takes a shift and a mask, PAGE_POW2). K and V
share the page look-up of each key tile.

Values the host does not check (that would read the device on every call): a length
outside [q_len, capacity] is clamped into [0, capacity] and a page index outside
[0, num_pages) into it, so no access leaves the caches, and bit 1 (lengths) or 2 (pages)
is set in the int32 error flags (error_flags), which the host reads when it chooses.

Optional append (_decode_attention_append_kernel, before the attention): the q_len new
keys/values are written into the cache at positions L - q_len .. L - 1 (nothing is
written for a length or page index out of range; the error flags are set).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _config
from .attention import LN2, LOG2E, _load_tile, _softcap_tanh, fast_softcap_tanh


# ----------------------------------------------------------------------------- split-KV kernel


BAD_LENGTH = tl.constexpr(1)  # error flag: a cache_seqlens value outside [q_len, capacity]
BAD_PAGE = tl.constexpr(2)  # error flag: a block_table entry in use outside [0, num_pages)


@triton.jit
def _page_slots(
    BlockTable,    # block_table[b] (PAGED)
    stride_btp,    # its page stride
    pos,           # (N,) int32 cache positions j
    valid,         # (N,) positions to look up (the others read page 0)
    page_size,     # positions per page
    page_shift,    # log2(page_size) when PAGE_POW2
    num_pages,     # pages in the cache
    PAGE_POW2: tl.constexpr,  # page_size is a power of two: shift and mask
):
    """(page, slot, bad) of positions j: page block_table[b, j div page_size] (int64,
    clamped into [0, num_pages)), slot j mod page_size (int64), bad (N,) where the table
    entry was out of range."""
    if PAGE_POW2:
        column = pos >> page_shift
        slot = pos & (page_size - 1)
    else:
        column = pos // page_size
        slot = pos % page_size
    page = tl.load(BlockTable + column.to(tl.int64) * stride_btp, mask=valid, other=0)
    bad = valid & ((page < 0) | (page >= num_pages))
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
    return page.to(tl.int64), slot.to(tl.int64), bad


@triton.jit
def _decode_attention_fwd_inner(
    acc, l_i, m_i,             # running output (BLOCK_M, BLOCK_DV) fp32, sum and max (BLOCK_M,) fp32
    bad_pages,                 # (BLOCK_N,) int1: a table entry of some tile was out of range (PAGED)
    q,                         # (BLOCK_M, BLOCK_D) query rows
    K, V,                      # cache base pointers (kv head applied; sequence too if contiguous)
    BlockTable,                # block_table[b] (PAGED)
    stride_kb, stride_kn, stride_kk, stride_vb, stride_vn, stride_vk, stride_btp,
    pos,                       # (BLOCK_M,) position p_t of each row
    slope,                     # (BLOCK_M,) ALiBi slope of each row, fp32
    offs_d, offs_dv,
    start, end,                # key range, start a multiple of BLOCK_N
    seqlen, page_size, page_shift, num_pages, window_left, sm_scale, softcap,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_POW2: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # row offsets of keys j in K and V: one page look-up serves both
        if PAGED:
            page, slot, bad = _page_slots(BlockTable, stride_btp, offs_n, offs_n < seqlen, page_size, page_shift,
                                          num_pages, PAGE_POW2)
            bad_pages |= bad
            rows_k = page * stride_kb + slot * stride_kn
            rows_v = page * stride_vb + slot * stride_vn
        else:
            rows_k = offs_n.to(tl.int64) * stride_kn
            rows_v = offs_n.to(tl.int64) * stride_vn
        k_t = _load_tile(K + offs_d[:, None] * stride_kk + rows_k[None, :], offs_d, D, offs_n, seqlen,
                         D != BLOCK_D, MASKED)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            x = _softcap_tanh(qk * (sm_scale / softcap), FAST_TANH) * (softcap * LOG2E)
        else:
            x = qk * (sm_scale * LOG2E)
        if HAS_ALIBI:
            x -= (slope * LOG2E)[:, None] * tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
        if MASKED:
            visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= pos[:, None] - window_left)
            x = tl.where(visible, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: exp2 -> 0
        p = tl.math.exp2(x - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + rows_v[:, None] + offs_dv[None, :] * stride_vk, offs_n, seqlen, offs_dv, DV,
                       MASKED, DV != BLOCK_DV)  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i, bad_pages


# Integers that vary from call to call (or with the batch size) are not specialised:
# each value class (1, multiple of 16, other) would compile its own variant. q_len
# (1 for plain decoding, a few more for speculative decoding), group, row_blocks,
# page_size and the strides stay specialised: they are fixed per model and cache, and
# q_len == 1 folds the row arithmetic.
_RUNTIME_INTS = ["num_splits", "window_left", "capacity", "num_pages", "page_shift", "split_keys_bucket"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _decode_attention_fwd_kernel(
    Q,             # (batch, heads, q_len, D)
    K,             # contiguous (batch, kv_heads, max_len, D) or paged (num_pages, kv_heads, page_size, D)
    V,             # like K, head dim DV
    CacheSeqlens,  # (batch,) int32 valid cache entries, the q_len new ones included
    BlockTable,    # (batch, max_pages) int32 page of each block of page_size positions (PAGED)
    Slopes,        # ALiBi slopes (heads,) or (batch, heads) (HAS_ALIBI)
    Out,           # (batch, heads, q_len, [num_splits,] DV): the output, or fp32 partial outputs (split axis)
    Lse,           # (batch, heads, q_len, [num_splits]) fp32: the lse, or the partial lse (split axis)
    ErrorFlags,    # (1,) int32: BAD_LENGTH / BAD_PAGE bits or-ed in on bad input
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,   # kb: per sequence (contiguous) or per page (paged)
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_btb, stride_btp,
    stride_sb, stride_sh,
    stride_ob, stride_oh, stride_om, stride_os, stride_ok,   # os: per split (0 with one split)
    stride_lb, stride_lh, stride_lm, stride_ls,
    q_len,         # new queries per sequence (1..16)
    group,         # heads // kv_heads
    row_blocks,    # programs per kv head: cdiv(group · q_len, BLOCK_M)
    page_size,     # positions per page (PAGED)
    page_shift,    # log2(page_size) (PAGE_POW2)
    num_pages,     # pages in the cache (PAGED)
    capacity,      # most valid entries a sequence can have: max_len, or max_pages · page_size
    num_splits,    # key ranges per sequence (grid axis 0)
    window_left,   # >= every cache length when unbounded
    sm_scale,      # softmax scale
    softcap,       # > 0 when HAS_SOFTCAP
    split_keys_bucket,  # autotune key only
    D: tl.constexpr,          # head_dim of q, k
    DV: tl.constexpr,         # head_dim of v
    BLOCK_D: tl.constexpr,    # D padded to a power of two >= 16
    BLOCK_DV: tl.constexpr,   # DV padded likewise
    PAGED: tl.constexpr,
    PAGE_POW2: tl.constexpr,  # page_size is a power of two (PAGED)
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,  # softcap's tanh is tanh.approx.f32 (16-bit inputs on a GPU)
    HAS_ALIBI: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,    # query rows per program (>= 16)
    BLOCK_N: tl.constexpr,    # keys per tile
):
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    b = tl.program_id(2)
    kvh = pid_g // row_blocks
    rows = (pid_g % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # r = g·q_len + t
    row_ok = rows < group * q_len
    h = kvh * group + rows // q_len
    t = rows % q_len
    length = tl.load(CacheSeqlens + b)
    seqlen = tl.minimum(tl.maximum(length, 0), capacity)  # no access past the cache on bad input
    pos = seqlen - q_len + t

    # int64: a head-dim stride of the caller's q or caches may be large (a transposed view)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    Q += b.to(tl.int64) * stride_qb
    q = tl.load(Q + h[:, None].to(tl.int64) * stride_qh + t[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_sb + h * stride_sh, mask=row_ok, other=0.0).to(tl.float32)
    K += kvh.to(tl.int64) * stride_kh
    V += kvh.to(tl.int64) * stride_vh
    BlockTable += b.to(tl.int64) * stride_btb
    if not PAGED:
        K += b.to(tl.int64) * stride_kb
        V += b.to(tl.int64) * stride_vb

    # this split's whole tiles of the keys some query sees
    tile_lo = tl.maximum(seqlen - q_len - window_left, 0) // BLOCK_N
    per_split = tl.cdiv(tl.cdiv(seqlen, BLOCK_N) - tile_lo, num_splits)
    start = (tile_lo + pid_s * per_split) * BLOCK_N
    end = tl.maximum(tl.minimum(start + per_split * BLOCK_N, seqlen), start)
    # its tiles every query sees whole: from the last query's window edge to the first query
    full_lo = tl.cdiv(tl.maximum(seqlen - 1 - window_left, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = (seqlen - q_len + 1) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bad_pages = tl.zeros([BLOCK_N], dtype=tl.int1)
    acc, l_i, m_i, bad_pages = _decode_attention_fwd_inner(
        acc, l_i, m_i, bad_pages, q, K, V, BlockTable, stride_kb, stride_kn, stride_kk, stride_vb, stride_vn,
        stride_vk, stride_btp, pos, slope, offs_d, offs_dv, start, full_lo, seqlen, page_size, page_shift, num_pages,
        window_left, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, PAGED, PAGE_POW2, HAS_SOFTCAP,
        FAST_TANH, HAS_ALIBI, DOT_PRECISION)
    acc, l_i, m_i, bad_pages = _decode_attention_fwd_inner(
        acc, l_i, m_i, bad_pages, q, K, V, BlockTable, stride_kb, stride_kn, stride_kk, stride_vb, stride_vn,
        stride_vk, stride_btp, pos, slope, offs_d, offs_dv, full_lo, full_hi, seqlen, page_size, page_shift,
        num_pages, window_left, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, PAGED, PAGE_POW2,
        HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, DOT_PRECISION)
    acc, l_i, m_i, bad_pages = _decode_attention_fwd_inner(
        acc, l_i, m_i, bad_pages, q, K, V, BlockTable, stride_kb, stride_kn, stride_kk, stride_vb, stride_vn,
        stride_vk, stride_btp, pos, slope, offs_d, offs_dv, full_hi, end, seqlen, page_size, page_shift, num_pages,
        window_left, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, PAGED, PAGE_POW2, HAS_SOFTCAP,
        FAST_TANH, HAS_ALIBI, DOT_PRECISION)
    flags = tl.where((length < q_len) | (length > capacity), BAD_LENGTH, 0)
    if PAGED:
        flags |= tl.where(tl.max(bad_pages.to(tl.int32), 0) > 0, BAD_PAGE, 0)
    tl.atomic_or(ErrorFlags, flags, mask=flags != 0)

    empty = l_i == 0.0  # no key in this split: o_s 0, lse_s -inf
    safe_l = tl.where(empty, 1.0, l_i)
    out = acc / safe_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(safe_l)) * LN2)
    Out += b.to(tl.int64) * stride_ob + pid_s.to(tl.int64) * stride_os
    out_ptrs = Out + h[:, None].to(tl.int64) * stride_oh + t[:, None] * stride_om + offs_dv[None, :] * stride_ok
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    Lse += b.to(tl.int64) * stride_lb + pid_s.to(tl.int64) * stride_ls
    tl.store(Lse + h.to(tl.int64) * stride_lh + t * stride_lm, lse, mask=row_ok)


# ----------------------------------------------------------------------------- combine kernel


@triton.jit(do_not_specialize=["num_splits"])
def _decode_attention_combine_kernel(
    OutPart,       # (batch, heads, q_len, num_splits, DV) fp32 partial outputs
    LsePart,       # (batch, heads, q_len, num_splits) fp32 partial lse
    Out,           # (batch, heads, q_len, DV) output
    Lse,           # (batch, heads, q_len) fp32 output
    stride_pb, stride_ph, stride_pm, stride_ps, stride_pk,
    stride_qb, stride_qh, stride_qm, stride_qs,   # of LsePart
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_lb, stride_lh, stride_lm,
    num_splits,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,        # splits loaded at once
    BLOCK_S_ALL: tl.constexpr,    # the most splits there can be (a power of two >= num_splits)
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    LsePart += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + t * stride_qm
    OutPart += b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + t * stride_pm
    offs_all = tl.arange(0, BLOCK_S_ALL)
    lse_all = tl.load(LsePart + offs_all * stride_qs, mask=offs_all < num_splits, other=float("-inf"))
    m = tl.max(lse_all, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_all - m), 0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        in_range = s0 + offs_s < num_splits
        w = tl.exp(tl.load(LsePart + (s0 + offs_s) * stride_qs, mask=in_range, other=float("-inf")) - m)
        o = tl.load(OutPart + (s0 + offs_s)[:, None] * stride_ps + offs_dv[None, :] * stride_pk,
                    mask=in_range[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    safe_total = tl.where(total == 0.0, 1.0, total)
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t * stride_om
    tl.store(Out + offs_dv * stride_ok, (acc / safe_total).to(Out.dtype.element_ty), mask=offs_dv < DV)
    lse = tl.where(total == 0.0, float("-inf"), m + tl.log(safe_total))
    tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + t * stride_lm, lse)


# ----------------------------------------------------------------------------- append kernel


@triton.jit(do_not_specialize=["capacity", "num_pages", "page_shift"])
def _decode_attention_append_kernel(
    New,           # (batch, kv_heads, q_len, DN) new keys or values
    Cache,         # contiguous (batch, kv_heads, max_len, DN) or paged (num_pages, kv_heads, page_size, DN)
    CacheSeqlens,  # (batch,) int32 valid entries, the new ones included
    BlockTable,    # (batch, max_pages) int32 (PAGED)
    ErrorFlags,    # (1,) int32: BAD_LENGTH / BAD_PAGE bits or-ed in on bad input
    stride_nb, stride_nh, stride_nm, stride_nk,
    stride_cb, stride_ch, stride_cn, stride_ck,
    stride_btb, stride_btp,
    q_len,
    page_size,
    page_shift,    # log2(page_size) (PAGE_POW2)
    num_pages,     # pages in the cache (PAGED)
    capacity,      # max_len, or max_pages · page_size
    DN: tl.constexpr,         # head dim
    BLOCK_DN: tl.constexpr,   # DN padded to a power of two
    BLOCK_T: tl.constexpr,    # q_len padded to a power of two
    PAGED: tl.constexpr,
    PAGE_POW2: tl.constexpr,  # page_size is a power of two (PAGED)
):
    """cache[b, kvh, L - q_len + t] = new[b, kvh, t] for t < q_len (L = cache_seqlens[b]);
    nothing for a sequence whose L is outside [q_len, capacity], nor for a row whose page
    index is out of range (the error flags are set instead)."""
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_DN).to(tl.int64)  # the caches' head-dim stride may be large
    length = tl.load(CacheSeqlens + b)
    length_ok = (length >= q_len) & (length <= capacity)
    row_ok = (offs_t < q_len) & length_ok
    pos = length - q_len + offs_t
    Cache += kvh.to(tl.int64) * stride_ch
    flags = tl.where(length_ok, 0, BAD_LENGTH)
    if PAGED:
        page, slot, bad = _page_slots(BlockTable + b.to(tl.int64) * stride_btb, stride_btp, pos, row_ok, page_size,
                                      page_shift, num_pages, PAGE_POW2)
        row_ok &= ~bad
        flags |= tl.where(tl.max(bad.to(tl.int32), 0) > 0, BAD_PAGE, 0)
        rows = page * stride_cb + slot * stride_cn
    else:
        rows = b.to(tl.int64) * stride_cb + pos.to(tl.int64) * stride_cn
    mask = row_ok[:, None] & (offs_d[None, :] < DN)
    new = tl.load(New + b.to(tl.int64) * stride_nb + kvh.to(tl.int64) * stride_nh + offs_t[:, None] * stride_nm
                  + offs_d[None, :] * stride_nk, mask=mask)
    tl.store(Cache + rows[:, None] + offs_d[None, :] * stride_ck, new, mask=mask)
    tl.atomic_or(ErrorFlags, flags, mask=(flags != 0) & (kvh == 0))


# ----------------------------------------------------------------------------- launchers

_TUNED: list = []
_ERROR_FLAGS: dict = {}


def error_flags(device: torch.device) -> torch.Tensor:
    """The (1,) int32 error flags of `device` that the kernels or BAD_LENGTH / BAD_PAGE
    into (allocated once per device, zeroed; clear it with .zero_())."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key not in _ERROR_FLAGS:
        _ERROR_FLAGS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _ERROR_FLAGS[key]


def _kernel_and_config(q: torch.Tensor, block_m: int, block_d: int, block_dv: int, programs: int, keys: int):
    """(kernel, num_splits, launch config): the plain kernel with the config of
    _config.decode_attention_launch_config (the default of q's GPU, the pinned one, the
    interpreter's), or the autotuned kernel and no config (FASTATTN_AUTOTUNE=1)."""
    device = q.device
    sm_count = None
    if device.type == "cuda":
        sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    num_splits, config = _config.decode_attention_launch_config(device, q.dtype, block_m, block_d, block_dv,
                                                                programs, keys, sm_count)
    if config is not None:
        return _decode_attention_fwd_kernel, num_splits, config
    if not _TUNED:
        _TUNED.append(triton.autotune(
            configs=_config.decode_attention_configs(),
            key=list(_config.DECODE_ATTENTION_TUNE_KEY),
            prune_configs_by={"early_config_prune": _config.decode_attention_prune},
            cache_results=True,
        )(_decode_attention_fwd_kernel))
    return _TUNED[0], num_splits, {}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _page_args(page_size: int) -> dict:
    """page_size, page_shift and PAGE_POW2 for a cache of page_size positions per page."""
    pow2 = page_size & (page_size - 1) == 0
    return dict(page_size=page_size, page_shift=page_size.bit_length() - 1 if pow2 else 0, PAGE_POW2=pow2)


@_config.on_tensor_device
def decode_attention_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale, window_left,
                             softcap):
    """out (batch, heads, q_len, head_dim_v) and lse (batch, heads, q_len) fp32.

    q (batch, heads, q_len, head_dim); contiguous caches (batch, kv_heads, max_len, d)
    or paged (num_pages, kv_heads, page_size, d) with block_table (batch, max_pages)
    int32; any strides; cache_seqlens (batch,) int32, the new tokens included;
    alibi_slopes (heads,) or (batch, heads); window_left -1 = unbounded. Reads nothing
    from the device: the split count and every launch argument come from shapes; bad
    cache_seqlens / block_table values set error_flags(q.device).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k_cache.shape[1], v_cache.shape[-1]
    out = q.new_empty(batch, heads, q_len, head_dim_v)
    lse = q.new_empty(batch, heads, q_len, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    paged = block_table is not None
    page_size = k_cache.shape[2]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[2]
    window = capacity if window_left < 0 else min(window_left, capacity)
    keys = min(capacity, window + q_len)  # the most keys one sequence attends to
    group = heads // kv_heads
    block_d, block_dv = _pad(head_dim), _pad(head_dim_v)
    block_m = _config.decode_attention_block_m(group * q_len, q.element_size(), max(block_d, block_dv))
    row_blocks = triton.cdiv(group * q_len, block_m)
    kernel, num_splits, config = _kernel_and_config(q, block_m, block_d, block_dv, batch * kv_heads * row_blocks, keys)

    if alibi_slopes is None:
        slopes, slope_strides = q, (0, 0)
    elif alibi_slopes.dim() == 1:
        slopes, slope_strides = alibi_slopes, (0, alibi_slopes.stride(0))
    else:
        slopes, slope_strides = alibi_slopes, alibi_slopes.stride()
    table = block_table if paged else cache_seqlens
    table_strides = block_table.stride() if paged else (0, 0)
    if num_splits == 1:
        part_out, part_lse = out, lse
        out_strides = (*out.stride()[:3], 0, out.stride(3))
        lse_strides = (*lse.stride(), 0)
    else:
        part_out = torch.empty(batch, heads, q_len, num_splits, head_dim_v, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, heads, q_len, num_splits, dtype=torch.float32, device=q.device)
        out_strides, lse_strides = part_out.stride(), part_lse.stride()
    kernel[(num_splits, kv_heads * row_blocks, batch)](
        Q=q, K=k_cache, V=v_cache, CacheSeqlens=cache_seqlens, BlockTable=table, Slopes=slopes,
        Out=part_out, Lse=part_lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2), stride_qk=q.stride(3),
        stride_kb=k_cache.stride(0), stride_kh=k_cache.stride(1), stride_kn=k_cache.stride(2),
        stride_kk=k_cache.stride(3),
        stride_vb=v_cache.stride(0), stride_vh=v_cache.stride(1), stride_vn=v_cache.stride(2),
        stride_vk=v_cache.stride(3),
        stride_btb=table_strides[0], stride_btp=table_strides[1],
        stride_sb=slope_strides[0], stride_sh=slope_strides[1],
        stride_ob=out_strides[0], stride_oh=out_strides[1], stride_om=out_strides[2], stride_os=out_strides[3],
        stride_ok=out_strides[4],
        stride_lb=lse_strides[0], stride_lh=lse_strides[1], stride_lm=lse_strides[2], stride_ls=lse_strides[3],
        ErrorFlags=error_flags(q.device),
        q_len=q_len, group=group, row_blocks=row_blocks, **_page_args(page_size), num_pages=k_cache.shape[0],
        capacity=capacity, num_splits=num_splits, window_left=window, sm_scale=float(scale), softcap=float(softcap),
        split_keys_bucket=_config.decode_attention_split_keys_bucket(triton.cdiv(keys, num_splits)),
        D=head_dim, DV=head_dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, PAGED=paged,
        HAS_SOFTCAP=softcap > 0, FAST_TANH=fast_softcap_tanh(softcap, q.dtype), HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m, **config,
    )
    if num_splits > 1:
        _decode_attention_combine_kernel[(q_len, heads, batch)](
            OutPart=part_out, LsePart=part_lse, Out=out, Lse=lse,
            **dict(zip(("stride_pb", "stride_ph", "stride_pm", "stride_ps", "stride_pk"), part_out.stride())),
            **dict(zip(("stride_qb", "stride_qh", "stride_qm", "stride_qs"), part_lse.stride())),
            **dict(zip(("stride_ob", "stride_oh", "stride_om", "stride_ok"), out.stride())),
            **dict(zip(("stride_lb", "stride_lh", "stride_lm"), lse.stride())),
            num_splits=num_splits, DV=head_dim_v, BLOCK_DV=block_dv,
            BLOCK_S_ALL=_config.DECODE_ATTENTION_MAX_SPLITS, **_config.decode_attention_combine_config(block_dv),
        )
    return out, lse


@_config.on_tensor_device
def decode_attention_append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table) -> None:
    """Write k_new, v_new (batch, kv_heads, q_len, d) into the caches at positions
    cache_seqlens - q_len .. cache_seqlens - 1 of each sequence (in place). Reads
    nothing from the device: bad cache_seqlens / block_table values write nothing there
    and set error_flags(k_cache.device)."""
    batch, kv_heads, q_len = k_new.shape[:3]
    if k_new.numel() == 0 and v_new.numel() == 0:
        return
    paged = block_table is not None
    table = block_table if paged else cache_seqlens
    table_strides = block_table.stride() if paged else (0, 0)
    page_size = k_cache.shape[2]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[2]
    for new, cache in ((k_new, k_cache), (v_new, v_cache)):
        _decode_attention_append_kernel[(kv_heads, batch)](
            New=new, Cache=cache, CacheSeqlens=cache_seqlens, BlockTable=table, ErrorFlags=error_flags(cache.device),
            **dict(zip(("stride_nb", "stride_nh", "stride_nm", "stride_nk"), new.stride())),
            **dict(zip(("stride_cb", "stride_ch", "stride_cn", "stride_ck"), cache.stride())),
            stride_btb=table_strides[0], stride_btp=table_strides[1], q_len=q_len, **_page_args(page_size),
            num_pages=cache.shape[0], capacity=capacity,
            DN=new.shape[-1], BLOCK_DN=triton.next_power_of_2(new.shape[-1]), BLOCK_T=triton.next_power_of_2(q_len),
            PAGED=paged, num_warps=1,
        )

