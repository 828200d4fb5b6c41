"""Layer norm and RMSNorm with a fused residual add: the triton backend of
fastattn.layer_norm and fastattn.rms_norm. One kernel pair serves both ops; the
constexpr IS_RMS_NORM picks the statistics.

Forward, per row of N = hidden elements; statistics and arithmetic in fp32:

    s    = x + r            formed in the residual-out dtype, stored as residual_out
                            (s = x, nothing stored, without a residual)
    layer norm:  mean = Σ s / N,   rstd = 1 / sqrt(Σ (s - mean)² / N + eps)
    RMSNorm:     mean = 0,         rstd = 1 / sqrt(Σ s² / N + eps)
    x̂    = (s - mean) · rstd
    y    = x̂ · w + b            (w = 1, b = 0 when absent), stored in x's dtype

Backward, with g = dy · w:

    layer norm:  ds = rstd · (g - x̂ · Σ(g·x̂)/N - Σ g/N)
    RMSNorm:     ds = rstd · (g - x̂ · Σ(g·x̂)/N)
    ds  += dresidual_out    (the gradient that reached s directly through prenorm)
    dw   = Σ_rows dy · x̂,  db = Σ_rows dy

Two row layouts. A row that fits in registers (BLOCK_N ≥ N, SINGLE_PASS) is loaded once;
small rows are packed ROWS to a program. A wider row is walked in BLOCK_N-column chunks
twice: once for the statistics (storing s), once to normalize, reading s back (x, or
residual_out when a residual was added: one stream, mostly from L2). The
looped layer-norm statistics are one-pass and stable: every lane of the chunk keeps a
Welford mean and M2 of the values it saw, and the lanes are merged at the end (Chan):

    mean = Σ_l n_l·mean_l / N,   M2 = Σ_l (M2_l + n_l·(mean_l - mean)²),   var = M2 / N

dw and db: the backward runs a persistent grid of P programs (a few per SM); program
p walks its own contiguous block of rows and accumulates Σ dy·x̂ and Σ dy in fp32 (in
registers when SINGLE_PASS, else in its own row of the partial buffer), then writes row p
of DW_PARTIAL / DB_PARTIAL (P, N). One sum over P finishes them: no atomics, so the result
is bitwise reproducible.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _config


@triton.jit
def _load_sum(
    X_row,  # (ROWS, 1) pointers to the rows of x
    R_row,  # (ROWS, 1) pointers to the rows of the residual
    R_OUT_row,  # (ROWS, 1) pointers to the rows of residual_out
    cols,  # (BLOCK_N,) int64 column indices
    stride_xn,  # x column stride
    stride_rn,  # residual column stride
    stride_on,  # residual_out column stride
    mask,  # (ROWS, BLOCK_N) in-bounds elements
    HAS_RESIDUAL: tl.constexpr,  # s = x + r rather than s = x
):
    """s = x + r in residual_out's dtype, stored to residual_out (x alone without a
    residual), returned in fp32."""
    s = tl.load(X_row + cols[None, :] * stride_xn, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        s_dtype = R_OUT_row.dtype.element_ty
        r = tl.load(R_row + cols[None, :] * stride_rn, mask=mask, other=0.0)
        if s_dtype == tl.float64:
            s = s.to(tl.float64) + r.to(tl.float64)
        else:
            # Added in fp32 and rounded once, as torch adds 16-bit floats.
            s = (s.to(s_dtype).to(tl.float32) + r.to(s_dtype).to(tl.float32)).to(s_dtype)
        tl.store(R_OUT_row + cols[None, :] * stride_on, s, mask=mask)
    return s.to(tl.float32)


# The row count M varies from call to call (tokens) and is not specialised: each value
# class (1, multiple of 16, other) would compile its own variant. N (hidden) and the
# strides stay specialised: fixed per model, and N or a row stride that is a multiple of
# 16 keeps the row loads 128 bits wide.
@triton.jit(do_not_specialize=["M"])
def _layer_norm_fwd_kernel(
    X,  # input x, (M, N)
    R,  # residual, (M, N); unused without HAS_RESIDUAL
    Y,  # output y, (M, N), x's dtype
    R_OUT,  # output s = x + r, (M, N), the residual dtype; unused without HAS_RESIDUAL
    W,  # weight, (N,); unused without HAS_WEIGHT
    B,  # bias, (N,); unused without HAS_BIAS
    MEAN,  # output mean, (M,) fp32; unused when IS_RMS_NORM
    RSTD,  # output 1 / std (1 / rms), (M,) fp32
    stride_xm,  # x row stride
    stride_xn,  # x column stride
    stride_rm,  # residual row stride
    stride_rn,  # residual column stride
    stride_ym,  # y row stride
    stride_yn,  # y column stride
    stride_om,  # residual_out row stride
    stride_on,  # residual_out column stride
    stride_w,  # weight stride
    stride_b,  # bias stride
    M,  # rows
    N,  # hidden size: elements per row
    eps,  # added to the variance (mean square)
    IS_RMS_NORM: tl.constexpr,  # RMSNorm statistics (no mean, no bias)
    HAS_WEIGHT: tl.constexpr,  # multiply by W
    HAS_BIAS: tl.constexpr,  # add B
    HAS_RESIDUAL: tl.constexpr,  # normalize x + r and store it to R_OUT
    SINGLE_PASS: tl.constexpr,  # BLOCK_N >= N: the whole row in one tile
    BLOCK_N: tl.constexpr,  # columns per tile (power of 2)
    ROWS: tl.constexpr,  # rows per program (power of 2)
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)  # pointer offsets: column · stride may pass 2³¹ (a transposed x)
    X_row = X + rows[:, None] * stride_xm
    R_row = R + rows[:, None] * stride_rm
    R_OUT_row = R_OUT + rows[:, None] * stride_om
    Y_row = Y + rows[:, None] * stride_ym

    if SINGLE_PASS:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        s = _load_sum(X_row, R_row, R_OUT_row, cols64, stride_xn, stride_rn, stride_on, mask, HAS_RESIDUAL)
        if IS_RMS_NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
            x_hat = s * rstd[:, None]
        else:
            mean = tl.sum(s, axis=1) / N
            centered = tl.where(mask, s - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
            x_hat = centered * rstd[:, None]
        y = x_hat
        if HAS_WEIGHT:
            y = y * tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y_row + cols64[None, :] * stride_yn, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: statistics, chunk by chunk (and residual_out written once).
        if IS_RMS_NORM:
            lane_sq = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        else:
            lane_mean = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            lane_m2 = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < N)[None, :]
            s = _load_sum(X_row, R_row, R_OUT_row, start + cols64, stride_xn, stride_rn, stride_on, mask,
                          HAS_RESIDUAL)
            if IS_RMS_NORM:
                lane_sq += s * s
            else:
                # Every earlier chunk was full, so each live lane has seen start/BLOCK_N values.
                inv_count = 1.0 / (start // BLOCK_N + 1.0)
                delta = s - lane_mean
                lane_mean = tl.where(mask, lane_mean + delta * inv_count, lane_mean)
                lane_m2 = tl.where(mask, lane_m2 + delta * (s - lane_mean), lane_m2)
        if IS_RMS_NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(lane_sq, axis=1) / N + eps)
            mean = tl.zeros((ROWS,), dtype=tl.float32)
        else:
            lane_count = ((N - cols + BLOCK_N - 1) // BLOCK_N).to(tl.float32)  # values per lane
            mean = tl.sum(lane_mean * lane_count[None, :], axis=1) / N
            spread = lane_mean - mean[:, None]
            m2 = tl.sum(lane_m2 + lane_count[None, :] * spread * spread, axis=1)
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: normalize s, read back from residual_out when pass 1 stored it (one
        # stream instead of x and r again; the same values, s was rounded before the store).
        if HAS_RESIDUAL:
            tl.debug_barrier()  # pass 1's stores are visible to every thread of the program
        for start in range(0, N, BLOCK_N):
            col_mask = start + cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_RESIDUAL:
                s = tl.load(R_OUT_row + (start + cols64)[None, :] * stride_on, mask=mask, other=0.0)
            else:
                s = tl.load(X_row + (start + cols64)[None, :] * stride_xn, mask=mask, other=0.0)
            s = s.to(tl.float32)
            y = (s - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                w = tl.load(W + (start + cols) * stride_w, mask=col_mask, other=0.0)
                y = y * w.to(tl.float32)[None, :]
            if HAS_BIAS:
                b = tl.load(B + (start + cols) * stride_b, mask=col_mask, other=0.0)
                y = y + b.to(tl.float32)[None, :]
            tl.store(Y_row + (start + cols64)[None, :] * stride_yn, y.to(Y.dtype.element_ty), mask=mask)

    if not IS_RMS_NORM:
        tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_tile(
    S_row,  # (ROWS, 1) pointers to the rows of s
    DY_row,  # (ROWS, 1) pointers to the rows of dy
    W,  # weight, (N,)
    cols,  # (BLOCK_N,) int64 column indices of this tile
    stride_sn,  # s column stride
    stride_dyn,  # dy column stride
    stride_w,  # weight stride
    mask,  # (ROWS, BLOCK_N) in-bounds elements
    col_mask,  # (BLOCK_N,) in-bounds columns
    mean,  # (ROWS,) fp32
    rstd,  # (ROWS,) fp32
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """x̂, dy and g = dy·w of one tile, fp32, zero outside the mask."""
    s = tl.load(S_row + cols[None, :] * stride_sn, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_row + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS_NORM:
        x_hat = s * rstd[:, None]
    else:
        x_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return x_hat, dy, g


@triton.jit(do_not_specialize=["M"])
def _layer_norm_bwd_kernel(
    DY,  # gradient of y, (M, N); any strides (0 included)
    DRES,  # gradient of residual_out, (M, N); unused without HAS_DRESIDUAL
    S,  # the normalized input s saved by the forward, (M, N)
    DS,  # output: gradient of s, (M, N), s's dtype
    W,  # weight, (N,); unused without HAS_WEIGHT
    MEAN,  # saved mean, (M,) fp32; unused when IS_RMS_NORM
    RSTD,  # saved 1 / std (1 / rms), (M,) fp32
    DW_PARTIAL,  # output: per-program Σ dy·x̂, (programs, N) fp32 contiguous
    DB_PARTIAL,  # output: per-program Σ dy, (programs, N) fp32 contiguous
    stride_dym,  # dy row stride
    stride_dyn,  # dy column stride
    stride_drm,  # dresidual_out row stride
    stride_drn,  # dresidual_out column stride
    stride_sm,  # s row stride
    stride_sn,  # s column stride
    stride_dsm,  # ds row stride
    stride_dsn,  # ds column stride
    stride_w,  # weight stride
    stride_mean,  # mean stride
    stride_rstd,  # rstd stride
    M,  # rows
    N,  # hidden size
    IS_RMS_NORM: tl.constexpr,  # RMSNorm (no mean, no bias)
    HAS_WEIGHT: tl.constexpr,  # g = dy·w, and write DW_PARTIAL
    HAS_BIAS: tl.constexpr,  # write DB_PARTIAL
    HAS_DRESIDUAL: tl.constexpr,  # add DRES to ds
    SINGLE_PASS: tl.constexpr,  # BLOCK_N >= N: the whole row in one tile
    BLOCK_N: tl.constexpr,  # columns per tile (power of 2)
    ROWS: tl.constexpr,  # rows per tile (power of 2)
):
    pid = tl.program_id(0)
    rows_per_program = tl.cdiv(tl.cdiv(M, tl.num_programs(0)), ROWS) * ROWS
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)  # pointer offsets: column · stride may pass 2³¹ (a transposed s or dy)
    DW_row = DW_PARTIAL + pid.to(tl.int64) * N
    DB_row = DB_PARTIAL + pid.to(tl.int64) * N

    if SINGLE_PASS:
        col_mask = cols < N
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        # This program's partial rows accumulate in memory: clear them first.
        for start in range(0, N, BLOCK_N):
            col_mask = start + cols < N
            if HAS_WEIGHT:
                tl.store(DW_row + start + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=col_mask)
            if HAS_BIAS:
                tl.store(DB_row + start + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=col_mask)
        tl.debug_barrier()

    for row0 in range(row_start, row_end, ROWS):
        rows = row0 + tl.arange(0, ROWS)
        row_mask = rows < row_end
        rows = rows.to(tl.int64)
        S_row = S + rows[:, None] * stride_sm
        DY_row = DY + rows[:, None] * stride_dym
        DS_row = DS + rows[:, None] * stride_dsm
        DRES_row = DRES + rows[:, None] * stride_drm
        rstd = tl.load(RSTD + rows * stride_rstd, mask=row_mask, other=0.0)
        if IS_RMS_NORM:
            mean = tl.zeros((ROWS,), dtype=tl.float32)
        else:
            mean = tl.load(MEAN + rows * stride_mean, mask=row_mask, other=0.0)

        if SINGLE_PASS:
            mask = row_mask[:, None] & col_mask[None, :]
            x_hat, dy, g = _norm_bwd_tile(S_row, DY_row, W, cols64, stride_sn, stride_dyn, stride_w,
                                          mask, col_mask, mean, rstd, IS_RMS_NORM, HAS_WEIGHT)
            c1 = tl.sum(x_hat * g, axis=1) / N
            if IS_RMS_NORM:
                ds = (g - x_hat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                ds = (g - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DRESIDUAL:
                ds += tl.load(DRES_row + cols64[None, :] * stride_drn, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS_row + cols64[None, :] * stride_dsn, ds.to(DS.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw_acc += tl.sum(dy * x_hat, axis=0)
            if HAS_BIAS:
                db_acc += tl.sum(dy, axis=0)
        else:
            # Pass 1: the row sums Σ g·x̂ and Σ g.
            c1 = tl.zeros((ROWS,), dtype=tl.float32)
            c2 = tl.zeros((ROWS,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                col_mask = start + cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                x_hat, dy, g = _norm_bwd_tile(S_row, DY_row, W, start + cols64, stride_sn, stride_dyn,
                                              stride_w, mask, col_mask, mean, rstd, IS_RMS_NORM,
                                              HAS_WEIGHT)
                c1 += tl.sum(x_hat * g, axis=1)
                c2 += tl.sum(g, axis=1)
            c1 = c1 / N
            c2 = c2 / N
            # Pass 2: ds, and this tile's Σ dy·x̂, Σ dy added to the program's partial rows.
            for start in range(0, N, BLOCK_N):
                col_mask = start + cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                x_hat, dy, g = _norm_bwd_tile(S_row, DY_row, W, start + cols64, stride_sn, stride_dyn,
                                              stride_w, mask, col_mask, mean, rstd, IS_RMS_NORM,
                                              HAS_WEIGHT)
                if IS_RMS_NORM:
                    ds = (g - x_hat * c1[:, None]) * rstd[:, None]
                else:
                    ds = (g - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
                if HAS_DRESIDUAL:
                    dres = tl.load(DRES_row + (start + cols64)[None, :] * stride_drn, mask=mask, other=0.0)
                    ds += dres.to(tl.float32)
                tl.store(DS_row + (start + cols64)[None, :] * stride_dsn, ds.to(DS.dtype.element_ty),
                         mask=mask)
                if HAS_WEIGHT:
                    dw = tl.load(DW_row + start + cols, mask=col_mask, other=0.0)
                    tl.store(DW_row + start + cols, dw + tl.sum(dy * x_hat, axis=0), mask=col_mask)
                if HAS_BIAS:
                    db = tl.load(DB_row + start + cols, mask=col_mask, other=0.0)
                    tl.store(DB_row + start + cols, db + tl.sum(dy, axis=0), mask=col_mask)
            # The next row block reads back what this one stored (possibly from other threads).
            tl.debug_barrier()

    if SINGLE_PASS:
        if HAS_WEIGHT:
            tl.store(DW_row + cols, dw_acc, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_row + cols, db_acc, mask=col_mask)


_layer_norm_fwd_tuned = triton.autotune(
    configs=_config.layer_norm_configs(),
    key=["N", "IS_RMS_NORM", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "SINGLE_PASS", "BLOCK_N"],
    prune_configs_by={"early_config_prune": _config.layer_norm_prune(backward=False)},
    cache_results=True,
)(_layer_norm_fwd_kernel)

_layer_norm_bwd_tuned = triton.autotune(
    configs=_config.layer_norm_configs(),
    key=["N", "IS_RMS_NORM", "HAS_WEIGHT", "HAS_BIAS", "HAS_DRESIDUAL", "SINGLE_PASS", "BLOCK_N"],
    prune_configs_by={"early_config_prune": _config.layer_norm_prune(backward=True)},
    cache_results=True,
)(_layer_norm_bwd_kernel)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _backward_programs(device: torch.device, rows: int) -> int:
    """Size of the backward's persistent grid (_config.layer_norm_backward_programs): a
    few programs per SM, a fixed few on CPU."""
    sm_count = None
    if device.type == "cuda":
        sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _config.layer_norm_backward_programs(rows, sm_count)


def _launch(plain, tuned, grid, args: tuple, hidden: int, backward: bool, **constexprs):
    """Launch with the config of _config.layer_norm_launch_config (the default, the pinned
    one, the interpreter's), or the autotuned kernel (FASTATTN_AUTOTUNE=1). `grid` is a
    function of the config's ROWS."""
    block_n, config = _config.layer_norm_launch_config(hidden, backward)
    constexprs.update(SINGLE_PASS=block_n >= hidden, BLOCK_N=block_n)
    if config is None:
        tuned[lambda meta: (grid(meta["ROWS"]),)](*args, **constexprs)
    else:
        plain[(grid(config["ROWS"]),)](*args, **constexprs, **config)


@_config.on_tensor_device
def layer_norm_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    residual_in_fp32: bool,
    *,
    is_rms_norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (rows, hidden). Returns (y, residual_out, mean, rstd): y like x;
    residual_out = x + residual in the residual dtype (fp32 with residual_in_fp32), or a
    0-element placeholder without a residual; mean and rstd (rows,) fp32 (mean is a
    placeholder for RMSNorm)."""
    rows, hidden = x.shape
    y = x.new_empty(x.shape)
    if residual is None:
        residual_out = x.new_empty(0)
    else:
        residual_out = x.new_empty(x.shape, dtype=torch.float32 if residual_in_fp32 else residual.dtype)
    rstd = x.new_empty(rows, dtype=torch.float32)
    mean = x.new_empty(0 if is_rms_norm else rows, dtype=torch.float32)
    if rows == 0:
        return y, residual_out, mean, rstd
    r = residual if residual is not None else x
    r_out = residual_out if residual is not None else y
    w = weight if weight is not None else rstd
    b = bias if bias is not None else rstd
    args = (
        x, r, y, r_out, w, b, mean if not is_rms_norm else rstd, rstd,
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), y.stride(0), y.stride(1),
        r_out.stride(0), r_out.stride(1), w.stride(0), b.stride(0),
        rows, hidden, eps,
    )
    _launch(_layer_norm_fwd_kernel, _layer_norm_fwd_tuned, lambda block_rows: triton.cdiv(rows, block_rows),
            args, hidden, backward=False, IS_RMS_NORM=is_rms_norm, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None)
    return y, residual_out, mean, rstd


@_config.on_tensor_device
def layer_norm_backward(
    dy: Tensor,
    dresidual_out: Optional[Tensor],
    summed: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    *,
    is_rms_norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of layer_norm_forward given dy (and dresidual_out, the gradient of s, or
    None): (ds, dweight, dbias), ds in s's dtype; dweight / dbias in the parameters'
    dtypes, 0-element placeholders for absent parameters."""
    rows, hidden = summed.shape
    ds = summed.new_empty(summed.shape)
    programs = _backward_programs(summed.device, rows)
    partial = lambda present: summed.new_empty((programs, hidden) if present else (0,), dtype=torch.float32)
    dw_partial, db_partial = partial(weight is not None), partial(bias is not None)
    if rows > 0:
        dres = dresidual_out if dresidual_out is not None else summed
        w = weight if weight is not None else rstd
        args = (
            dy, dres, summed, ds, w, mean if not is_rms_norm else rstd, rstd, dw_partial, db_partial,
            dy.stride(0), dy.stride(1), dres.stride(0), dres.stride(1), summed.stride(0), summed.stride(1),
            ds.stride(0), ds.stride(1), w.stride(0), mean.stride(0) if not is_rms_norm else 0, rstd.stride(0),
            rows, hidden,
        )
        _launch(_layer_norm_bwd_kernel, _layer_norm_bwd_tuned, lambda block_rows: programs, args, hidden,
                backward=True, IS_RMS_NORM=is_rms_norm, HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None, HAS_DRESIDUAL=dresidual_out is not None)
    else:
        dw_partial.zero_()
        db_partial.zero_()
    reduce = lambda p, param: summed.new_empty(0) if param is None else p.sum(0).to(param.dtype)
    return ds, reduce(dw_partial, weight), reduce(db_partial, bias)
