"""Fused attention (FlashAttention-2) in Triton: forward and deterministic backward.

Notation, per (batch b, head h), query row i, key column j; kv head = h // (heads // kv_heads):

    s_ij  = scale · q_i·k_j                                     raw scaled score
    c_ij  = softcap · tanh(s_ij / softcap)   (else c_ij = s_ij)  soft-capped score
    x_ij  = c_ij - slope_bh·|i + off - j| + bias_bhij            ALiBi and additive bias
    x_ij  = -inf where key j is not visible from row i:
            visible iff i + off - window_left <= j <= i + off + window_right (an unbounded
            side is no constraint), j < seqlen_k, and a bool mask (if given) is True;
            off = seqlen_k - seqlen_q (bottom-right) or 0 (top-left); causal = window_right 0
    lse_i = log Σ_j exp(x_ij)            (fp32, natural log; -inf for a fully masked row)
    P_ij  = exp(x_ij - lse_i)
    Z_ij  = keep-mask of dropout: byte j mod 16 of Philox4x32-10(key seed; counter
            (j div 16, i, b·heads + h, rng_offset)) >= ceil(256·dropout_p)
    o_i   = Σ_j P_ij · Z_ij / (1 - dropout_p) · v_j              (0 for a fully masked row)

One Philox call gives 128 random bits, the keep-bytes of 16 consecutive keys of a row
(as FlashAttention-2 does), so a score costs 1/16 of a call. The keep rate is
1 - ceil(256·p)/256 (p rounded up to a multiple of 1/256); outputs scale by 1/(1 - p).
seed and rng_offset are read from a (2,) int64 tensor on the device, drawn per call by a
torch RNG op: they never enter a compiled kernel's key, and a CUDA graph replay draws new
ones. With softcap in 16-bit on a GPU, tanh is the hardware tanh.approx.f32 (relative
error about 2^-11, as FlashAttention-2's softcap); fp32 and the interpreter use an
fp32-exact form. Forward and backward use the same tanh, so P replays exactly.

Forward (one program per (BLOCK_M query rows, h, b)): q stays in registers, key/value
tiles stream through, online softmax in base 2 with fp32 running max m and sum l:
    m' = max(m, max_j x_ij·log2e);  l' = l·2^(m - m') + Σ_j 2^(x_ij·log2e - m')
    acc' = acc·2^(m - m') + (2^(x·log2e - m') ∘ Z) V
    o = acc / l / (1 - p),  lse = (m + log2 l) · ln2
Tiles that no row can see are skipped; tiles every row sees fully run without the
visibility mask, the edge tiles (diagonal, window edges, sequence end) with it.

Backward, with dO the output gradient and dlse the gradient of lse (0 if absent):
    δ_i   = rowsum(dO_i ∘ o_i) - dlse_i                                (preprocess kernel)
    dP_ij = (dO_i·v_j) · Z_ij / (1 - p)
    dX_ij = P_ij · (dP_ij - δ_i)                         (= dbias_bhij before reduction)
    dS_ij = dX_ij · (1 - (c_ij/softcap)²)   with softcap, else dX_ij
    dV_j  = Σ_h∈group Σ_i P_ij Z_ij/(1 - p) · dO_i
    dK_j  = scale · Σ_h∈group Σ_i dS_ij q_i      (programs over key tiles, loop over the group)
    dQ_i  = scale · Σ_j dS_ij k_j                (programs over query tiles)
    dbias = dX summed over the broadcast dims of the bias (programs over bias tiles)
P is recomputed from lse, Z from (seed, rng_offset, position): nothing N² is stored, and
no program adds into memory another program writes, so the backward is deterministic.

Addresses: every row or column index is widened to int64 before it multiplies a stride
(a row index times a row stride passes 2^31 in long sequences, in (b, s, h, d) views and
in biases with seqlen_q·seqlen_k >= 2^31).

Packed variable-length sequences (fastattn.varlen_attention) run the same kernels with
IS_VARLEN: b indexes the sequences of cu_seqlens_q/k, a program reads its sequence's
first rows and lengths from them (seqlen_q, seqlen_k become per sequence, off =
seqlen_k - seqlen_q bottom-right), offsets its q/k/v/out/grad pointers by those rows
(the batch strides are 0) and exits if its tile lies past the sequence's end; lse,
Delta and Lse2 are (heads, total_q). i, j and b·heads + h of the formulas above are
the positions and sequence index inside the packed batch, dropout included.

Compile variants: the integer arguments that change with the call's lengths (seqlens,
offsets, windows, heads, total_q, the lse strides, the autotune keys) are
do_not_specialize, so they never fork a compile; the q/k/v/out/bias strides keep
Triton's specialisation (== 1 and divisibility by 16), which lets the loads vectorise
and forks at most twice per stride; `group` keeps only its == 1 specialisation (MHA
drops the loop over the kv group's heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config

LOG2E = tl.constexpr(1.4426950408889634)  # scores enter exp2 as x·log2e
LN2 = tl.constexpr(0.6931471805599453)  # lse = log2-domain lse · ln2

# bias kinds (BIAS_KIND): none, additive float, bool mask (True = attend)
_NO_BIAS, _FLOAT_BIAS, _BOOL_MASK = 0, 1, 2

# runtime integers that must not fork compiles (see the module docstring)
_SHAPE_INTS = ["heads", "seqlen_q", "seqlen_k", "diag_offset", "window_left", "window_right"]
_TUNE_INTS = ["seqlen_bucket", "causal"]
_FWD_NO_SPECIALIZE = _SHAPE_INTS + _TUNE_INTS + ["stride_lb", "stride_lh"]
_BWD_NO_SPECIALIZE = _SHAPE_INTS + _TUNE_INTS + ["total_q"]
_PREPROCESS_NO_SPECIALIZE = ["heads", "seqlen_q", "total_q", "stride_lb", "stride_lh", "stride_dlb", "stride_dlh"]
_DBIAS_NO_SPECIALIZE = _SHAPE_INTS + ["batch", "tiles_n"]
_MASK_NO_SPECIALIZE = ["heads", "seqlen_q", "seqlen_k"]
_GROUP_ALIGNMENT_ONLY = ["group"]  # keep == 1, drop divisibility by 16


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tanh(x):
    """tanh to fp32 precision: odd Taylor polynomial for |x| < 1/4, (1 - e^-2|x|)/(1 + e^-2|x|)
    above (no cancellation there)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -t, t)


def fast_softcap_tanh(softcap: float, dtype) -> bool:
    """Whether softcap's tanh runs as tanh.approx.f32 (_softcap_tanh's FAST): 16-bit inputs
    on a GPU; fp32 inputs and the interpreter keep the exact _tanh."""
    return softcap > 0 and dtype != torch.float32 and not _config.interpreted()


@triton.jit
def _softcap_tanh(
    x,             # fp32 tensor
    FAST: tl.constexpr,  # the hardware tanh.approx.f32 (GPU, 16-bit inputs), else _tanh
):
    """tanh for softcap: tanh.approx.f32 (one MUFU op, relative error about 2^-11) or _tanh."""
    if FAST:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return _tanh(x)


