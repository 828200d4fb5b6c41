"""Autotune spaces of the Triton kernels, one delimited section per op.

Each section builds its space from a product, prunes it with a keep() filter, keys the
tuning on shape arguments only, and reads an environment variable
FASTATTN_<OP>_CONFIG that pins one config (tests; the interpreter uses a fixed small
config without tuning).
"""

from __future__ import annotations

import itertools
import os
from typing import Optional

import triton


# ============================================================================
# common: the interpreter, the autotune switch, the target architecture
# ============================================================================
#
# Without FASTATTN_AUTOTUNE=1 every launch uses one default config per key, looked up
# from the per-op tables below by arch family (sm80: Ampere/Ada, sm90: Hopper and newer),
# so that a first call compiles exactly one variant. FASTATTN_TRITON_ARCH (e.g. "90")
# overrides the device's compute capability when picking configs: the ahead-of-time
# compile check (fastattn.kernels.aot) uses it to pick the configs of a GPU that is not
# there.

AUTOTUNE_ENV = "FASTATTN_AUTOTUNE"
TARGET_ARCH_ENV = "FASTATTN_TRITON_ARCH"


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """Whether launches autotune (FASTATTN_AUTOTUNE=1; never under the interpreter)."""
    value = os.environ.get(AUTOTUNE_ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1; got {value!r}")
    return value == "1" and not interpreted()


def target_arch(device=None) -> int:
    """Compute capability as major*10 + minor (90 for an H100/H200) of `device` (a torch
    device, or None for the current one), or FASTATTN_TRITON_ARCH when set."""
    text = os.environ.get(TARGET_ARCH_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 80:
            raise ValueError(f"{TARGET_ARCH_ENV} must be a compute capability like 80 or 90 (>= 80); got {text!r}")
        return int(text)
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def arch_family(arch: int) -> str:
    """The config-table family of compute capability `arch`: "sm80" (8.x) or "sm90" (9.0 and newer)."""
    if arch < 80:
        raise ValueError(f"fastattn's Triton kernels need compute capability 8.0 or newer; got {arch}")
    return "sm90" if arch >= 90 else "sm80"


# ============================================================================
# layer_norm / rms_norm (kernels/layer_norm.py; one kernel pair and one space for both)
# ============================================================================
#
# A row of up to LAYER_NORM_MAX_FUSED_{FWD,BWD} elements is held in registers (one tile,
# BLOCK_N = next power of 2 >= hidden); a wider row is walked in LAYER_NORM_LOOP_BLOCK_N
# chunks. The tuned parameters are ROWS (rows per tile) and num_warps, keyed on hidden.
# FASTATTN_LAYER_NORM_CONFIG pins one config for both ops, e.g.
#     FASTATTN_LAYER_NORM_CONFIG="BLOCK_N=256,ROWS=4,num_warps=4"
# where BLOCK_N caps the tile width (rows wider than it take the looped path); keys left
# out take their defaults. Under the Triton interpreter the default config is used
# without tuning.

LAYER_NORM_CONFIG_ENV = "FASTATTN_LAYER_NORM_CONFIG"
LAYER_NORM_MAX_FUSED_FWD = 16384  # widest row kept in registers by the forward (elements)
LAYER_NORM_MAX_FUSED_BWD = 8192  # the backward holds s, dy, g, x̂ and the dw/db sums per element
LAYER_NORM_LOOP_BLOCK_N = 4096  # chunk width of the looped path
LAYER_NORM_MIN_TILE = 2048  # elements per tile worth a program (when hidden allows)
LAYER_NORM_MAX_TILE = {False: 16384, True: 8192}  # by backward
LAYER_NORM_ELEMENTS_PER_THREAD = {False: (4, 32), True: (4, 16)}  # allowed range, by backward
LAYER_NORM_BWD_PROGRAMS_PER_SM = 1  # persistent backward grid
LAYER_NORM_INTERPRETER_BWD_PROGRAMS = 3  # persistent backward grid under the interpreter
LAYER_NORM_INTERPRETER_TILE = 32768  # elements per program under the interpreter (fewer, bigger programs)
_LAYER_NORM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
_LAYER_NORM_WARPS = (1, 2, 4, 8, 16)
_LAYER_NORM_KEYS = ("BLOCK_N", "ROWS", "num_warps", "num_stages")


def layer_norm_block_n(hidden: int, backward: bool) -> int:
    """Tile width: the whole row when it fits in registers, else the looped chunk."""
    limit = LAYER_NORM_MAX_FUSED_BWD if backward else LAYER_NORM_MAX_FUSED_FWD
    return triton.next_power_of_2(hidden) if hidden <= limit else LAYER_NORM_LOOP_BLOCK_N


def layer_norm_keep(rows: int, num_warps: int, block_n: int, single_pass: bool, backward: bool) -> bool:
    """Whether (ROWS, num_warps) is worth trying for tiles BLOCK_N wide."""
    tile = rows * block_n
    if not single_pass and rows > 4:
        return False
    max_tile = LAYER_NORM_MAX_TILE[backward]
    if tile > max(max_tile, block_n):
        return False
    widest = max(r for r in _LAYER_NORM_ROWS if r * block_n <= max(max_tile, block_n))
    if tile < min(LAYER_NORM_MIN_TILE, widest * block_n):
        return False
    low, high = LAYER_NORM_ELEMENTS_PER_THREAD[backward]
    per_thread = tile // (32 * num_warps)
    return (per_thread >= low or num_warps == 1) and (per_thread <= high or num_warps == _LAYER_NORM_WARPS[-1])


def layer_norm_configs() -> list:
    """The whole space; layer_norm_prune keeps the part that fits a call's BLOCK_N."""
    return [triton.Config({"ROWS": rows}, num_warps=warps)
            for rows, warps in itertools.product(_LAYER_NORM_ROWS, _LAYER_NORM_WARPS)]


def layer_norm_prune(backward: bool):
    """early_config_prune for the forward (backward=False) or backward kernel."""

    def prune(configs, named_args, **kwargs):
        block_n, single_pass = kwargs["BLOCK_N"], kwargs["SINGLE_PASS"]
        kept = [c for c in configs
                if layer_norm_keep(c.kwargs["ROWS"], c.num_warps, block_n, single_pass, backward)]
        return kept or [triton.Config(layer_norm_default(block_n, single_pass, backward))]

    return prune


def layer_norm_default(block_n: int, single_pass: bool, backward: bool) -> dict:
    """The config used without tuning (interpreter, or keys a pinned config leaves out)."""
    if interpreted():
        rows = max(1, min(_LAYER_NORM_ROWS[-1], LAYER_NORM_INTERPRETER_TILE // block_n))
        return {"ROWS": rows if single_pass else 1, "num_warps": 4}
    max_tile = LAYER_NORM_MAX_TILE[backward]
    rows = max(1, min(_LAYER_NORM_ROWS[-1], LAYER_NORM_MIN_TILE // block_n if single_pass else 1))
    warps = min(_LAYER_NORM_WARPS[-1], max(1, rows * block_n // (32 * 8)))
    return {"ROWS": rows if rows * block_n <= max(max_tile, block_n) else 1, "num_warps": warps}


def layer_norm_pinned() -> Optional[dict]:
    """The config pinned by FASTATTN_LAYER_NORM_CONFIG, or None."""
    text = os.environ.get(LAYER_NORM_CONFIG_ENV, "").strip()
    if not text:
        return None
    pinned = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _LAYER_NORM_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{LAYER_NORM_CONFIG_ENV} must be comma-separated KEY=positive int with KEY in "
                             f"{', '.join(_LAYER_NORM_KEYS)}; got {text!r}")
        pinned[key] = int(value)
    for key in ("BLOCK_N", "ROWS"):
        if key in pinned and pinned[key] & (pinned[key] - 1):
            raise ValueError(f"{LAYER_NORM_CONFIG_ENV}: {key} must be a power of 2; got {pinned[key]}")
    return pinned


def layer_norm_launch_config(hidden: int, backward: bool) -> tuple[int, Optional[dict]]:
    """(BLOCK_N, config) for one launch: config is the pinned or interpreter config
    (ROWS, num_warps, ...), or None to autotune."""
    pinned = layer_norm_pinned()
    block_n = layer_norm_block_n(hidden, backward)
    if pinned is not None and "BLOCK_N" in pinned:
        block_n = min(triton.next_power_of_2(hidden), pinned["BLOCK_N"])
    if pinned is None and not interpreted():
        return block_n, None
    config = layer_norm_default(block_n, block_n >= hidden, backward)
    config.update({k: v for k, v in (pinned or {}).items() if k != "BLOCK_N"})
    return block_n, config


# ============================================================================
# ffn / gated_ffn (kernels/ffn.py; one space for all of its GEMM kernels)
# ============================================================================
#
# Every kernel of kernels/ffn.py is a tiled GEMM C (M, N) = A (M, K)·B (K, N) plus an
# epilogue. The tuned parameters are the tile (BLOCK_M, BLOCK_N, BLOCK_K), GROUP_M (tile
# rows visited together for L2 reuse), num_warps and num_stages, keyed on the
# power-of-2 buckets of (M, N, K) (Triton adds the operand dtypes to the key), so that a
# new token count does not retune. FASTATTN_FFN_CONFIG pins one config for all of
# them, e.g.
#     FASTATTN_FFN_CONFIG="BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,GROUP_M=8,num_warps=4,num_stages=3"
# where keys left out take FFN_DEFAULT's values. Under the Triton interpreter
# FFN_INTERPRETER_CONFIG is used without tuning (small tiles, so that the test shapes
# still cover several tiles and masked edges).

FFN_CONFIG_ENV = "FASTATTN_FFN_CONFIG"
FFN_DEFAULT = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
FFN_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4,
                          "num_stages": 1}
FFN_GROUP_M = 8
FFN_ACCUMULATOR_REGISTERS = (32, 128)  # fp32 accumulator elements per thread worth trying
FFN_SHARED_MEMORY = 200 * 1024  # bytes for the num_stages buffered A and B tiles (H100: 227 KiB)
_FFN_BLOCK_M = (64, 128)
_FFN_BLOCK_N = (64, 128, 256)
_FFN_BLOCK_K = (32, 64)
_FFN_WARPS = (4, 8)
_FFN_STAGES = (3, 4)
_FFN_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def ffn_keep(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
             accumulators: int = 1, element_size: int = 2) -> bool:
    """Whether a GEMM config is worth trying. `accumulators` (BLOCK_M, BLOCK_N) fp32 tiles
    are live (2 for the gated forward, which also streams two B tiles); element_size is
    the operands' bytes."""
    per_thread = accumulators * block_m * block_n // (32 * num_warps)
    low, high = FFN_ACCUMULATOR_REGISTERS
    if not low <= per_thread <= high:
        return False
    if num_warps == 8 and block_m * block_n < 128 * 128:
        return False
    if block_n == 256 and block_m != 128:
        return False
    if block_k == 32 and num_stages < 4:
        return False
    staged = num_stages * block_k * (block_m + accumulators * block_n) * element_size
    return staged <= FFN_SHARED_MEMORY


def ffn_configs(accumulators: int = 1) -> list:
    """The space for 2-byte operands; ffn_prune_for_inputs narrows it per call."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": FFN_GROUP_M},
                      num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in itertools.product(_FFN_BLOCK_M, _FFN_BLOCK_N, _FFN_BLOCK_K, _FFN_WARPS,
                                                        _FFN_STAGES)
        if ffn_keep(m, n, k, warps, stages, accumulators)
    ]


def ffn_prune_for_inputs(accumulators: int = 1):
    """early_config_prune: refit the shared-memory rule to the operands' element size and
    drop tiles much larger than the problem (keeps at least one config)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        element_size = next(v.element_size() for v in args.values() if hasattr(v, "element_size"))
        max_m = max(_FFN_BLOCK_M[0], triton.next_power_of_2(args["M"]))
        max_n = max(_FFN_BLOCK_N[0], triton.next_power_of_2(args["N"]))
        kept = [
            c for c in configs
            if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n
            and ffn_keep(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                         c.num_stages, accumulators, element_size)
        ]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    return prune


def ffn_pinned_config() -> Optional[dict]:
    """The launch config pinned by FASTATTN_FFN_CONFIG (missing keys from FFN_DEFAULT),
    FFN_INTERPRETER_CONFIG under the interpreter, or None to autotune."""
    text = os.environ.get(FFN_CONFIG_ENV, "").strip()
    if not text:
        if interpreted():
            return dict(FFN_INTERPRETER_CONFIG)
        return None
    pinned = dict(FFN_DEFAULT)
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _FFN_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{FFN_CONFIG_ENV} must be comma-separated KEY=positive int with KEY in "
                             f"{', '.join(_FFN_KEYS)}; got {text!r}")
        pinned[key] = int(value)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if pinned[key] < 16 or pinned[key] & (pinned[key] - 1):
            raise ValueError(f"{FFN_CONFIG_ENV}: {key} must be a power of 2 >= 16; got {pinned[key]}")
    return pinned


# ============================================================================
# attention (kernels/attention.py: forward, backward preprocess, dK/dV, dQ, dbias, dropout mask)
# ============================================================================
#
# One config per key (arch family, kernel, dtype, head-dim bucket, causal) from
# ATTENTION_DEFAULTS, so that a first call compiles one variant per kernel. The kernels:
#     fwd             a BLOCK_M-row q tile stays; K/V stream through in BLOCK_N-key tiles
#     bwd_preprocess  Delta and Lse2 of BLOCK_M rows (memory-bound)
#     dkdv            a BLOCK_N-key K/V tile stays; q/dO stream through in BLOCK_M-row tiles
#     dq              a BLOCK_M-row q/dO tile stays; K/V stream through in BLOCK_N-key tiles
#     dbias           one (BLOCK_M, BLOCK_N) tile of dbias; loads q/dO and K/V tiles both
#     dropout_mask    the dropout keep-mask materialised (tests)
# The head-dim bucket is max(head_dim, head_dim_v) rounded up to 64, 128 or 256 (the
# kernels pad head dims to a power of two). fp16 and bf16 share entries (same tiles, same
# bytes); fp32 inputs run ieee dots on the FMA units and have small tiles of their own.
# The sm90 entries compiled for sm_90 without register spills with each of the options
# (bias, bool mask, dropout, softcap, ALiBi, varlen) at head dims 64, 96, 128 and 256,
# within its 227 KB of shared memory per block; the sm80 entries compiled for sm_80 within
# 99 KB, the limit of the 8.6 and 8.9 parts, so that one entry serves every 8.x GPU
# (checked there with bias, dropout, softcap and ALiBi together). `python -m
# fastattn.kernels.aot` checks them. The exception is fp32 dK/dV at head-dim bucket 256,
# which spilled about 770 bytes in every tile tried (its ieee dots hold 256-long operand
# rows in registers; fp32 is the exact path, not the fast one). Seeds: Triton's tutorial
# 06 (forward 128x64) and FlashAttention-2's 8-warp backward; the dK/dV program holds K,
# V, dK and dV, so its tiles are smaller than the tutorial's 32x128 and it runs
# unpipelined (num_stages 1): its pipelined 4-warp configs spill. The GPU issues tune
# them. Causal and non-causal calls share the entries (causal is a key of the table all
# the same, so a tuned entry can split them).
#
# FASTATTN_ATTENTION_CONFIG pins keys of the config of every attention kernel, e.g.
#     FASTATTN_ATTENTION_CONFIG="BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1"
# (keys left out keep the table's values; a kernel ignores keys it has no use for).
# Under the Triton interpreter ATTENTION_INTERPRETER_CONFIG replaces the table (small
# tiles, so that the test shapes cover several tiles, the full and the masked ones).
# With FASTATTN_AUTOTUNE=1 (and nothing pinned) the fwd, dkdv and dq kernels are
# autotuned over at most ATTENTION_MAX_TUNE_CONFIGS configs around the default entry,
# keyed on ATTENTION_TUNE_KEY (a seqlen bucket, causal, the padded head dims and the
# option flags; Triton adds the dtypes), timings cached on disk.

ATTENTION_CONFIG_ENV = "FASTATTN_ATTENTION_CONFIG"
ATTENTION_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
ATTENTION_KINDS = ("fwd", "bwd_preprocess", "dkdv", "dq", "dbias", "dropout_mask")
ATTENTION_TUNED_KINDS = ("fwd", "dkdv", "dq")
ATTENTION_HEAD_DIM_BUCKETS = (64, 128, 256)
# (family, kind) -> {head-dim bucket: (BLOCK_M, BLOCK_N, num_warps, num_stages)}, 16-bit inputs
# (bwd_preprocess has no BLOCK_N)
ATTENTION_DEFAULTS = {
    ("sm90", "fwd"): {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    ("sm90", "bwd_preprocess"): {64: (128, 0, 4, 1), 128: (128, 0, 8, 1), 256: (64, 0, 8, 1)},
    ("sm90", "dkdv"): {64: (32, 64, 4, 1), 128: (16, 64, 8, 1), 256: (32, 16, 8, 2)},
    ("sm90", "dq"): {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (32, 32, 8, 2)},
    ("sm90", "dbias"): {64: (64, 64, 8, 1), 128: (64, 32, 8, 1), 256: (32, 16, 8, 1)},
    ("sm90", "dropout_mask"): {64: (64, 64, 4, 1), 128: (64, 64, 4, 1), 256: (64, 64, 4, 1)},
    ("sm80", "fwd"): {64: (128, 64, 8, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    ("sm80", "bwd_preprocess"): {64: (128, 0, 4, 1), 128: (128, 0, 8, 1), 256: (64, 0, 8, 1)},
    ("sm80", "dkdv"): {64: (32, 32, 8, 1), 128: (16, 32, 8, 1), 256: (32, 16, 8, 1)},
    ("sm80", "dq"): {64: (128, 32, 8, 2), 128: (128, 32, 8, 2), 256: (32, 32, 8, 2)},
    ("sm80", "dbias"): {64: (32, 64, 8, 1), 128: (64, 32, 8, 1), 256: (32, 16, 8, 1)},
    ("sm80", "dropout_mask"): {64: (64, 64, 4, 1), 128: (64, 64, 4, 1), 256: (64, 64, 4, 1)},
}
# kind -> {head-dim bucket: config} for fp32 inputs, every family: ieee dots on the FMA
# units hold whole operand rows in registers, hence the small tiles
ATTENTION_DEFAULTS_FP32 = {
    "fwd": {64: (32, 16, 4, 1), 128: (32, 16, 4, 1), 256: (32, 16, 8, 1)},
    "bwd_preprocess": {64: (128, 0, 4, 1), 128: (64, 0, 4, 1), 256: (32, 0, 4, 1)},
    "dkdv": {64: (16, 16, 4, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    "dq": {64: (16, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "dbias": {64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "dropout_mask": {64: (64, 64, 4, 1), 128: (64, 64, 4, 1), 256: (64, 64, 4, 1)},
}
ATTENTION_TUNE_KEY = ("seqlen_bucket", "causal", "BLOCK_D", "BLOCK_DV", "HAS_SOFTCAP", "HAS_ALIBI",
                      "BIAS_KIND", "HAS_DROPOUT")
ATTENTION_MAX_TUNE_CONFIGS = 8
# bytes of staged tiles an autotune candidate may plan for (attention_keep), by compute
# capability: the per-block limit (227, 163 or 99 KB) less room for layout scratch
ATTENTION_SHARED_MEMORY = {90: 200 * 1024, 80: 140 * 1024, 87: 140 * 1024, 86: 88 * 1024, 89: 88 * 1024}
ATTENTION_ACCUMULATOR_REGISTERS = 128  # most fp32 accumulator elements per thread
ATTENTION_SCORE_REGISTERS = 64  # most fp32 score-tile (BLOCK_M x BLOCK_N) elements per thread
ATTENTION_EIGHT_WARPS_TILE = 128 * 64  # smallest resident tile (elements) worth 8 warps
ATTENTION_SEQLEN_BUCKETS = (128, 16384)  # seqlen bucket = next power of 2, clamped to this range
_ATTENTION_SPACE = {
    "fwd": dict(BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)),
    "dkdv": dict(BLOCK_M=(16, 32, 64), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(1, 2, 3)),
    "dq": dict(BLOCK_M=(64, 128), BLOCK_N=(16, 32, 64), num_warps=(4, 8), num_stages=(1, 2, 3)),
}
_ATTENTION_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_ATTENTION_KIND_KEYS = {kind: _ATTENTION_KEYS for kind in ATTENTION_KINDS}
_ATTENTION_KIND_KEYS["bwd_preprocess"] = ("BLOCK_M", "num_warps", "num_stages")


def attention_head_dim_bucket(head_dim: int) -> int:
    """The table's head-dim bucket of max(head_dim, head_dim_v): 64, 128 or 256."""
    return next((b for b in ATTENTION_HEAD_DIM_BUCKETS if head_dim <= b), ATTENTION_HEAD_DIM_BUCKETS[-1])


def attention_shared_memory(arch: int) -> int:
    """Bytes of staged tiles attention_keep allows on compute capability `arch`."""
    if arch >= 90:
        return ATTENTION_SHARED_MEMORY[90]
    return ATTENTION_SHARED_MEMORY.get(arch, ATTENTION_SHARED_MEMORY[86])


def attention_default_config(arch: int, kind: str, dtype=None, head_dim: int = 0, causal: bool = False) -> dict:
    """The table's config of kernel `kind` for compute capability `arch`, inputs of
    `dtype` (a torch dtype; None for the dropout mask) and max(head_dim, head_dim_v).
    `causal` is part of the key; the entries do not differ by it yet."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kernel kind must be one of {', '.join(ATTENTION_KINDS)}; got {kind!r}")
    bucket = attention_head_dim_bucket(head_dim)
    if dtype is not None and getattr(dtype, "itemsize", 2) == 4:
        entry = ATTENTION_DEFAULTS_FP32[kind][bucket]
    else:
        entry = ATTENTION_DEFAULTS[(arch_family(arch), kind)][bucket]
    config = dict(zip(_ATTENTION_KEYS, entry))
    return {key: config[key] for key in _ATTENTION_KIND_KEYS[kind]}


def attention_seqlen_bucket(seqlen_q: int, seqlen_k: int) -> int:
    low, high = ATTENTION_SEQLEN_BUCKETS
    return min(high, max(low, triton.next_power_of_2(max(seqlen_q, seqlen_k))))


def attention_keep(kind: str, block_m: int, block_n: int, num_warps: int, num_stages: int,
                   block_d: int, block_dv: int, element_size: int = 2,
                   shared_memory: int = ATTENTION_SHARED_MEMORY[90]) -> bool:
    """Whether a config of kernel `kind` is worth trying for (padded) head dims
    block_d / block_dv and operands of element_size bytes: the staged tiles fit in
    `shared_memory` bytes, the fp32 accumulators and the score tile in registers, and 8
    warps only for 16-bit tiles big enough to keep the tensor cores busy (fp32's ieee dots
    run on the FMA units, where more warps split the operand rows)."""
    threads = 32 * num_warps
    if kind == "fwd":  # q resident, k and v streamed; accumulates o
        resident, streamed, accumulator = block_m * block_d, block_n * (block_d + block_dv), block_m * block_dv
    elif kind == "dkdv":  # k and v resident, q and do streamed; accumulates dk and dv
        resident = accumulator = block_n * (block_d + block_dv)
        streamed = block_m * (block_d + block_dv)
    elif kind == "dq":  # q and do resident, k and v streamed; accumulates dq
        resident, streamed, accumulator = block_m * (block_d + block_dv), block_n * (block_d + block_dv), block_m * block_d
    else:
        raise ValueError(f"attention kernel kind must be one of {', '.join(ATTENTION_TUNED_KINDS)}; got {kind!r}")
    if num_warps == 8 and element_size == 2 and resident < ATTENTION_EIGHT_WARPS_TILE:
        return False
    if accumulator > ATTENTION_ACCUMULATOR_REGISTERS * threads:
        return False
    if block_m * block_n > ATTENTION_SCORE_REGISTERS * threads:
        return False
    return (resident + num_stages * streamed) * element_size <= shared_memory


def attention_configs(kind: str) -> list:
    """The space of one kernel handed to Triton's autotuner; attention_prune replaces it
    per call by the neighbourhood of the call's default."""
    space = _ATTENTION_SPACE[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in itertools.product(space["BLOCK_M"], space["BLOCK_N"],
                                                         space["num_warps"], space["num_stages"])]


def attention_autotune_configs(arch: int, kind: str, dtype, block_d: int, block_dv: int, causal: bool,
                               seqlen_q: int, seqlen_k: int) -> list:
    """At most ATTENTION_MAX_TUNE_CONFIGS configs of kernel `kind` worth timing for one
    call: the default entry first, then its neighbours (a tile side halved or doubled,
    num_stages and num_warps one step away) that pass attention_keep on `arch` and are
    no longer than the sequences need."""
    default = attention_default_config(arch, kind, dtype, max(block_d, block_dv), causal)
    m, n, warps, stages = (default[key] for key in _ATTENTION_KEYS)
    candidates = [(m, n, warps, stages), (m, n * 2, warps, stages), (m, n // 2, warps, stages),
                  (m * 2, n, warps, stages), (m // 2, n, warps, stages), (m, n, warps, stages + 1),
                  (m, n, warps, stages - 1), (m, n, 12 - warps, stages), (m * 2, n, 8, stages)]
    max_m = max(16, triton.next_power_of_2(seqlen_q))
    max_n = max(16, triton.next_power_of_2(seqlen_k))
    element_size = getattr(dtype, "itemsize", 2)
    kept = []
    for bm, bn, w, s in candidates:
        config = (bm, bn, w, s)
        if config in kept or not (16 <= bm <= 256 and 16 <= bn <= 256 and s >= 1):
            continue
        if config != candidates[0] and (bm > max_m or bn > max_n or not attention_keep(
                kind, bm, bn, w, s, block_d, block_dv, element_size, attention_shared_memory(arch))):
            continue
        kept.append(config)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in kept[:ATTENTION_MAX_TUNE_CONFIGS]]


def attention_prune(kind: str):
    """early_config_prune of kernel `kind`: attention_autotune_configs for the call (the
    arch of Q's GPU; tensors off the GPU, in tests, take FASTATTN_TRITON_ARCH or 90)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        if q.device.type == "cuda" or os.environ.get(TARGET_ARCH_ENV, "").strip():
            arch = target_arch(q.device)
        else:
            arch = 90
        return attention_autotune_configs(arch, kind, q.dtype, args["BLOCK_D"], args["BLOCK_DV"],
                                          bool(args.get("causal", 0)), args["seqlen_q"], args["seqlen_k"])

    return prune


def attention_pinned() -> Optional[dict]:
    """The keys pinned by FASTATTN_ATTENTION_CONFIG (only those given), or None."""
    text = os.environ.get(ATTENTION_CONFIG_ENV, "").strip()
    if not text:
        return None
    pinned = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _ATTENTION_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ATTENTION_CONFIG_ENV} must be comma-separated KEY=positive int with KEY in "
                             f"{', '.join(_ATTENTION_KEYS)}; got {text!r}")
        pinned[key] = int(value)
    for key in ("BLOCK_M", "BLOCK_N"):
        if key in pinned and (pinned[key] < 16 or pinned[key] & (pinned[key] - 1)):
            raise ValueError(f"{ATTENTION_CONFIG_ENV}: {key} must be a power of 2 >= 16; got {pinned[key]}")
    return pinned


def attention_launch_config(kind: str, device, dtype=None, head_dim: int = 0, causal: bool = False) -> Optional[dict]:
    """The config of one launch of kernel `kind` for tensors on `device`: the
    interpreter's or the default table's (attention_default_config for the device's
    compute capability), with FASTATTN_ATTENTION_CONFIG's keys on top; None to
    autotune (FASTATTN_AUTOTUNE=1, a tuned kind, nothing pinned)."""
    pinned = attention_pinned()
    if interpreted():
        config = dict(ATTENTION_INTERPRETER_CONFIG)
    elif pinned is None and kind in ATTENTION_TUNED_KINDS and autotune_enabled():
        return None
    else:
        config = attention_default_config(target_arch(device), kind, dtype, head_dim, causal)
    config.update(pinned or {})
    return {key: value for key, value in config.items() if key in _ATTENTION_KIND_KEYS[kind]}


# ============================================================================
# decode_attention (kernels/decode.py: the split-KV kernel and its combine kernel)
# ============================================================================
#
# One program runs BLOCK_M query rows (the q_len queries of the heads sharing one kv
# head; decode_attention_block_m) over one of NUM_SPLITS ranges of the cache in BLOCK_N
# key tiles. The tuned parameters are BLOCK_N, num_warps and num_stages, keyed on
# DECODE_ATTENTION_TUNE_KEY (a bucket of the keys per split, the tile widths and the
# flags; Triton adds the dtypes). NUM_SPLITS is not tuned: decode_attention_num_splits
# picks enough programs to fill the GPU (DECODE_ATTENTION_PROGRAMS_PER_SM) without
# splits shorter than DECODE_ATTENTION_MIN_SPLIT_KEYS. FASTATTN_DECODE_ATTENTION_CONFIG
# pins a config, e.g.
#     FASTATTN_DECODE_ATTENTION_CONFIG="BLOCK_N=64,NUM_SPLITS=8,num_warps=4,num_stages=2"
# where BLOCK_N, num_warps, num_stages left out take DECODE_ATTENTION_DEFAULT's values
# and NUM_SPLITS left out is picked as above. Under the Triton interpreter
# DECODE_ATTENTION_INTERPRETER_CONFIG is used without tuning (small tiles, and a small
# pretend GPU, so that the test caches span several tiles and splits).

DECODE_ATTENTION_CONFIG_ENV = "FASTATTN_DECODE_ATTENTION_CONFIG"
DECODE_ATTENTION_DEFAULT = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
DECODE_ATTENTION_INTERPRETER_CONFIG = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
DECODE_ATTENTION_TUNE_KEY = ("split_keys_bucket", "BLOCK_M", "BLOCK_D", "BLOCK_DV", "PAGED", "HAS_SOFTCAP",
                             "HAS_ALIBI")
DECODE_ATTENTION_MAX_BLOCK_M = 64  # most query rows per program (more rows of a kv head take more programs)
DECODE_ATTENTION_MAX_SPLITS = 128
DECODE_ATTENTION_MIN_SPLIT_KEYS = 256  # shortest cache range worth its own program (and partial output)
DECODE_ATTENTION_PROGRAMS_PER_SM = 4  # programs wanted in flight per SM (a memory-bound kernel)
DECODE_ATTENTION_INTERPRETER_SMS = 2  # the pretend GPU of the interpreter
DECODE_ATTENTION_INTERPRETER_MIN_SPLIT_KEYS = 32
DECODE_ATTENTION_COMBINE_SPLITS = 16  # partial outputs the combine kernel loads at once
DECODE_ATTENTION_SHARED_MEMORY = 200 * 1024  # bytes for the q tile + num_stages K/V tiles (H100: 227 KiB)
DECODE_ATTENTION_ACCUMULATOR_REGISTERS = 128  # most fp32 accumulator elements per thread
DECODE_ATTENTION_SPLIT_KEYS_BUCKETS = (64, 131072)  # keys-per-split bucket = next power of 2 in this range
_DECODE_ATTENTION_SPACE = dict(BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
_DECODE_ATTENTION_KEYS = ("BLOCK_N", "NUM_SPLITS", "num_warps", "num_stages")


def decode_attention_block_m(rows: int) -> int:
    """Query rows per program for `rows` = group·q_len rows per kv head (>= 16 for tl.dot)."""
    return min(DECODE_ATTENTION_MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))


def decode_attention_keep(block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int,
                          block_dv: int, element_size: int = 2) -> bool:
    """Whether a config is worth trying: the fp32 accumulators (output and score tiles)
    fit in registers, the staged K/V tiles in shared memory, and every warp has a K tile
    share of at least 8 elements per thread."""
    threads = 32 * num_warps
    if (block_m * block_dv + block_m * block_n) // threads > DECODE_ATTENTION_ACCUMULATOR_REGISTERS:
        return False
    if block_n * block_d // threads < 8:
        return False
    staged = block_m * block_d + num_stages * block_n * (block_d + block_dv)
    return staged * element_size <= DECODE_ATTENTION_SHARED_MEMORY


def decode_attention_configs() -> list:
    """The whole space; decode_attention_prune keeps what fits a call."""
    space = _DECODE_ATTENTION_SPACE
    return [triton.Config({"BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for n, warps, stages in itertools.product(space["BLOCK_N"], space["num_warps"], space["num_stages"])]


def decode_attention_prune(configs, named_args, **kwargs):
    """early_config_prune: decode_attention_keep for the call's tiles and dtype, key
    tiles no longer than a split (keeps at least one config)."""
    args = {**named_args, **kwargs}
    element_size = args["Q"].element_size()
    block_m, block_d, block_dv = args["BLOCK_M"], args["BLOCK_D"], args["BLOCK_DV"]
    fits = [c for c in configs
            if decode_attention_keep(block_m, c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, block_d, block_dv,
                                     element_size)]
    short = [c for c in fits if c.kwargs["BLOCK_N"] <= max(16, args["split_keys_bucket"])]
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_stages, c.num_warps))
    return short or fits[:1] or [smallest]


def decode_attention_split_keys_bucket(split_keys: int) -> int:
    low, high = DECODE_ATTENTION_SPLIT_KEYS_BUCKETS
    return min(high, max(low, triton.next_power_of_2(max(1, split_keys))))


def decode_attention_num_splits(programs: int, keys: int, sm_count: int) -> int:
    """Splits of the cache so that programs · splits fills sm_count SMs, each split at
    least DECODE_ATTENTION_MIN_SPLIT_KEYS long. `programs` = batch · kv_heads · row
    blocks, `keys` = the most keys one sequence attends to."""
    min_keys = DECODE_ATTENTION_INTERPRETER_MIN_SPLIT_KEYS if interpreted() else DECODE_ATTENTION_MIN_SPLIT_KEYS
    wanted = -(-sm_count * DECODE_ATTENTION_PROGRAMS_PER_SM // max(1, programs))
    return max(1, min(wanted, -(-keys // min_keys), DECODE_ATTENTION_MAX_SPLITS))


def decode_attention_pinned() -> Optional[dict]:
    """The keys pinned by FASTATTN_DECODE_ATTENTION_CONFIG (only those given), or None."""
    text = os.environ.get(DECODE_ATTENTION_CONFIG_ENV, "").strip()
    if not text:
        return None
    pinned = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _DECODE_ATTENTION_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{DECODE_ATTENTION_CONFIG_ENV} must be comma-separated KEY=positive int with KEY in "
                             f"{', '.join(_DECODE_ATTENTION_KEYS)}; got {text!r}")
        pinned[key] = int(value)
    if "BLOCK_N" in pinned and (pinned["BLOCK_N"] < 16 or pinned["BLOCK_N"] & (pinned["BLOCK_N"] - 1)):
        raise ValueError(f"{DECODE_ATTENTION_CONFIG_ENV}: BLOCK_N must be a power of 2 >= 16; got {pinned['BLOCK_N']}")
    if pinned.get("NUM_SPLITS", 1) > DECODE_ATTENTION_MAX_SPLITS:
        raise ValueError(f"{DECODE_ATTENTION_CONFIG_ENV}: NUM_SPLITS must be <= {DECODE_ATTENTION_MAX_SPLITS}; "
                         f"got {pinned['NUM_SPLITS']}")
    return pinned


def decode_attention_launch_config(programs: int, keys: int, sm_count: Optional[int]) -> tuple[int, Optional[dict]]:
    """(num_splits, config) for one launch: config is the pinned or interpreter
    (BLOCK_N, num_warps, num_stages), or None to autotune. sm_count None = the
    interpreter's pretend GPU."""
    pinned = decode_attention_pinned() or {}
    sms = DECODE_ATTENTION_INTERPRETER_SMS if sm_count is None else sm_count
    num_splits = pinned.pop("NUM_SPLITS", None) or decode_attention_num_splits(programs, keys, sms)
    if not pinned and not interpreted():
        return num_splits, None
    config = dict(DECODE_ATTENTION_INTERPRETER_CONFIG if interpreted() else DECODE_ATTENTION_DEFAULT)
    config.update(pinned)
    return num_splits, config
