"""Triton kernels of the feed-forward block: GEMMs whose epilogues add the bias and apply
the activation, so each hidden activation is written to memory once.

Notation: tokens x (M, d); nn.Linear weights W1 (h, d), b1 (h,), W2 (n, h), b2 (n,);
gated weights W_g, W_u (h, d), W_d (n, h). act is gelu (exact erf), gelu_tanh, relu or
silu; ∘ is the elementwise product; Σ_m sums over tokens.

Plain FFN
  forward    H  = x·W1ᵀ + b1                    GEMM, epilogue + b1, act  -> A = act(H)
             y  = A·W2ᵀ + b2                    GEMM, epilogue + b2
  backward   dH = (dy·W2) ∘ act'(H)             GEMM, epilogue loads H, writes dH and A
             dW2 = dyᵀ·A     db2 = Σ_m dy       GEMM over tokens; bias grad = row sums of dyᵀ
             dW1 = dHᵀ·x     db1 = Σ_m dH       (same kernel)
             dx  = dH·W1
Gated FFN (SwiGLU: act = silu; GeGLU: act = gelu)
  forward    G = x·W_gᵀ, U = x·W_uᵀ             one kernel, two accumulators on the same x tiles
             P = act(G) ∘ U                     epilogue (G, U written only when saved)
             y = P·W_dᵀ
  backward   dP = dy·W_d                        GEMM, epilogue loads G, U and writes
             dG = dP ∘ U ∘ act'(G), dU = dP ∘ act(G), P
             dW_d = dyᵀ·P,  dW_g = dGᵀ·x,  dW_u = dUᵀ·x
             dx = dG·W_g + dU·W_u               one kernel, both products in one accumulator
Derivatives
  gelu       act'(z) = Φ(z) + z·φ(z),  Φ(z) = ½(1 + erf(z/√2)),  φ(z) = exp(-z²/2)/√(2π)
  gelu_tanh  t = tanh(c·(z + 0.044715·z³)), c = √(2/π)
             act(z) = ½z(1 + t),  act'(z) = ½(1 + t) + ½z(1 - t²)·c·(1 + 3·0.044715·z²)
  relu       act'(z) = 1 if z > 0 else 0
  silu       s = σ(z),  act(z) = z·s,  act'(z) = s·(1 + z·(1 - s))

When the forward did not save H (or G, U) -- recompute=True -- the backward first
recomputes them with the forward kernel, and the dact/dgated epilogue then writes dH
(dG, dU) over the recomputed buffers. Operands stay in the input dtype; accumulators
and the epilogue math are fp32, cast once at the store; bias gradients are fp32 row sums
taken by one program per row block (deterministic, no atomics). fp32 inputs use tf32 in
tl.dot only when torch allows tf32 for matmuls.

Every GEMM here is C (M, N) = A (M, K) · B (K, N) with A and B given by strides, so a
transposed operand (Wᵀ, dyᵀ) is read in place. Tiles are visited in groups of GROUP_M
tile rows so that the B tiles of a group stay in L2.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _config

# The token count is never specialised (Triton would compile a variant for 1, one for
# multiples of 16 and one for the rest): it is M here and K in the weight-gradient
# kernel. The feature counts and the strides stay specialised: they are fixed per model,
# and a feature count that is a multiple of 16 lets the masked loads along it stay
# vectorised, which the pipeliner needs for asynchronous copies (an unspecialised K
# leaves the mainloop of the sm_90 GEMM without cp.async).
_RUNTIME_SIZES = ["M", "TUNE_KEY"]

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile_coords(
    M,  # rows of C
    N,  # columns of C
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,  # tile rows per group (L2 reuse of the B tiles)
):
    """(pid_m, pid_n) of this program: tiles run down GROUP_M tile rows, then across."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    group_first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - group_first_m, GROUP_M)
    in_group = pid % tiles_per_group
    return group_first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def _times(
    n: tl.constexpr,  # a tile size
    stride,  # a runtime stride (or a stride of 1 that Triton specialised)
):
    """n · stride in int64: a pointer step that may pass 2³¹ elements."""
    return tl.full((), n, tl.int64) * stride