@triton.jit
def _tile_ptrs(
    base,          # pointer
    offs_r,        # (R,) row indices
    stride_r,
    offs_c,        # (C,) column indices
    stride_c,
):
    """(R, C) pointers base + offs_r·stride_r + offs_c·stride_c, the products in int64."""
    return base + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :].to(tl.int64) * stride_c


@triton.jit
def _load_tile(
    ptrs,          # pointers of a (R, C) tile
    offs_r,        # (R,) row indices
    n_r,           # rows in bounds: offs_r < n_r
    offs_c,        # (C,) column indices
    n_c,           # columns in bounds: offs_c < n_c
    CHECK_R: tl.constexpr,  # mask rows
    CHECK_C: tl.constexpr,  # mask columns
):
    if CHECK_R:
        if CHECK_C:
            return tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        else:
            return tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    else:
        if CHECK_C:
            return tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _load_strided(
    base,          # pointer of element (0, 0)
    offs_r,        # (R,) row indices
    stride_r,
    n_r,           # rows in bounds: offs_r < n_r
    offs_c,        # (C,) column indices
    stride_c,
    n_c,           # columns in bounds: offs_c < n_c
    CHECK_R: tl.constexpr,  # mask rows
    CHECK_C: tl.constexpr,  # mask columns
):
    """The (R, C) tile at base + offs_r·stride_r + offs_c·stride_c (int64 products), 0
    out of bounds."""
    return _load_tile(_tile_ptrs(base, offs_r, stride_r, offs_c, stride_c), offs_r, n_r, offs_c, n_c,
                      CHECK_R, CHECK_C)


@triton.jit
def _rng_state(
    RngState,      # (2,) int64: Philox key, counter offset
    HAS_DROPOUT: tl.constexpr,
):
    """(seed int64, rng_offset int32: the low 32 bits of the offset); zeros without dropout."""
    if HAS_DROPOUT:
        return tl.load(RngState), tl.load(RngState + 1).to(tl.int32)
    else:
        return tl.zeros([], dtype=tl.int64), tl.zeros([], dtype=tl.int32)


@triton.jit
def _dropout_keep(
    seed,          # Philox key (int64 scalar)
    rng_offset,    # Philox counter word 3 (int32 scalar)
    bh,            # b * heads + h (query head)
    rows,          # (R,) query indices i
    n0,            # first key index j of the tile, a multiple of 16
    dropout_p,     # drop probability
    BLOCK_N: tl.constexpr,  # keys in the tile, a multiple of 16
):
    """Keep-mask (R, BLOCK_N) of a tile, True = kept: one Philox4x32-10 call per 16 keys
    of a row, at counter (j // 16, i, bh, rng_offset); byte j % 16 of its output (word
    (j % 16) // 4, least significant byte first) keeps (i, j) iff >= ceil(256·dropout_p)."""
    groups = n0 // 16 + tl.arange(0, BLOCK_N // 16)
    c0 = groups[None, :] + rows[:, None] * 0  # (R, BLOCK_N // 16)
    c1 = rows[:, None] + groups[None, :] * 0
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + bh, zero + rng_offset)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # (R, BLOCK_N // 4): r0 r1 r2 r3 per call
    keep_bytes = tl.interleave(tl.interleave(words & 0xFF, (words >> 16) & 0xFF),
                               tl.interleave((words >> 8) & 0xFF, words >> 24))  # (R, BLOCK_N): bytes 0..3 per word
    threshold = tl.math.ceil(dropout_p * 256.0).to(tl.uint32)
    return keep_bytes >= threshold


@triton.jit
def _dropout_scale(
    p,             # P of the tile
    dp,            # fp32 tile of dO_i·v_j, oriented like p
    keep,          # keep-mask, oriented like p
    dropout_p,     # drop probability
):
    """(P∘Z/(1 - dropout_p), (dO·v)∘Z/(1 - dropout_p)) of the tile."""
    keep_scale = 1.0 / (1.0 - dropout_p)
    return tl.where(keep, p * keep_scale, 0.0), tl.where(keep, dp * keep_scale, 0.0)


@triton.jit
def _scores(
    qk,            # fp32 tile of raw products q_i·k_j, any orientation
    rows,          # query indices i, broadcastable to qk
    cols,          # key indices j, broadcastable to qk
    seqlen_q,
    seqlen_k,
    diag_offset,   # off: seqlen_k - seqlen_q (bottom-right) or 0 (top-left)
    window_left,   # left window (>= seqlen_q + seqlen_k when unbounded)
    window_right,  # right window (likewise)
    sm_scale,      # softmax scale
    softcap,       # softcap (> 0 when HAS_SOFTCAP)
    slope,         # ALiBi slope of this (b, h), fp32
    Bias,          # bias / mask of this (b, h): element (i, j) at i*stride_bm + j*stride_bn
    stride_bm,
    stride_bn,
    MASKED: tl.constexpr,      # apply the visibility rule (edge tiles)
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,   # softcap's tanh is tanh.approx.f32
    HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr,   # 0 none, 1 float bias, 2 bool mask
):
    """x·log2e of the tile (-inf where not visible), and tanh(s/softcap) (or qk)."""
    if HAS_SOFTCAP:
        t = _softcap_tanh(qk * (sm_scale / softcap), FAST_TANH)
        x = t * (softcap * LOG2E)
    else:
        t = qk
        x = qk * (sm_scale * LOG2E)
    if HAS_ALIBI:
        x -= (slope * LOG2E) * tl.abs(rows + diag_offset - cols).to(tl.float32)
    if BIAS_KIND != 0:
        in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
        b = tl.load(Bias + rows.to(tl.int64) * stride_bm + cols.to(tl.int64) * stride_bn, mask=in_bounds, other=0)
        if BIAS_KIND == 1:
            x += b.to(tl.float32) * LOG2E
        else:
            x = tl.where(b != 0, x, float("-inf"))
    if MASKED:
        visible = (cols < seqlen_k) & (cols >= rows + diag_offset - window_left) & (
            cols <= rows + diag_offset + window_right
        )
        x = tl.where(visible, x, float("-inf"))
    return x, t


