"""FLOP and byte counts of each benchmark case, by the formulas of TARGETS.md.

attention      forward FLOPs = 4·b·h·sq·sk·d (·0.5 when causal and sq == sk);
               backward = 2.5 × forward; forward + backward ("full") = 3.5 × forward.
layer/rms norm forward bytes  = read x (+ residual) + write y (+ residual out) + weights once;
               backward bytes = read x, dy (+ stats) + write dx + weights once
               (weights once: each weight read once and, in backward, its gradient
               written once; stats are fp32: mean and rstd for layer norm, rstd for
               RMSNorm); full = forward + backward.
ffn            FLOPs = 2·M·d·h per GEMM: two GEMMs forward, three for the gated FFN;
               backward = 2 × forward; full = 3 × forward.
decode         bytes = the K and V cache read once (the valid entries).

The attention and FFN rows report TFLOP/s (fraction of the measured matmul ceiling),
the norm and decode rows GB/s (fraction of the measured copy ceiling).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .ceilings import copy_gbps

MODES = ("fwd", "bwd", "full")

# Which quantity each op is measured in: "flops" -> TFLOP/s, "bytes" -> GB/s.
WORK_KIND = {
    "attention": "flops",
    "decode_attention": "bytes",
    "layer_norm": "bytes",
    "rms_norm": "bytes",
    "ffn": "flops",
    "gated_ffn": "flops",
}


def element_size(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


def attention_flops(shape: Mapping, mode: str) -> float:
    """FLOPs of dense attention: 4·b·h·sq·sk·d, halved when causal and sq == sk."""
    _check_mode(mode)
    forward = 4.0 * shape["batch"] * shape["heads"] * shape["seqlen_q"] * shape["seqlen_k"] * shape["head_dim"]
    if shape["causal"] and shape["seqlen_q"] == shape["seqlen_k"]:
        forward *= 0.5
    return forward * {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode]


def ffn_flops(shape: Mapping, mode: str, gated: bool) -> float:
    """2·M·d·h per GEMM; 2 GEMMs (plain) or 3 (gated) forward; backward 2×, full 3×."""
    _check_mode(mode)
    gemms = 3 if gated else 2
    forward = gemms * 2.0 * shape["tokens"] * shape["d_model"] * shape["d_hidden"]
    return forward * {"fwd": 1.0, "bwd": 2.0, "full": 3.0}[mode]


def norm_bytes(shape: Mapping, mode: str, dtype: torch.dtype | str, *, weights: int, stats: int) -> float:
    """Bytes a norm must move. `weights`: weight vectors (2 for layer norm: weight and
    bias; 1 for RMSNorm); `stats`: fp32 per-row statistics read by backward."""
    _check_mode(mode)
    size = element_size(dtype)
    rows, hidden = shape["rows"], shape["hidden"]
    tensors = 2 + (2 if shape["residual"] else 0)  # x (+ residual) in, y (+ residual out) out
    forward = rows * hidden * size * tensors + weights * hidden * size
    backward = rows * hidden * size * 3 + rows * 4 * stats + 2 * weights * hidden * size
    return float({"fwd": forward, "bwd": backward, "full": forward + backward}[mode])


def decode_bytes(shape: Mapping, dtype: torch.dtype | str) -> float:
    """The K and V cache read once: 2 · batch · kv_heads · cache_len · head_dim elements."""
    return 2.0 * shape["batch"] * shape["kv_heads"] * shape["cache_len"] * shape["head_dim"] * element_size(dtype)


def work(op: str, shape: Mapping, mode: str, dtype: torch.dtype | str) -> float:
    """The FLOPs (compute-bound ops) or bytes (memory-bound ops) of one call."""
    if op == "attention":
        return attention_flops(shape, mode)
    if op == "ffn":
        return ffn_flops(shape, mode, gated=False)
    if op == "gated_ffn":
        return ffn_flops(shape, mode, gated=True)
    if op == "layer_norm":
        return norm_bytes(shape, mode, dtype, weights=2, stats=2)
    if op == "rms_norm":
        return norm_bytes(shape, mode, dtype, weights=1, stats=1)
    if op == "decode_attention":
        if mode != "fwd":
            raise ValueError(f"decode_attention is forward only; got mode {mode!r}")
        return decode_bytes(shape, dtype)
    raise ValueError(f"no FLOP/byte formula for op {op!r}")


def throughput(op: str, amount: float, ms: float) -> tuple[str, float]:
    """("tflops", TFLOP/s) or ("gbps", GB/s) for `amount` FLOPs/bytes done in `ms`."""
    seconds = ms * 1e-3
    if WORK_KIND[op] == "flops":
        return "tflops", amount / seconds / 1e12
    return "gbps", amount / seconds / 1e9


def fraction_of_ceiling(metric: str, value: float, ceilings: Mapping) -> float | None:
    """value as a fraction of the run's matmul ceiling (tflops) or copy ceiling (gbps)."""
    if metric == "tflops" and ceilings.get("matmul_tflops"):
        return value / ceilings["matmul_tflops"]
    if metric == "gbps":
        ceiling = copy_gbps(ceilings)
        return value / ceiling if ceiling else None
    return None