@triton.jit
def _mm_loop(
    acc,  # (BLOCK_M, BLOCK_N) fp32 accumulator, returned with A·B added
    row_sum,  # (BLOCK_M,) fp32, returned with the row sums of A over K added if ROW_SUM (else as given)
    A,  # (M, K) left operand
    stride_am,
    stride_ak,
    B,  # (K, N) right operand
    stride_bk,
    stride_bn,
    offs_m,  # (BLOCK_M,) rows of this tile
    offs_n,  # (BLOCK_N,) columns of this tile
    M,
    N,
    K,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee" (only matters for fp32 operands)
    ROW_SUM: tl.constexpr,  # also sum the A tiles it loads along K (the bias gradient)
):
    offs_k = tl.arange(0, BLOCK_K)
    k64 = offs_k.to(tl.int64)
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + k64[None, :] * stride_ak
    b_ptrs = B + k64[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    step_a = _times(BLOCK_K, stride_ak)
    step_b = _times(BLOCK_K, stride_bk)
    rows_ok = offs_m[:, None] < M
    cols_ok = offs_n[None, :] < N
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rows_ok & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & cols_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc, row_sum


@triton.jit
def _mm_loop_two_b(
    acc1,  # (BLOCK_M, BLOCK_N) fp32, returned with A·B1 added
    acc2,  # (BLOCK_M, BLOCK_N) fp32, returned with A·B2 added
    A,  # (M, K) shared left operand, each tile loaded once
    stride_am,
    stride_ak,
    B1,  # (K, N) first right operand
    stride_b1k,
    stride_b1n,
    B2,  # (K, N) second right operand
    stride_b2k,
    stride_b2n,
    offs_m,  # (BLOCK_M,) rows of this tile
    offs_n,  # (BLOCK_N,) columns of this tile
    M,
    N,
    K,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    k64 = offs_k.to(tl.int64)
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + k64[None, :] * stride_ak
    b1_ptrs = B1 + k64[:, None] * stride_b1k + offs_n[None, :].to(tl.int64) * stride_b1n
    b2_ptrs = B2 + k64[:, None] * stride_b2k + offs_n[None, :].to(tl.int64) * stride_b2n
    step_a = _times(BLOCK_K, stride_ak)
    step_b1 = _times(BLOCK_K, stride_b1k)
    step_b2 = _times(BLOCK_K, stride_b2k)
    rows_ok = offs_m[:, None] < M
    cols_ok = offs_n[None, :] < N
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rows_ok & (offs_k[None, :] < k_left), other=0.0)
        b_mask = (offs_k[:, None] < k_left) & cols_ok
        b1 = tl.load(b1_ptrs, mask=b_mask, other=0.0)
        b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
        acc1 = tl.dot(a, b1, acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
        a_ptrs += step_a
        b1_ptrs += step_b1
        b2_ptrs += step_b2
    return acc1, acc2


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _activation(
    z,  # fp32 pre-activation
    ACTIVATION: tl.constexpr,  # "gelu", "gelu_tanh", "relu", "silu" or "none"
):
    if ACTIVATION == "gelu":
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == "relu":
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == "silu":
        out = z * tl.sigmoid(z)
    else:
        out = z
    return out


@triton.jit
def _activation_and_grad(
    z,  # fp32 pre-activation
    ACTIVATION: tl.constexpr,  # "gelu", "gelu_tanh", "relu" or "silu"
):
    """(act(z), act'(z))."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        out = z * cdf
        grad = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * z * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == "relu":
        out = tl.maximum(z, 0.0)
        grad = tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(z)
        out = z * s
        grad = s * (1.0 + z * (1.0 - s))
    return out, grad


@triton.jit
def _tile_ptrs(
    C,  # (M, N) matrix
    stride_cm,
    stride_cn,
    offs_m,  # (BLOCK_M,)
    offs_n,  # (BLOCK_N,)
):
    return C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _ffn_fwd_kernel(
    A,  # (M, K) input rows: x, or act(H) for the second GEMM
    B,  # (K, N) Wᵀ, read through the nn.Linear weight's strides
    BIAS,  # (N,) bias; read only if HAS_BIAS
    OUT,  # (M, N) act(A·B + bias); written only if STORE_OUT
    PRE,  # (M, N) A·B + bias, the pre-activation; written only if STORE_PRE
    M,  # tokens
    N,  # output features
    K,  # input features
    TUNE_KEY,  # autotune key only: power-of-2 buckets of (M, N, K); unused
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_bias,
    stride_outm,
    stride_outn,
    stride_prem,
    stride_pren,
    ACTIVATION: tl.constexpr,  # "gelu", "gelu_tanh", "relu", "silu" or "none"
    HAS_BIAS: tl.constexpr,
    STORE_OUT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = _mm_loop(acc, 0.0, A, stride_am, stride_ak, B, stride_bk, stride_bn,
                      offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n.to(tl.int64) * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:
        pre_ptrs = _tile_ptrs(PRE, stride_prem, stride_pren, offs_m, offs_n)
        tl.store(pre_ptrs, acc.to(PRE.dtype.element_ty), mask=mask)
    if STORE_OUT:
        out = _activation(acc, ACTIVATION)
        out_ptrs = _tile_ptrs(OUT, stride_outm, stride_outn, offs_m, offs_n)
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _gated_ffn_fwd_kernel(
    X,  # (M, K) tokens
    B_GATE,  # (K, N) W_gateᵀ, read through the weight's strides
    B_UP,  # (K, N) W_upᵀ
    OUT,  # (M, N) act(G) ∘ U; written only if STORE_OUT
    GATE,  # (M, N) G = x·W_gateᵀ; written only if STORE_PRE
    UP,  # (M, N) U = x·W_upᵀ; written only if STORE_PRE
    M,  # tokens
    N,  # hidden features
    K,  # model features
    TUNE_KEY,  # autotune key only: power-of-2 buckets of (M, N, K); unused
    stride_xm,
    stride_xk,
    stride_gk,
    stride_gn,
    stride_uk,
    stride_un,
    stride_outm,
    stride_outn,
    stride_gatem,
    stride_gaten,
    stride_upm,
    stride_upn,
    ACTIVATION: tl.constexpr,  # "silu" (SwiGLU), "gelu" (GeGLU), "gelu_tanh", "relu"
    STORE_OUT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate, up = _mm_loop_two_b(gate, up, X, stride_xm, stride_xk, B_GATE, stride_gk, stride_gn,
                              B_UP, stride_uk, stride_un, offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:
        tl.store(_tile_ptrs(GATE, stride_gatem, stride_gaten, offs_m, offs_n),
                 gate.to(GATE.dtype.element_ty), mask=mask)
        tl.store(_tile_ptrs(UP, stride_upm, stride_upn, offs_m, offs_n), up.to(UP.dtype.element_ty), mask=mask)
    if STORE_OUT:
        out = _activation(gate, ACTIVATION) * up
        tl.store(_tile_ptrs(OUT, stride_outm, stride_outn, offs_m, offs_n), out.to(OUT.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _ffn_bwd_dact_kernel(
    DY,  # (M, K) gradient of y
    W,  # (K, N) W2 as stored, (d_out, d_hidden)
    PRE,  # (M, N) H, the hidden pre-activation
    DPRE,  # (M, N) out: dH = (dy·W2) ∘ act'(H)
    ACT,  # (M, N) out: act(H); written only if STORE_ACT
    M,  # tokens
    N,  # hidden features
    K,  # output features
    TUNE_KEY,  # autotune key only: power-of-2 buckets of (M, N, K); unused
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_prem,
    stride_pren,
    stride_dprem,
    stride_dpren,
    stride_actm,
    stride_actn,
    ACTIVATION: tl.constexpr,  # "gelu", "gelu_tanh", "relu", "silu"
    STORE_ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dact = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dact, _ = _mm_loop(dact, 0.0, DY, stride_dym, stride_dyk, W, stride_wk, stride_wn,
                       offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dact = dact.to(DPRE.dtype.element_ty)
    pre = tl.load(_tile_ptrs(PRE, stride_prem, stride_pren, offs_m, offs_n), mask=mask, other=0.0)
    act, act_grad = _activation_and_grad(pre.to(tl.float32), ACTIVATION)
    tl.debug_barrier()  # DPRE may be PRE (recompute): every thread has read its tile first
    tl.store(_tile_ptrs(DPRE, stride_dprem, stride_dpren, offs_m, offs_n),
             (dact.to(tl.float32) * act_grad).to(DPRE.dtype.element_ty), mask=mask)
    if STORE_ACT:
        tl.store(_tile_ptrs(ACT, stride_actm, stride_actn, offs_m, offs_n), act.to(ACT.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _gated_ffn_bwd_dgated_kernel(
    DY,  # (M, K) gradient of y
    W,  # (K, N) W_down as stored, (d_out, d_hidden)
    GATE,  # (M, N) G, the gate pre-activation
    UP,  # (M, N) U, the up projection
    DGATE,  # (M, N) out: dG = dP ∘ U ∘ act'(G), dP = dy·W_down
    DUP,  # (M, N) out: dU = dP ∘ act(G)
    PROD,  # (M, N) out: P = act(G) ∘ U; written only if STORE_PROD
    M,  # tokens
    N,  # hidden features
    K,  # output features
    TUNE_KEY,  # autotune key only: power-of-2 buckets of (M, N, K); unused
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_gatem,
    stride_gaten,
    stride_upm,
    stride_upn,
    stride_dgatem,
    stride_dgaten,
    stride_dupm,
    stride_dupn,
    stride_prodm,
    stride_prodn,
    ACTIVATION: tl.constexpr,
    STORE_PROD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dprod = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dprod, _ = _mm_loop(dprod, 0.0, DY, stride_dym, stride_dyk, W, stride_wk, stride_wn,
                        offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    dprod = dprod.to(DGATE.dtype.element_ty).to(tl.float32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    gate = tl.load(_tile_ptrs(GATE, stride_gatem, stride_gaten, offs_m, offs_n), mask=mask, other=0.0)
    up = tl.load(_tile_ptrs(UP, stride_upm, stride_upn, offs_m, offs_n), mask=mask, other=0.0).to(tl.float32)
    act, act_grad = _activation_and_grad(gate.to(tl.float32), ACTIVATION)
    tl.debug_barrier()  # DGATE, DUP may be GATE, UP (recompute): every thread has read its tiles first
    tl.store(_tile_ptrs(DGATE, stride_dgatem, stride_dgaten, offs_m, offs_n),
             (dprod * up * act_grad).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(_tile_ptrs(DUP, stride_dupm, stride_dupn, offs_m, offs_n), (dprod * act).to(DUP.dtype.element_ty),
             mask=mask)
    if STORE_PROD:
        tl.store(_tile_ptrs(PROD, stride_prodm, stride_prodn, offs_m, offs_n),
                 (act * up).to(PROD.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K", "TUNE_KEY"])
def _ffn_bwd_dw_kernel(
    A1,  # (M, K) dyᵀ or dHᵀ (or dGᵀ, dUᵀ), read in place: K = tokens
    B1,  # (K, N) act(H) or P, or x
    C,  # (M, N) out: the weight gradient A1·B1
    ROW_SUM,  # (M,) fp32 out: Σ_k A1[:, k], the bias gradient; written only if HAS_ROW_SUM
    M,  # output features of the weight
    N,  # input features of the weight
    K,  # tokens
    TUNE_KEY,  # autotune key only: power-of-2 buckets of (M, N, K); unused
    stride_a1m,
    stride_a1k,
    stride_b1k,
    stride_b1n,
    stride_cm,
    stride_cn,
    HAS_ROW_SUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_ROW_SUM:
        # the programs of the first tile column also sum the A1 rows they stream
        # through; the branch picks between two branch-free loops.
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if pid_n == 0:
            acc, row_sum = _mm_loop(acc, row_sum, A1, stride_a1m, stride_a1k, B1, stride_b1k, stride_b1n,
                                    offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, True)
            tl.store(ROW_SUM + offs_m, row_sum, mask=offs_m < M)
        else:
            acc, _ = _mm_loop(acc, 0.0, A1, stride_a1m, stride_a1k, B1, stride_b1k, stride_b1n,
                              offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    else:
        acc, _ = _mm_loop(acc, 0.0, A1, stride_a1m, stride_a1k, B1, stride_b1k, stride_b1n,
                          offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(_tile_ptrs(C, stride_cm, stride_cn, offs_m, offs_n), acc.to(C.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _ffn_bwd_dx_kernel(
    A1,  # (M, K) dH (or dG): M = tokens
    B1,  # (K, N) W1 (or W_gate) as stored, (d_hidden, d_model)
    A2,  # (M, K) second left operand, read only if DUAL (gated: dU)
    B2,  # (K, N) second right operand, read only if DUAL (gated: W_up)
    C,  # (M, N) out: dx = A1·B1 (+ A2·B2)
    M,  # tokens
    N,  # model features
    K,  # hidden features
    TUNE_KEY,  # autotune key only: power-of-2 buckets of (M, N, K); unused
    stride_a1m,
    stride_a1k,
    stride_b1k,
    stride_b1n,
    stride_a2m,
    stride_a2k,
    stride_b2k,
    stride_b2n,
    stride_cm,
    stride_cn,
    DUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = _mm_loop(acc, 0.0, A1, stride_a1m, stride_a1k, B1, stride_b1k, stride_b1n,
                      offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    if DUAL:
        acc, _ = _mm_loop(acc, 0.0, A2, stride_a2m, stride_a2k, B2, stride_b2k, stride_b2n,
                          offs_m, offs_n, M, N, K, BLOCK_K, DOT_PRECISION, False)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(_tile_ptrs(C, stride_cm, stride_cn, offs_m, offs_n), acc.to(C.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# launch name (the config class is _config.FFN_CONFIG_CLASS[name]) -> kernel
_KERNELS = {
    "fwd": _ffn_fwd_kernel,
    "out": _ffn_fwd_kernel,
    "gated_fwd": _gated_ffn_fwd_kernel,
    "dact": _ffn_bwd_dact_kernel,
    "dgated": _gated_ffn_bwd_dgated_kernel,
    "dw": _ffn_bwd_dw_kernel,
    "dx": _ffn_bwd_dx_kernel,
}
# outputs a kernel may write over one of its inputs (recompute: dH over H, dG and dU over
# G and U): the autotuner runs every config on the same buffers, so it restores them
# after each run
_WRITTEN_OVER_INPUTS = {"dact": ["DPRE"], "dgated": ["DGATE", "DUP"]}
_tuned: dict = {}


def _autotuned(name: str, family: str):
    """The autotuned wrapper of one kernel (FASTATTN_AUTOTUNE=1), built on first use."""
    if (name, family) not in _tuned:
        _tuned[name, family] = triton.autotune(
            configs=_config.ffn_configs(name, family),
            key=["TUNE_KEY"],
            prune_configs_by={"early_config_prune": _config.ffn_prune(name)},
            restore_value=_WRITTEN_OVER_INPUTS.get(name),
            cache_results=True,
        )(_KERNELS[name])
    return _tuned[name, family]


def _launch(name: str, M: int, N: int, **args) -> None:
    """Launch kernel `name` over the (M, N) output tiles with the config of
    _config.ffn_launch_config (the default of the operands' GPU, the pinned one, the
    interpreter's), or autotuned with FASTATTN_AUTOTUNE=1."""
    if M == 0 or N == 0:
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    operand = next(iter(args.values()))  # every launch passes its A operand first
    config = _config.ffn_launch_config(name, operand.device, operand.dtype, M)
    if config is None:
        family = _config.arch_family(_config.target_arch(operand.device))
        _autotuned(name, family)[grid](M=M, N=N, TUNE_KEY=_tune_key(M, N, args["K"]), **args)
    else:
        _KERNELS[name][grid](M=M, N=N, TUNE_KEY=0, **args, **config)


def _tune_key(M: int, N: int, K: int) -> int:
    """Calls whose M, N and K round up to the same powers of 2 share one tuned config
    (token counts vary from call to call; tuning each one would stall)."""
    return ((M - 1).bit_length() << 12) | ((N - 1).bit_length() << 6) | max(K - 1, 0).bit_length()


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use tf32 (the new fp32_precision API or the
    legacy allow_tf32 flag; torch refuses to read the legacy flag once both were set)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 and not tf32_allowed() else "tf32"


def _linear(a, w, bias, out, pre, activation: str) -> None:
    """out = act(a·wᵀ + bias) and/or pre = a·wᵀ + bias (either may be None)."""
    M, K = a.shape
    N = w.shape[0]
    dummy = out if out is not None else pre
    _launch(
        "out" if activation == "none" and pre is None else "fwd", M, N,
        A=a, B=w, BIAS=bias if bias is not None else dummy, OUT=dummy if out is None else out,
        PRE=dummy if pre is None else pre, K=K,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=w.stride(1), stride_bn=w.stride(0),
        stride_bias=bias.stride(0) if bias is not None else 0,
        stride_outm=dummy.stride(0) if out is None else out.stride(0),
        stride_outn=dummy.stride(1) if out is None else out.stride(1),
        stride_prem=dummy.stride(0) if pre is None else pre.stride(0),
        stride_pren=dummy.stride(1) if pre is None else pre.stride(1),
        ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_OUT=out is not None, STORE_PRE=pre is not None,
        DOT_PRECISION=_dot_precision(a.dtype),
    )


def _gated_linear(x, w_gate, w_up, out, gate, up, activation: str) -> None:
    """out = act(x·W_gateᵀ) ∘ x·W_upᵀ and/or gate, up = the two products."""
    M, K = x.shape
    N = w_gate.shape[0]
    dummy = out if out is not None else gate
    out_, gate_, up_ = (dummy if t is None else t for t in (out, gate, up))
    _launch(
        "gated_fwd", M, N,
        X=x, B_GATE=w_gate, B_UP=w_up, OUT=out_, GATE=gate_, UP=up_, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_gk=w_gate.stride(1), stride_gn=w_gate.stride(0),
        stride_uk=w_up.stride(1), stride_un=w_up.stride(0),
        stride_outm=out_.stride(0), stride_outn=out_.stride(1),
        stride_gatem=gate_.stride(0), stride_gaten=gate_.stride(1),
        stride_upm=up_.stride(0), stride_upn=up_.stride(1),
        ACTIVATION=activation, STORE_OUT=out is not None, STORE_PRE=gate is not None,
        DOT_PRECISION=_dot_precision(x.dtype),
    )


def _weight_grad(a, b, row_sum: bool = False):
    """a·b for a (M, K) and b (K, N) of any strides with K = tokens, and the fp32 row sums
    of a (or None)."""
    M, K = a.shape
    N = b.shape[1]
    c = a.new_empty(M, N)
    sums = torch.empty(M, dtype=torch.float32, device=a.device) if row_sum else None
    if K == 0 or N == 0:
        c.zero_()
        if sums is not None:
            torch.sum(a, dim=1, dtype=torch.float32, out=sums)
        return c, sums
    _launch(
        "dw", M, N,
        A1=a, B1=b, C=c, ROW_SUM=sums if row_sum else c, K=K,
        stride_a1m=a.stride(0), stride_a1k=a.stride(1), stride_b1k=b.stride(0), stride_b1n=b.stride(1),
        stride_cm=c.stride(0), stride_cn=c.stride(1),
        HAS_ROW_SUM=row_sum, DOT_PRECISION=_dot_precision(a.dtype),
    )
    return c, sums


def _input_grad(a1, b1, a2=None, b2=None):
    """a1·b1 (+ a2·b2) for (M, K)·(K, N) operands of any strides with M = tokens."""
    M, K = a1.shape
    N = b1.shape[1]
    c = a1.new_empty(M, N)
    if K == 0 or N == 0:
        return c.zero_()
    a2_, b2_ = (a1, b1) if a2 is None else (a2, b2)
    _launch(
        "dx", M, N,
        A1=a1, B1=b1, A2=a2_, B2=b2_, C=c, K=K,
        stride_a1m=a1.stride(0), stride_a1k=a1.stride(1), stride_b1k=b1.stride(0), stride_b1n=b1.stride(1),
        stride_a2m=a2_.stride(0), stride_a2k=a2_.stride(1), stride_b2k=b2_.stride(0), stride_b2n=b2_.stride(1),
        stride_cm=c.stride(0), stride_cn=c.stride(1),
        DUAL=a2 is not None, DOT_PRECISION=_dot_precision(a1.dtype),
    )
    return c


@_config.on_tensor_device
def ffn_forward(x, w1, b1, w2, b2, activation: str, save_hidden: bool):
    """y = act(x·W1ᵀ + b1)·W2ᵀ + b2 for x (M, d); returns (y, H or None)."""
    M = x.shape[0]
    hidden = x.new_empty(M, w1.shape[0])  # (M, h) act(H)
    pre = x.new_empty(M, w1.shape[0]) if save_hidden else None  # (M, h) H
    _linear(x, w1, b1, hidden, pre, activation)
    y = x.new_empty(M, w2.shape[0])  # (M, n)
    _linear(hidden, w2, b2, y, None, "none")
    return y, pre


@_config.on_tensor_device
def ffn_backward(dy, x, w1, b1, w2, b2, hidden_pre: Optional[torch.Tensor], activation: str):
    """(dx, dw1, db1 or None, dw2, db2 or None); hidden_pre None = recompute H."""
    M = x.shape[0]
    h = w1.shape[0]
    if hidden_pre is None:
        hidden_pre = x.new_empty(M, h)  # (M, h) H
        _linear(x, w1, b1, None, hidden_pre, activation)
        dpre = hidden_pre  # each program reads its H tile before writing dH over it
    else:
        dpre = x.new_empty(M, h)  # (M, h) dH
    hidden = x.new_empty(M, h)  # (M, h) act(H)
    if M > 0:
        _launch(
            "dact", M, h,
            DY=dy, W=w2, PRE=hidden_pre, DPRE=dpre, ACT=hidden, K=w2.shape[0],
            stride_dym=dy.stride(0), stride_dyk=dy.stride(1), stride_wk=w2.stride(0), stride_wn=w2.stride(1),
            stride_prem=hidden_pre.stride(0), stride_pren=hidden_pre.stride(1),
            stride_dprem=dpre.stride(0), stride_dpren=dpre.stride(1),
            stride_actm=hidden.stride(0), stride_actn=hidden.stride(1),
            ACTIVATION=activation, STORE_ACT=True, DOT_PRECISION=_dot_precision(x.dtype),
        )
    dw2, db2 = _weight_grad(dy.t(), hidden, row_sum=b2 is not None)  # (n, h), (n,)
    dw1, db1 = _weight_grad(dpre.t(), x, row_sum=b1 is not None)  # (h, d), (h,)
    dx = _input_grad(dpre, w1)  # (M, d)
    return (dx, dw1, None if db1 is None else db1.to(x.dtype), dw2, None if db2 is None else db2.to(x.dtype))


@_config.on_tensor_device
def gated_ffn_forward(x, w_gate, w_up, w_down, activation: str, save_hidden: bool):
    """y = (act(x·W_gateᵀ) ∘ x·W_upᵀ)·W_downᵀ for x (M, d); returns (y, G, U) with
    G, U None unless save_hidden."""
    M, h = x.shape[0], w_gate.shape[0]
    prod = x.new_empty(M, h)  # (M, h) P
    gate = x.new_empty(M, h) if save_hidden else None  # (M, h) G
    up = x.new_empty(M, h) if save_hidden else None  # (M, h) U
    _gated_linear(x, w_gate, w_up, prod, gate, up, activation)
    y = x.new_empty(M, w_down.shape[0])  # (M, n)
    _linear(prod, w_down, None, y, None, "none")
    return y, gate, up


@_config.on_tensor_device
def gated_ffn_backward(dy, x, w_gate, w_up, w_down, gate, up, activation: str):
    """(dx, dw_gate, dw_up, dw_down); gate, up None = recompute them."""
    M, h = x.shape[0], w_gate.shape[0]
    if gate is None or up is None:
        gate, up = x.new_empty(M, h), x.new_empty(M, h)  # (M, h) G, U
        _gated_linear(x, w_gate, w_up, None, gate, up, activation)
        dgate, dup = gate, up  # each program reads its G, U tiles before writing dG, dU over them
    else:
        dgate, dup = x.new_empty(M, h), x.new_empty(M, h)  # (M, h) dG, dU
    prod = x.new_empty(M, h)  # (M, h) P
    if M > 0:
        _launch(
            "dgated", M, h,
            DY=dy, W=w_down, GATE=gate, UP=up, DGATE=dgate, DUP=dup, PROD=prod, K=w_down.shape[0],
            stride_dym=dy.stride(0), stride_dyk=dy.stride(1),
            stride_wk=w_down.stride(0), stride_wn=w_down.stride(1),
            stride_gatem=gate.stride(0), stride_gaten=gate.stride(1), stride_upm=up.stride(0),
            stride_upn=up.stride(1), stride_dgatem=dgate.stride(0), stride_dgaten=dgate.stride(1),
            stride_dupm=dup.stride(0), stride_dupn=dup.stride(1), stride_prodm=prod.stride(0),
            stride_prodn=prod.stride(1),
            ACTIVATION=activation, STORE_PROD=True, DOT_PRECISION=_dot_precision(x.dtype),
        )
    dw_down, _ = _weight_grad(dy.t(), prod)  # (n, h)
    dw_gate, _ = _weight_grad(dgate.t(), x)  # (h, d)
    dw_up, _ = _weight_grad(dup.t(), x)  # (h, d)
    dx = _input_grad(dgate, w_gate, dup, w_up)  # (M, d)
    return dx, dw_gate, dw_up, dw_down