@triton.jit
def _key_ranges(
    m0,            # first query row of the tile
    seqlen_k,
    diag_offset,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key range [lo, hi) some row of the tile sees, and its BLOCK_N-aligned part
    [full_lo, full_hi) that every row sees whole (run without the visibility mask)."""
    lo = tl.maximum(m0 + diag_offset - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(m0 + BLOCK_M + diag_offset + window_right, seqlen_k), lo)
    full_lo = (tl.maximum(m0 + BLOCK_M - 1 + diag_offset - window_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(m0 + diag_offset + window_right + 1, seqlen_k), 0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(
    n0,            # first key column of the tile
    seqlen_q,
    seqlen_k,
    diag_offset,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Query range [lo, hi) that sees some key of the tile, and its BLOCK_M-aligned part
    [full_lo, full_hi) that sees every key of the tile (none if the tile passes seqlen_k)."""
    lo = tl.maximum(n0 - diag_offset - window_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.maximum(tl.minimum(n0 + BLOCK_N - diag_offset + window_left, seqlen_q), lo)
    full_lo = (tl.maximum(n0 + BLOCK_N - 1 - diag_offset - window_right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(n0 - diag_offset + window_left + 1, seqlen_q), 0) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(full_hi, full_lo)
    partial = n0 + BLOCK_N > seqlen_k
    full_lo = tl.where(partial, hi, full_lo)
    full_hi = tl.where(partial, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence_span(
    CuSeqlens,     # (batch + 1,) int32 cumulative lengths of packed sequences
    b,             # sequence index
):
    """(first row as int64, length) of packed sequence b."""
    start = tl.load(CuSeqlens + b)
    return start.to(tl.int64), tl.load(CuSeqlens + b + 1) - start


@triton.jit
def _head_slope(
    Slopes,        # ALiBi slopes (heads,) or (batch, heads)
    b,             # batch index
    h,             # query head
    stride_sb,
    stride_sh,
    HAS_ALIBI: tl.constexpr,
):
    """slope_bh as fp32 (0 without ALiBi)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_sb + h * stride_sh).to(tl.float32)
    return slope


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i,             # running output (BLOCK_M, BLOCK_DV) fp32, sum and max (BLOCK_M,) fp32
    q,                         # (BLOCK_M, BLOCK_D) query tile
    K, V,                      # k[b, kv_head], v[b, kv_head] base pointers
    stride_kn, stride_kk, stride_vn, stride_vk,
    Bias, stride_bm, stride_bn,  # bias of (b, h) and its row/column strides
    offs_m, offs_d, offs_dv,
    start_n, end_n,            # key range, start_n a multiple of BLOCK_N
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_t = _load_strided(K, offs_d, stride_kk, D, offs_n, stride_kn, seqlen_k,
                         D != BLOCK_D, MASKED)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        x, _ = _scores(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                       window_left, window_right, sm_scale, softcap, slope, Bias, stride_bm,
                       stride_bn, MASKED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: exp2 -> 0
        p = tl.math.exp2(x - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_offset, bh, offs_m, start, dropout_p, BLOCK_N), p, 0.0)
        v = _load_strided(V, offs_n, stride_vn, seqlen_k, offs_dv, stride_vk, DV,
                       MASKED, DV != BLOCK_DV)  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_FWD_NO_SPECIALIZE, do_not_specialize_on_alignment=_GROUP_ALIGNMENT_ONLY)
def _attention_fwd_kernel(
    Q,             # (batch, heads, seqlen_q, D)
    K,             # (batch, kv_heads, seqlen_k, D)
    V,             # (batch, kv_heads, seqlen_k, DV)
    Bias,          # float bias or bool mask (as uint8), broadcast to (batch, heads, seqlen_q, seqlen_k) by 0 strides
    Slopes,        # ALiBi slopes (heads,) or (batch, heads)
    RngState,      # (2,) int64 dropout Philox key and counter offset (if HAS_DROPOUT)
    Out,           # (batch, heads, seqlen_q, DV) output
    Lse,           # (batch, heads, seqlen_q) fp32 output, natural log
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_lb, stride_lh, stride_lm,
    heads,         # query heads
    group,         # heads // kv_heads
    seqlen_q,
    seqlen_k,
    diag_offset,   # seqlen_k - seqlen_q (bottom-right) or 0 (top-left)
    window_left,   # >= seqlen_q + seqlen_k when unbounded
    window_right,  # likewise; 0 = causal
    sm_scale,      # softmax scale
    softcap,       # > 0 when HAS_SOFTCAP
    dropout_p,     # drop probability
    seqlen_bucket,  # autotune key only
    causal,        # 1 when causal: autotune key only
    D: tl.constexpr,          # head_dim of q, k
    DV: tl.constexpr,         # head_dim of v
    BLOCK_D: tl.constexpr,    # D padded to a power of two >= 16
    BLOCK_DV: tl.constexpr,   # DV padded likewise
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,  # softcap's tanh is tanh.approx.f32 (16-bit inputs on a GPU)
    HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr,  # 0 none, 1 float bias, 2 bool mask
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CuSeqlensQ=None,  # (batch + 1,) int32 cumulative query lengths (IS_VARLEN)
    CuSeqlensK=None,  # (batch + 1,) int32 cumulative key lengths (IS_VARLEN)
    IS_VARLEN: tl.constexpr = False,  # packed sequences: b indexes cu_seqlens, seqlen_q/k are the maxima
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // group
    if IS_VARLEN:
        q_start, seqlen_q = _sequence_span(CuSeqlensQ, b)
        k_start, seqlen_k = _sequence_span(CuSeqlensK, b)
        if pid_m * BLOCK_M >= seqlen_q:
            return
        diag_offset = seqlen_k - seqlen_q
        Q += q_start * stride_qm
        K += k_start * stride_kn
        V += k_start * stride_vn
        Out += q_start * stride_om
        Lse += q_start * stride_lm
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    Bias += b.to(tl.int64) * stride_biasb + h.to(tl.int64) * stride_biash
    slope = _head_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
    seed, rng_offset = _rng_state(RngState, HAS_DROPOUT)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_strided(Q, offs_m, stride_qm, seqlen_q, offs_d, stride_qk, D, True, D != BLOCK_D)  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bh = b * heads + h
    lo, full_lo, full_hi, hi = _key_ranges(m0, seqlen_k, diag_offset, window_left, window_right,
                                           BLOCK_M, BLOCK_N)
    # left edge of the window, the tiles every row sees whole, then the diagonal / end edge
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kk, stride_vn, stride_vk, Bias, stride_biasm,
        stride_biasn, offs_m, offs_d, offs_dv, lo, full_lo, seqlen_q, seqlen_k, diag_offset,
        window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p, D, DV,
        BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND, HAS_DROPOUT,
        DOT_PRECISION)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kk, stride_vn, stride_vk, Bias, stride_biasm,
        stride_biasn, offs_m, offs_d, offs_dv, full_lo, full_hi, seqlen_q, seqlen_k, diag_offset,
        window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p, D, DV,
        BLOCK_N, BLOCK_D, BLOCK_DV, False, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND, HAS_DROPOUT,
        DOT_PRECISION)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kk, stride_vn, stride_vk, Bias, stride_biasm,
        stride_biasn, offs_m, offs_d, offs_dv, full_hi, hi, seqlen_q, seqlen_k, diag_offset,
        window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p, D, DV,
        BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND, HAS_DROPOUT,
        DOT_PRECISION)

    empty = l_i == 0.0  # fully masked row: out 0, lse -inf
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(_tile_ptrs(Out, offs_m, stride_om, offs_dv, stride_ok), out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < DV))
    Lse += b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    tl.store(Lse + offs_m.to(tl.int64) * stride_lm, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=_PREPROCESS_NO_SPECIALIZE)
def _attention_bwd_preprocess_kernel(
    Out,           # (batch, heads, seqlen_q, DV) forward output
    dOut,          # (batch, heads, seqlen_q, DV) its gradient (any strides, 0 included)
    Lse,           # (batch, heads, seqlen_q) fp32 forward logsumexp
    dLse,          # (batch, heads, seqlen_q) gradient of lse (if HAS_DLSE)
    Delta,         # (batch * heads, seqlen_q) fp32 output: rowsum(dO ∘ O) - dlse
    Lse2,          # (batch * heads, seqlen_q) fp32 output: lse·log2e, +inf for fully masked rows
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_lb, stride_lh, stride_lm,
    stride_dlb, stride_dlh, stride_dlm,
    heads,
    seqlen_q,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CuSeqlensQ=None,  # (batch + 1,) int32 cumulative query lengths (IS_VARLEN)
    total_q=0,        # rows of the packed q (IS_VARLEN)
    IS_VARLEN: tl.constexpr = False,  # packed sequences: b indexes cu_seqlens_q, seqlen_q is the maximum
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if IS_VARLEN:
        q_start, seqlen_q = _sequence_span(CuSeqlensQ, b)
        if pid_m * BLOCK_M >= seqlen_q:
            return
        Out += q_start * stride_om
        dOut += q_start * stride_dom
        Lse += q_start * stride_lm
        dLse += q_start * stride_dlm
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    dOut += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    o = _load_strided(Out, offs_m, stride_om, seqlen_q, offs_dv, stride_ok, DV, True, DV != BLOCK_DV)
    do = _load_strided(dOut, offs_m, stride_dom, seqlen_q, offs_dv, stride_dok, DV, True, DV != BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    in_bounds = offs_m < seqlen_q
    if HAS_DLSE:
        dlse = tl.load(dLse + b.to(tl.int64) * stride_dlb + h.to(tl.int64) * stride_dlh
                       + offs_m.to(tl.int64) * stride_dlm, mask=in_bounds, other=0.0)
        delta -= dlse.to(tl.float32)
    lse = tl.load(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m.to(tl.int64) * stride_lm,
                  mask=in_bounds, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    if IS_VARLEN:
        row = h.to(tl.int64) * total_q + q_start  # Delta, Lse2 are (heads, total_q)
    else:
        row = (b * heads + h).to(tl.int64) * seqlen_q
    tl.store(Delta + row + offs_m, delta, mask=in_bounds)
    tl.store(Lse2 + row + offs_m, lse2, mask=in_bounds)


@triton.jit
def _attention_bwd_dkdv_inner(
    dk, dv,                    # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) fp32 accumulators
    k, v,                      # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) key / value tiles
    Q, dO,                     # q[b, h], dout[b, h] base pointers
    stride_qm, stride_qk, stride_dom, stride_dok,
    Lse2, Delta,               # rows of (b, h) in the preprocess outputs
    Bias, stride_bm, stride_bn,
    n0, offs_n, offs_d, offs_dv,
    start_m, end_m,            # query range, start_m a multiple of BLOCK_M
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # tiles are transposed: (BLOCK_N keys, BLOCK_M queries)
    for start in range(start_m, end_m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_t = _load_strided(Q, offs_d, stride_qk, D, offs_m, stride_qm, seqlen_q,
                         D != BLOCK_D, MASKED)  # (BLOCK_D, BLOCK_M)
        kq = tl.dot(k, q_t, input_precision=DOT_PRECISION)
        x_t, t_t = _scores(kq, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, diag_offset,
                           window_left, window_right, sm_scale, softcap, slope, Bias, stride_bm,
                           stride_bn, MASKED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND)
        if MASKED:
            lse2 = tl.load(Lse2 + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            delta = tl.load(Delta + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse2 = tl.load(Lse2 + offs_m)
            delta = tl.load(Delta + offs_m)
        p_t = tl.math.exp2(x_t - lse2[None, :])
        do = _load_strided(dO, offs_m, stride_dom, seqlen_q, offs_dv, stride_dok, DV,
                        MASKED, DV != BLOCK_DV)  # (BLOCK_M, BLOCK_DV)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.trans(_dropout_keep(seed, rng_offset, bh, offs_m, n0, dropout_p, BLOCK_N))
            pd_t, dp_t = _dropout_scale(p_t, dp_t, keep_t, dropout_p)
        else:
            pd_t = p_t
        dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_BWD_NO_SPECIALIZE, do_not_specialize_on_alignment=_GROUP_ALIGNMENT_ONLY)
def _attention_bwd_dkdv_kernel(
    Q,             # (batch, heads, seqlen_q, D)
    K,             # (batch, kv_heads, seqlen_k, D)
    V,             # (batch, kv_heads, seqlen_k, DV)
    Bias,          # as in the forward
    Slopes,        # as in the forward
    RngState,      # as in the forward
    dO,            # (batch, heads, seqlen_q, DV) output gradient
    Lse2,          # (batch * heads, seqlen_q) fp32 from the preprocess
    Delta,         # (batch * heads, seqlen_q) fp32 from the preprocess
    dK,            # (batch, kv_heads, seqlen_k, D) output
    dV,            # (batch, kv_heads, seqlen_k, DV) output
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dkb, stride_dkh, stride_dkn, stride_dkk,
    stride_dvb, stride_dvh, stride_dvn, stride_dvk,
    heads, group, seqlen_q, seqlen_k, diag_offset, window_left, window_right,  # as in the forward kernel
    sm_scale, softcap, dropout_p,  # as in the forward kernel
    seqlen_bucket, causal,  # autotune keys only
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # as in the forward kernel
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CuSeqlensQ=None,  # (batch + 1,) int32 cumulative query lengths (IS_VARLEN)
    CuSeqlensK=None,  # (batch + 1,) int32 cumulative key lengths (IS_VARLEN)
    total_q=0,        # rows of the packed q (IS_VARLEN)
    IS_VARLEN: tl.constexpr = False,  # packed sequences: b indexes cu_seqlens, seqlen_q/k are the maxima
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    if IS_VARLEN:
        q_start, seqlen_q = _sequence_span(CuSeqlensQ, b)
        k_start, seqlen_k = _sequence_span(CuSeqlensK, b)
        if pid_n * BLOCK_N >= seqlen_k:
            return
        diag_offset = seqlen_k - seqlen_q
        Q += q_start * stride_qm
        dO += q_start * stride_dom
        K += k_start * stride_kn
        V += k_start * stride_vn
        dK += k_start * stride_dkn
        dV += k_start * stride_dvn
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    K += b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    k = _load_strided(K, offs_n, stride_kn, seqlen_k, offs_d, stride_kk, D, True, D != BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_strided(V, offs_n, stride_vn, seqlen_k, offs_dv, stride_vk, DV,
                      True, DV != BLOCK_DV)  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    seed, rng_offset = _rng_state(RngState, HAS_DROPOUT)
    lo, full_lo, full_hi, hi = _query_ranges(n0, seqlen_q, seqlen_k, diag_offset, window_left,
                                             window_right, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        h = kvh * group + g
        bh = b * heads + h
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        dOh = dO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        if IS_VARLEN:
            row = h.to(tl.int64) * total_q + q_start
        else:
            row = bh.to(tl.int64) * seqlen_q
        Lse2h = Lse2 + row
        Deltah = Delta + row
        Biash = Bias + b.to(tl.int64) * stride_biasb + h.to(tl.int64) * stride_biash
        slope = _head_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, Qh, dOh, stride_qm, stride_qk, stride_dom, stride_dok, Lse2h, Deltah, Biash,
            stride_biasm, stride_biasn, n0, offs_n, offs_d, offs_dv, lo, full_lo, seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p,
            D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND,
            HAS_DROPOUT, DOT_PRECISION)
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, Qh, dOh, stride_qm, stride_qk, stride_dom, stride_dok, Lse2h, Deltah, Biash,
            stride_biasm, stride_biasn, n0, offs_n, offs_d, offs_dv, full_lo, full_hi, seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p,
            D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND,
            HAS_DROPOUT, DOT_PRECISION)
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, Qh, dOh, stride_qm, stride_qk, stride_dom, stride_dok, Lse2h, Deltah, Biash,
            stride_biasm, stride_biasn, n0, offs_n, offs_d, offs_dv, full_hi, hi, seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p,
            D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND,
            HAS_DROPOUT, DOT_PRECISION)
    dk *= sm_scale
    dK += b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
    dV += b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
    rows = offs_n[:, None] < seqlen_k
    tl.store(_tile_ptrs(dK, offs_n, stride_dkn, offs_d, stride_dkk), dk.to(dK.dtype.element_ty),
             mask=rows & (offs_d[None, :] < D))
    tl.store(_tile_ptrs(dV, offs_n, stride_dvn, offs_dv, stride_dvk), dv.to(dV.dtype.element_ty),
             mask=rows & (offs_dv[None, :] < DV))


@triton.jit
def _attention_bwd_dq_inner(
    dq,                        # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do,                     # (BLOCK_M, BLOCK_D), (BLOCK_M, BLOCK_DV) tiles
    lse2, delta,               # (BLOCK_M,) fp32
    K, V,                      # k[b, kv_head], v[b, kv_head] base pointers
    stride_kn, stride_kk, stride_vn, stride_vk,
    Bias, stride_bm, stride_bn,
    offs_m, offs_d, offs_dv,
    start_n, end_n,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_t = _load_strided(K, offs_d, stride_kk, D, offs_n, stride_kn, seqlen_k,
                         D != BLOCK_D, MASKED)  # (BLOCK_D, BLOCK_N)
        v_t = _load_strided(V, offs_dv, stride_vk, DV, offs_n, stride_vn, seqlen_k,
                         DV != BLOCK_DV, MASKED)  # (BLOCK_DV, BLOCK_N)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        x, t = _scores(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                       window_left, window_right, sm_scale, softcap, slope, Bias, stride_bm,
                       stride_bn, MASKED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND)
        p = tl.math.exp2(x - lse2[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            _, dp = _dropout_scale(p, dp, _dropout_keep(seed, rng_offset, bh, offs_m, start, dropout_p, BLOCK_N),
                                   dropout_p)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_BWD_NO_SPECIALIZE, do_not_specialize_on_alignment=_GROUP_ALIGNMENT_ONLY)
def _attention_bwd_dq_kernel(
    Q,             # (batch, heads, seqlen_q, D)
    K,             # (batch, kv_heads, seqlen_k, D)
    V,             # (batch, kv_heads, seqlen_k, DV)
    Bias,          # as in the forward
    Slopes,        # as in the forward
    RngState,      # as in the forward
    dO,            # (batch, heads, seqlen_q, DV) output gradient
    Lse2,          # (batch * heads, seqlen_q) fp32 from the preprocess
    Delta,         # (batch * heads, seqlen_q) fp32 from the preprocess
    dQ,            # (batch, heads, seqlen_q, D) output
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dqb, stride_dqh, stride_dqm, stride_dqk,
    heads, group, seqlen_q, seqlen_k, diag_offset, window_left, window_right,  # as in the forward kernel
    sm_scale, softcap, dropout_p,  # as in the forward kernel
    seqlen_bucket, causal,  # autotune keys only
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # as in the forward kernel
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CuSeqlensQ=None,  # (batch + 1,) int32 cumulative query lengths (IS_VARLEN)
    CuSeqlensK=None,  # (batch + 1,) int32 cumulative key lengths (IS_VARLEN)
    total_q=0,        # rows of the packed q (IS_VARLEN)
    IS_VARLEN: tl.constexpr = False,  # packed sequences: b indexes cu_seqlens, seqlen_q/k are the maxima
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // group
    bh = b * heads + h
    if IS_VARLEN:
        q_start, seqlen_q = _sequence_span(CuSeqlensQ, b)
        k_start, seqlen_k = _sequence_span(CuSeqlensK, b)
        if pid_m * BLOCK_M >= seqlen_q:
            return
        diag_offset = seqlen_k - seqlen_q
        Q += q_start * stride_qm
        dO += q_start * stride_dom
        K += k_start * stride_kn
        V += k_start * stride_vn
        dQ += q_start * stride_dqm
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    dO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    K += b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    Bias += b.to(tl.int64) * stride_biasb + h.to(tl.int64) * stride_biash
    slope = _head_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
    seed, rng_offset = _rng_state(RngState, HAS_DROPOUT)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_strided(Q, offs_m, stride_qm, seqlen_q, offs_d, stride_qk, D, True, D != BLOCK_D)
    do = _load_strided(dO, offs_m, stride_dom, seqlen_q, offs_dv, stride_dok, DV, True, DV != BLOCK_DV)
    in_bounds = offs_m < seqlen_q
    if IS_VARLEN:
        row = h.to(tl.int64) * total_q + q_start
    else:
        row = bh.to(tl.int64) * seqlen_q
    lse2 = tl.load(Lse2 + row + offs_m, mask=in_bounds, other=float("inf"))
    delta = tl.load(Delta + row + offs_m, mask=in_bounds, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, seqlen_k, diag_offset, window_left, window_right,
                                           BLOCK_M, BLOCK_N)
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_kk, stride_vn, stride_vk, Bias, stride_biasm,
        stride_biasn, offs_m, offs_d, offs_dv, lo, full_lo, seqlen_q, seqlen_k, diag_offset,
        window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p, D, DV,
        BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND, HAS_DROPOUT,
        DOT_PRECISION)
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_kk, stride_vn, stride_vk, Bias, stride_biasm,
        stride_biasn, offs_m, offs_d, offs_dv, full_lo, full_hi, seqlen_q, seqlen_k, diag_offset,
        window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p, D, DV,
        BLOCK_N, BLOCK_D, BLOCK_DV, False, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND, HAS_DROPOUT,
        DOT_PRECISION)
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_kk, stride_vn, stride_vk, Bias, stride_biasm,
        stride_biasn, offs_m, offs_d, offs_dv, full_hi, hi, seqlen_q, seqlen_k, diag_offset,
        window_left, window_right, sm_scale, softcap, slope, seed, rng_offset, bh, dropout_p, D, DV,
        BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, BIAS_KIND, HAS_DROPOUT,
        DOT_PRECISION)
    dq *= sm_scale
    dQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(_tile_ptrs(dQ, offs_m, stride_dqm, offs_d, stride_dqk), dq.to(dQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=_DBIAS_NO_SPECIALIZE, do_not_specialize_on_alignment=_GROUP_ALIGNMENT_ONLY)
def _attention_bwd_dbias_kernel(
    Q,             # (batch, heads, seqlen_q, D)
    K,             # (batch, kv_heads, seqlen_k, D)
    V,             # (batch, kv_heads, seqlen_k, DV)
    Bias,          # float bias (batch|1, heads|1, seqlen_q|1, seqlen_k|1), 0 strides on size-1 dims
    Slopes,        # as in the forward
    RngState,      # as in the forward
    dO,            # (batch, heads, seqlen_q, DV) output gradient
    Lse2,          # (batch * heads, seqlen_q) fp32 from the preprocess
    Delta,         # (batch * heads, seqlen_q) fp32 from the preprocess
    dBias,         # output, the shape of Bias: dX summed over the dims where Bias has size 1
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    batch,         # batch of q
    heads, group, seqlen_q, seqlen_k, diag_offset, window_left, window_right,  # as in the forward kernel
    sm_scale, softcap, dropout_p,  # as in the forward kernel
    tiles_n,       # key tiles per program row (1 if SUM_N)
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # as in the forward kernel
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SUM_B: tl.constexpr,       # Bias has batch 1: sum over batches
    SUM_H: tl.constexpr,       # Bias has heads 1: sum over heads
    SUM_M: tl.constexpr,       # Bias has seqlen_q 1: sum over queries
    SUM_N: tl.constexpr,       # Bias has seqlen_k 1: sum over keys
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    tile_m = pid // tiles_n
    tile_n = pid % tiles_n
    b_lo, b_hi = pid_b, pid_b + 1
    if SUM_B:
        b_lo, b_hi = 0, batch
    h_lo, h_hi = pid_h, pid_h + 1
    if SUM_H:
        h_lo, h_hi = 0, heads
    m_lo, m_hi = tile_m, tile_m + 1
    if SUM_M:
        m_lo, m_hi = 0, tl.cdiv(seqlen_q, BLOCK_M)
    n_lo, n_hi = tile_n, tile_n + 1
    if SUM_N:
        n_lo, n_hi = 0, tl.cdiv(seqlen_k, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    seed, rng_offset = _rng_state(RngState, HAS_DROPOUT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b_it in range(b_lo, b_hi):
        b = tl.cast(b_it, tl.int64)
        for h_it in range(h_lo, h_hi):
            h = tl.cast(h_it, tl.int64)
            kvh = h // group
            bh = (b * heads + h).to(tl.int32)
            Qh = Q + b * stride_qb + h * stride_qh
            dOh = dO + b * stride_dob + h * stride_doh
            Kh = K + b * stride_kb + kvh * stride_kh
            Vh = V + b * stride_vb + kvh * stride_vh
            Biash = Bias + b * stride_biasb + h * stride_biash
            slope = _head_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
            for tm in range(m_lo, m_hi):
                offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)
                q = _load_strided(Qh, offs_m, stride_qm, seqlen_q, offs_d, stride_qk, D, True, D != BLOCK_D)
                do = _load_strided(dOh, offs_m, stride_dom, seqlen_q, offs_dv, stride_dok, DV, True, DV != BLOCK_DV)
                in_bounds = offs_m < seqlen_q
                lse2 = tl.load(Lse2 + bh.to(tl.int64) * seqlen_q + offs_m, mask=in_bounds, other=float("inf"))
                delta = tl.load(Delta + bh.to(tl.int64) * seqlen_q + offs_m, mask=in_bounds, other=0.0)
                for tn in range(n_lo, n_hi):
                    n0 = tn * BLOCK_N
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    k_t = _load_strided(Kh, offs_d, stride_kk, D, offs_n, stride_kn, seqlen_k, D != BLOCK_D, True)
                    v_t = _load_strided(Vh, offs_dv, stride_vk, DV, offs_n, stride_vn, seqlen_k, DV != BLOCK_DV, True)
                    qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
                    x, _ = _scores(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                                   window_left, window_right, sm_scale, softcap, slope, Biash,
                                   stride_biasm, stride_biasn, True, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, 1)
                    p = tl.math.exp2(x - lse2[:, None])
                    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
                    if HAS_DROPOUT:
                        _, dp = _dropout_scale(
                            p, dp, _dropout_keep(seed, rng_offset, bh, offs_m, n0, dropout_p, BLOCK_N), dropout_p)
                    acc += p * (dp - delta[:, None])
    dBias += pid_b.to(tl.int64) * stride_dbb + pid_h.to(tl.int64) * stride_dbh
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SUM_M:
        if SUM_N:
            tl.store(dBias, tl.sum(tl.sum(acc, 1), 0).to(dBias.dtype.element_ty))
        else:
            tl.store(dBias + offs_n.to(tl.int64) * stride_dbn, tl.sum(acc, 0).to(dBias.dtype.element_ty),
                     mask=offs_n < seqlen_k)
    else:
        if SUM_N:
            tl.store(dBias + offs_m.to(tl.int64) * stride_dbm, tl.sum(acc, 1).to(dBias.dtype.element_ty),
                     mask=offs_m < seqlen_q)
        else:
            tl.store(_tile_ptrs(dBias, offs_m, stride_dbm, offs_n, stride_dbn), acc.to(dBias.dtype.element_ty),
                     mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


@triton.jit(do_not_specialize=_MASK_NO_SPECIALIZE)
def _attention_dropout_mask_kernel(
    Keep,          # (batch, heads, seqlen_q, seqlen_k) uint8 output, contiguous
    RngState,      # as in the forward
    heads,
    seqlen_q,
    seqlen_k,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The forward's keep-mask, materialised (for tests). Grid (batch·heads, query tiles,
    key tiles): batch·heads on the axis that takes 2^31 - 1 programs."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seed, rng_offset = _rng_state(RngState, True)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, rng_offset, bh, offs_m, n0, dropout_p, BLOCK_N)
    ptrs = _tile_ptrs(Keep + bh.to(tl.int64) * seqlen_q * seqlen_k, offs_m, seqlen_k, offs_n, 1)
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


# ----------------------------------------------------------------------------- launchers
#
# Each launch takes its config from kernels/_config.py (attention_launch_config: a pinned
# config, the interpreter's, or the default table's entry for the tensors' GPU) and runs
# kernel[grid](..., **config); with FASTATTN_AUTOTUNE=1 the forward, dK/dV and dQ
# kernels run through Triton's autotuner instead, over at most 8 configs per key.

_AUTOTUNED: dict = {}  # kind -> autotuned kernel, built on first use (FASTATTN_AUTOTUNE=1 only)


def _kernel_and_config(kind: str, kernel, args: dict):
    """(kernel, launch config) of one launch of `kernel`, a kernel of `kind`: the plain
    kernel and its config, or the autotuned kernel and no config."""
    q = args["Q"]
    config = _config.attention_launch_config(kind, q.device, q.dtype, max(args["D"], args["DV"]),
                                             bool(args.get("causal", 0)), _config.attention_bias_and_dropout(args))
    if config is not None:
        return kernel, config
    if kind not in _AUTOTUNED:
        _AUTOTUNED[kind] = triton.autotune(
            configs=_config.attention_configs(kind),
            key=list(_config.ATTENTION_TUNE_KEY),
            prune_configs_by={"early_config_prune": _config.attention_prune(kind)},
            cache_results=True,
        )(kernel)
    return _AUTOTUNED[kind], {}


def _strides_or_zero(t: torch.Tensor) -> list[int]:
    """Strides with 0 on size-1 dims (how a broadcast operand is walked)."""
    return [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]


def _check_rng_state(rng_state, device) -> torch.Tensor:
    """The (2,) int64 dropout state (Philox key, counter offset) on `device`."""
    if (not isinstance(rng_state, torch.Tensor) or rng_state.shape != (2,) or rng_state.dtype != torch.int64
            or rng_state.device != torch.device(device)):
        got = (f"shape {tuple(rng_state.shape)}, {rng_state.dtype} on {rng_state.device}"
               if isinstance(rng_state, torch.Tensor) else type(rng_state).__name__)
        raise ValueError(f"rng_seed must be a (2,) int64 tensor (Philox key, counter offset) on {device} "
                         f"when dropout_p > 0; got {got}")
    return rng_state


def _common_args(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                 top_left, softcap, dropout_p) -> dict:
    """The kernel arguments the forward and backward kernels share (the autotune keys included)."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    unbounded = seqlen_q + seqlen_k  # a window at least this wide constrains nothing
    if attn_bias is None:
        bias, bias_kind, bias_strides = q, _NO_BIAS, [0, 0, 0, 0]
    elif attn_bias.dtype == torch.bool:
        bias, bias_kind, bias_strides = attn_bias.view(torch.uint8), _BOOL_MASK, _strides_or_zero(attn_bias)
    else:
        bias, bias_kind, bias_strides = attn_bias, _FLOAT_BIAS, _strides_or_zero(attn_bias)
    if alibi_slopes is None:
        slopes, slope_strides = q, [0, 0]
    elif alibi_slopes.dim() == 1:
        slopes, slope_strides = alibi_slopes, [0, alibi_slopes.stride(0)]
    else:
        slopes, slope_strides = alibi_slopes, _strides_or_zero(alibi_slopes)
    return dict(
        Q=q, K=k, V=v, Bias=bias, Slopes=slopes,
        RngState=_check_rng_state(rng_seed, q.device) if dropout_p > 0 else q,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2), stride_qk=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kk=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vk=v.stride(3),
        stride_biasb=bias_strides[0], stride_biash=bias_strides[1], stride_biasm=bias_strides[2],
        stride_biasn=bias_strides[3], stride_sb=slope_strides[0], stride_sh=slope_strides[1],
        heads=heads, group=heads // kv_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        diag_offset=0 if top_left else seqlen_k - seqlen_q,
        window_left=unbounded if window_left < 0 else min(window_left, unbounded),
        window_right=unbounded if window_right < 0 else min(window_right, unbounded),
        sm_scale=float(scale), softcap=float(softcap), dropout_p=float(dropout_p),
        seqlen_bucket=_config.attention_seqlen_bucket(seqlen_q, seqlen_k),
        causal=int(window_left < 0 and window_right == 0),
        D=head_dim, DV=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        HAS_SOFTCAP=softcap > 0, FAST_TANH=fast_softcap_tanh(softcap, q.dtype),
        HAS_ALIBI=alibi_slopes is not None, BIAS_KIND=bias_kind,
        HAS_DROPOUT=dropout_p > 0, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


@_config.on_tensor_device
def attention_forward(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                      top_left, softcap, dropout_p):
    """out (batch, heads, seqlen_q, head_dim_v) and lse (batch, heads, seqlen_q) fp32.

    q (batch, heads, seqlen_q, head_dim), k/v (batch, kv_heads, seqlen_k, head_dim[_v]),
    any strides; attn_bias 4-D broadcastable to (batch, heads, seqlen_q, seqlen_k);
    alibi_slopes (heads,) or (batch, heads); rng_seed, when dropout_p > 0, a (2,) int64
    tensor (Philox key, counter offset) on q's device, read by the kernels.
    """
    batch, heads, seqlen_q, _ = q.shape
    out = q.new_empty(batch, heads, seqlen_q, v.shape[-1])
    lse = q.new_empty(batch, heads, seqlen_q, dtype=torch.float32)
    if out.numel() == 0 or k.shape[2] == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    args = _common_args(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                        top_left, softcap, dropout_p)
    kernel, config = _kernel_and_config("fwd", _attention_fwd_kernel, args)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    kernel[grid](
        Out=out, Lse=lse,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2), stride_ok=out.stride(3),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_lm=lse.stride(2),
        **args, **config,
    )
    return out, lse


@_config.on_tensor_device
def attention_backward(dout, dlse, q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed, scale,
                       window_left, window_right, top_left, softcap, dropout_p, bias_needs_grad):
    """(dq, dk, dv, dbias) shaped like (q, k, v, attn_bias); dbias is a 0-element
    placeholder unless bias_needs_grad. dlse (batch, heads, seqlen_q) or None."""
    batch, heads, seqlen_q, _ = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))  # contiguous, as the fake op says
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_needs_grad else q.new_empty(0)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        for grad in (dq, dk, dv, dbias):
            grad.zero_()
        return dq, dk, dv, dbias
    dout = dout.to(q.dtype)
    args = _common_args(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                        top_left, softcap, dropout_p)
    grad_strides = dict(stride_dob=dout.stride(0), stride_doh=dout.stride(1), stride_dom=dout.stride(2),
                        stride_dok=dout.stride(3))

    delta = torch.empty(batch * heads, seqlen_q, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    has_dlse = dlse is not None
    dlse_strides = dlse.stride() if has_dlse else (0, 0, 0)
    kernel, config = _kernel_and_config("bwd_preprocess", _attention_bwd_preprocess_kernel, args)
    kernel[(triton.cdiv(seqlen_q, config["BLOCK_M"]), heads, batch)](
        Out=out, dOut=dout, Lse=lse, dLse=dlse if has_dlse else lse, Delta=delta, Lse2=lse2,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2), stride_ok=out.stride(3),
        **grad_strides,
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_lm=lse.stride(2),
        stride_dlb=dlse_strides[0], stride_dlh=dlse_strides[1], stride_dlm=dlse_strides[2],
        heads=heads, seqlen_q=seqlen_q, DV=args["DV"], BLOCK_DV=args["BLOCK_DV"], HAS_DLSE=has_dlse,
        **config,
    )

    kernel, config = _kernel_and_config("dkdv", _attention_bwd_dkdv_kernel, args)
    grid = lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), kv_heads, batch)  # noqa: E731
    kernel[grid](
        dO=dout, Lse2=lse2, Delta=delta, dK=dk, dV=dv, **grad_strides,
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2), stride_dkk=dk.stride(3),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2), stride_dvk=dv.stride(3),
        **args, **config,
    )
    kernel, config = _kernel_and_config("dq", _attention_bwd_dq_kernel, args)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    kernel[grid](
        dO=dout, Lse2=lse2, Delta=delta, dQ=dq, **grad_strides,
        stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqm=dq.stride(2), stride_dqk=dq.stride(3),
        **args, **config,
    )
    if bias_needs_grad:
        _dbias(dbias, dout, lse2, delta, args, attn_bias, grad_strides)
    return dq, dk, dv, dbias


def _dbias(dbias, dout, lse2, delta, args, attn_bias, grad_strides):
    """dbias = dX summed over the broadcast dims of attn_bias, one program per output tile."""
    sum_b, sum_h, sum_m, sum_n = (size == 1 for size in attn_bias.shape)
    kernel, config = _kernel_and_config("dbias", _attention_bwd_dbias_kernel, args)
    tiles_m = 1 if sum_m else triton.cdiv(args["seqlen_q"], config["BLOCK_M"])
    tiles_n = 1 if sum_n else triton.cdiv(args["seqlen_k"], config["BLOCK_N"])
    batch = args["Q"].shape[0]
    exclude = ("seqlen_bucket", "causal", "BIAS_KIND")
    kernel[(tiles_m * tiles_n, attn_bias.shape[1], attn_bias.shape[0])](
        dO=dout, Lse2=lse2, Delta=delta, dBias=dbias, **grad_strides,
        stride_dbb=dbias.stride(0), stride_dbh=dbias.stride(1), stride_dbm=dbias.stride(2),
        stride_dbn=dbias.stride(3), batch=batch, tiles_n=tiles_n,
        **{name: value for name, value in args.items() if name not in exclude},
        SUM_B=sum_b, SUM_H=sum_h, SUM_M=sum_m, SUM_N=sum_n, **config,
    )


@_config.on_tensor_device
def dropout_keep_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      rng_seed: torch.Tensor, device) -> torch.Tensor:
    """The keep-mask (batch, heads, seqlen_q, seqlen_k) bool, True = kept, that the kernels
    draw for `rng_seed` (a (2,) int64 tensor: Philox key, counter offset), for comparing
    with reference.attention(dropout_mask=...)."""
    keep = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.uint8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    rng_state = _check_rng_state(rng_seed.to(keep.device), keep.device)
    config = _config.attention_launch_config("dropout_mask", keep.device)
    grid = (batch * heads, triton.cdiv(seqlen_q, config["BLOCK_M"]), triton.cdiv(seqlen_k, config["BLOCK_N"]))
    _attention_dropout_mask_kernel[grid](Keep=keep, RngState=rng_state, heads=heads, seqlen_q=seqlen_q,
                                         seqlen_k=seqlen_k, dropout_p=float(dropout_p), **config)
    return keep.bool()


# ----------------------------------------------------------------------------- varlen launchers


def _packed_as_batch(t: torch.Tensor) -> torch.Tensor:
    """(total, heads, d) -> a (1, heads, total, d) view (no copy)."""
    return t.unsqueeze(0).transpose(1, 2)


def _varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, rng_seed,
                 scale, window_left, window_right, softcap, dropout_p) -> dict:
    """The dense kernels' shared arguments for packed sequences: batch strides 0,
    seqlen_q/k the longest sequences (grid, tuning), cu_seqlens and IS_VARLEN."""
    args = _common_args(_packed_as_batch(q), _packed_as_batch(k), _packed_as_batch(v), None, alibi_slopes,
                        rng_seed, scale, window_left, window_right, False, softcap, dropout_p)
    args.update(stride_qb=0, stride_kb=0, stride_vb=0, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k,
                diag_offset=0, seqlen_bucket=_config.attention_seqlen_bucket(max_seqlen_q, max_seqlen_k),
                CuSeqlensQ=cu_seqlens_q, CuSeqlensK=cu_seqlens_k, IS_VARLEN=True)
    return args


@_config.on_tensor_device
def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                             rng_seed, scale, window_left, window_right, softcap, dropout_p):
    """out (total_q, heads, head_dim_v) and lse (heads, total_q) fp32 of packed sequences.

    q (total_q, heads, head_dim), k/v (total_k, kv_heads, head_dim[_v]), any strides;
    cu_seqlens_q/k (batch + 1,) int32; max_seqlen_q/k at least the longest sequence;
    alibi_slopes (heads,) or (batch, heads); causal and windows bottom-right per sequence.
    Reads nothing back from the device: the grid comes from max_seqlen_q/k.
    """
    batch = cu_seqlens_q.shape[0] - 1
    total_q, heads = q.shape[0], q.shape[1]
    out = q.new_empty(total_q, heads, v.shape[-1])
    lse = q.new_empty(heads, total_q, dtype=torch.float32)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0 or k.shape[0] == 0 or max_seqlen_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    args = _varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                        rng_seed, scale, window_left, window_right, softcap, dropout_p)
    out4 = _packed_as_batch(out)
    kernel, config = _kernel_and_config("fwd", _attention_fwd_kernel, args)
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    kernel[grid](
        Out=out4, Lse=lse,
        stride_ob=0, stride_oh=out4.stride(1), stride_om=out4.stride(2), stride_ok=out4.stride(3),
        stride_lb=0, stride_lh=lse.stride(0), stride_lm=lse.stride(1),
        **args, **config,
    )
    return out, lse


@_config.on_tensor_device
def varlen_attention_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, alibi_slopes, rng_seed, scale, window_left, window_right, softcap,
                              dropout_p):
    """(dq, dk, dv) shaped like (q, k, v) for packed sequences; dlse (heads, total_q) or None."""
    batch = cu_seqlens_q.shape[0] - 1
    total_q, heads = q.shape[0], q.shape[1]
    kv_heads = k.shape[1]
    dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))  # contiguous, as the fake op says
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        for grad in (dq, dk, dv):
            grad.zero_()
        return dq, dk, dv
    dout4 = _packed_as_batch(dout.to(q.dtype))
    args = _varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                        rng_seed, scale, window_left, window_right, softcap, dropout_p)
    varlen = dict(CuSeqlensQ=cu_seqlens_q, total_q=total_q, IS_VARLEN=True)
    grad_strides = dict(stride_dob=0, stride_doh=dout4.stride(1), stride_dom=dout4.stride(2),
                        stride_dok=dout4.stride(3))

    delta = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    has_dlse = dlse is not None
    out4 = _packed_as_batch(out)
    kernel, config = _kernel_and_config("bwd_preprocess", _attention_bwd_preprocess_kernel, args)
    kernel[(triton.cdiv(max_seqlen_q, config["BLOCK_M"]), heads, batch)](
        Out=out4, dOut=dout4, Lse=lse, dLse=dlse if has_dlse else lse, Delta=delta, Lse2=lse2,
        stride_ob=0, stride_oh=out4.stride(1), stride_om=out4.stride(2), stride_ok=out4.stride(3),
        **grad_strides,
        stride_lb=0, stride_lh=lse.stride(0), stride_lm=lse.stride(1),
        stride_dlb=0, stride_dlh=dlse.stride(0) if has_dlse else 0, stride_dlm=dlse.stride(1) if has_dlse else 0,
        heads=heads, seqlen_q=max_seqlen_q, DV=args["DV"], BLOCK_DV=args["BLOCK_DV"], HAS_DLSE=has_dlse,
        **varlen, **config,
    )

    dk4, dv4, dq4 = _packed_as_batch(dk), _packed_as_batch(dv), _packed_as_batch(dq)
    kernel, config = _kernel_and_config("dkdv", _attention_bwd_dkdv_kernel, args)
    grid = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), kv_heads, batch)  # noqa: E731
    kernel[grid](
        dO=dout4, Lse2=lse2, Delta=delta, dK=dk4, dV=dv4, **grad_strides,
        stride_dkb=0, stride_dkh=dk4.stride(1), stride_dkn=dk4.stride(2), stride_dkk=dk4.stride(3),
        stride_dvb=0, stride_dvh=dv4.stride(1), stride_dvn=dv4.stride(2), stride_dvk=dv4.stride(3),
        total_q=total_q, **args, **config,
    )
    kernel, config = _kernel_and_config("dq", _attention_bwd_dq_kernel, args)
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    kernel[grid](
        dO=dout4, Lse2=lse2, Delta=delta, dQ=dq4, **grad_strides,
        stride_dqb=0, stride_dqh=dq4.stride(1), stride_dqm=dq4.stride(2), stride_dqk=dq4.stride(3),
        total_q=total_q, **args, **config,
    )
    return dq, dk, dv
