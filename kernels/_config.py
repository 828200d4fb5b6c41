"""Launch configs of the Triton kernels: the one source of truth for tile sizes, warps
and stages, one delimited section per op after a common one.

Each section holds a default table (one config per GPU family, kernel, dtype and size
bucket: what every launch uses, so that a first call compiles one variant), the small
autotune space that FASTATTN_AUTOTUNE=1 searches instead (at most 8 configs per key,
pruned by a keep() filter), the interpreter's small config (CPU tests), and the
FASTATTN_<OP>_CONFIG variable that pins keys over the default (tests).
"""

from __future__ import annotations

import functools
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
    """The compute capability (major*10 + minor: 90 for an H100/H200) whose configs and
    limits a call on `device` gets: FASTATTN_TRITON_ARCH when set; else 90 for tensors
    off the GPU (the interpreter's CPU tensors and the stand-ins of tests, whose configs
    are never compiled for a GPU); else the CUDA device's (None: the current one)."""
    text = os.environ.get(TARGET_ARCH_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 80:
            raise ValueError(f"{TARGET_ARCH_ENV} must be a compute capability like 80 or 90 (>= 80); got {text!r}")
        return int(text)
    if device is not None and getattr(device, "type", "cuda") != "cuda":
        return 90
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def shared_memory_per_block(arch: int) -> int:
    """Bytes of shared memory one block may use on compute capability `arch` (the opt-in
    maximum): 227 KB on sm_90 and sm_100, 163 KB on sm_80 and sm_87, 99 KB on sm_86,
    sm_89 and sm_120 (and any other)."""
    kb = {80: 163, 87: 163, 90: 227, 100: 227, 103: 227}.get(arch, 99)
    return kb * 1024


def on_tensor_device(launcher):
    """`launcher` run with its first tensor argument's CUDA device current. Triton launches
    on the current device and its current stream, which need not be the tensors' (a model
    split over GPUs in one process, as transformers' device_map="auto" does)."""
    import torch

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if tensor is None or tensor.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(*args, **kwargs)

    return launch


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
# chunks. A config is ROWS (rows per tile) and num_warps.
#
# Default (no tuning): layer_norm_default, a rule on the tile width: ROWS packs short rows
# until a tile holds LAYER_NORM_MIN_TILE elements, and num_warps gives every thread
# LAYER_NORM_DEFAULT_ELEMENTS_PER_THREAD of them (in the forward 8: 16 bytes of a 16-bit
# row, one 128-bit load; 16 or 32 in the backward). It is the same for sm80 and sm90: both
# have 64K registers and 2048 threads per SM, and the kernels use no shared memory beyond
# the reductions' scratch; none spills on sm_90 or sm_80 (benchmarks/NOTES.md). The
# backward runs a persistent grid of layer_norm_backward_programs programs.
# FASTATTN_AUTOTUNE=1 tunes (ROWS, num_warps) over the configs layer_norm_keep admits (at
# most 8 per tile width), keyed on hidden and the flags. FASTATTN_LAYER_NORM_CONFIG pins
# one config for both ops, e.g.
#     FASTATTN_LAYER_NORM_CONFIG="BLOCK_N=256,ROWS=4,num_warps=4"
# where BLOCK_N caps the tile width (rows wider than it take the looped path); keys left
# out take the default's values. Under the Triton interpreter a fixed config of few, big
# programs is used.

LAYER_NORM_CONFIG_ENV = "FASTATTN_LAYER_NORM_CONFIG"
LAYER_NORM_MAX_FUSED_FWD = 16384  # widest row kept in registers by the forward (elements)
LAYER_NORM_MAX_FUSED_BWD = 8192  # the backward holds s, dy, g, x̂ and the dw/db sums per element
LAYER_NORM_LOOP_BLOCK_N = 4096  # chunk width of the looped path
LAYER_NORM_MIN_TILE = 2048  # elements per tile worth a program (when hidden allows)
LAYER_NORM_MAX_TILE = {False: 16384, True: 8192}  # by backward
# elements per thread of the default, by (backward, single_pass): fewer warps for the
# backward, which holds more per element (at 8 per thread its tiles spill on sm_80 or sm_90)
LAYER_NORM_DEFAULT_ELEMENTS_PER_THREAD = {(False, True): 8, (False, False): 8, (True, True): 16, (True, False): 32}
LAYER_NORM_ELEMENTS_PER_THREAD = {False: (4, 32), True: (4, 32)}  # range autotuning tries, by backward
LAYER_NORM_BWD_PROGRAMS_PER_SM = 4  # most persistent backward programs per SM ...
LAYER_NORM_BWD_MIN_ROWS_PER_PROGRAM = 32  # ... while each still gets this many rows (bounds the dW/dB partials)
LAYER_NORM_INTERPRETER_BWD_PROGRAMS = 3  # persistent backward grid under the interpreter
LAYER_NORM_INTERPRETER_TILE = 32768  # elements per program under the interpreter (fewer, bigger programs)
_LAYER_NORM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
_LAYER_NORM_WARPS = (1, 2, 4, 8, 16)
_LAYER_NORM_KEYS = ("BLOCK_N", "ROWS", "num_warps", "num_stages")
_LAYER_NORM_AUTOTUNE_MAX = 8  # most configs tried per key


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
    """early_config_prune for the forward (backward=False) or backward kernel: the configs
    layer_norm_keep admits for the call's tile width, at most _LAYER_NORM_AUTOTUNE_MAX of
    them (the ones nearest the default's elements per thread), the default included."""

    def prune(configs, named_args, **kwargs):
        block_n, single_pass = kwargs["BLOCK_N"], kwargs["SINGLE_PASS"]
        default = layer_norm_rule(block_n, single_pass, backward)
        kept = [c for c in configs
                if layer_norm_keep(c.kwargs["ROWS"], c.num_warps, block_n, single_pass, backward)]

        def distance(c):  # from the default, in log2 steps of tile and of elements per thread
            tile, per_thread = c.kwargs["ROWS"] * block_n, c.kwargs["ROWS"] * block_n // (32 * c.num_warps)
            default_tile = default["ROWS"] * block_n
            default_per_thread = default_tile // (32 * default["num_warps"])
            return (abs(tile.bit_length() - default_tile.bit_length())
                    + abs(per_thread.bit_length() - default_per_thread.bit_length()), tile, c.num_warps)

        kept = sorted(kept, key=distance)[:_LAYER_NORM_AUTOTUNE_MAX]
        return kept or [triton.Config({"ROWS": default["ROWS"]}, num_warps=default["num_warps"])]

    return prune


def layer_norm_rule(block_n: int, single_pass: bool, backward: bool) -> dict:
    """The default (ROWS, num_warps) for tiles BLOCK_N wide, on any GPU."""
    max_tile = LAYER_NORM_MAX_TILE[backward]
    rows = max(1, min(_LAYER_NORM_ROWS[-1], LAYER_NORM_MIN_TILE // block_n if single_pass else 1))
    if rows * block_n > max(max_tile, block_n):
        rows = 1
    warps = rows * block_n // (32 * LAYER_NORM_DEFAULT_ELEMENTS_PER_THREAD[backward, single_pass])
    return {"ROWS": rows, "num_warps": min(_LAYER_NORM_WARPS[-1], max(1, warps))}


def layer_norm_default(block_n: int, single_pass: bool, backward: bool) -> dict:
    """The config used without tuning: the interpreter's (fewer, bigger programs), else
    layer_norm_rule's."""
    if interpreted():
        rows = max(1, min(_LAYER_NORM_ROWS[-1], LAYER_NORM_INTERPRETER_TILE // block_n))
        return {"ROWS": rows if single_pass else 1, "num_warps": 4}
    return layer_norm_rule(block_n, single_pass, backward)


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
    """(BLOCK_N, config) for one launch: config is the pinned config (keys left out from
    the default), None to autotune (FASTATTN_AUTOTUNE=1), or the default (ROWS,
    num_warps). The default does not depend on the GPU (layer_norm_rule)."""
    pinned = layer_norm_pinned()
    block_n = layer_norm_block_n(hidden, backward)
    if pinned is not None and "BLOCK_N" in pinned:
        block_n = min(triton.next_power_of_2(hidden), pinned["BLOCK_N"])
    if pinned is None and autotune_enabled():
        return block_n, None
    config = layer_norm_default(block_n, block_n >= hidden, backward)
    config.update({k: v for k, v in (pinned or {}).items() if k != "BLOCK_N"})
    return block_n, config


def layer_norm_backward_programs(rows: int, sm_count: Optional[int]) -> int:
    """Size of the backward's persistent grid (sm_count None: the interpreter): up to
    LAYER_NORM_BWD_PROGRAMS_PER_SM programs per SM while each gets at least
    LAYER_NORM_BWD_MIN_ROWS_PER_PROGRAM rows, never fewer than one per SM, never more
    than rows. Each program writes one row of the (programs, hidden) fp32 dW and dB
    partials, which torch then sums: the rows-per-program floor keeps that write and
    re-read under a tenth of the backward's own traffic (16 bytes per column per program
    against at least 6 per column per row). The count depends on the device and rows only,
    so the reduction order (and the result) is the same from call to call."""
    if sm_count is None:
        programs = LAYER_NORM_INTERPRETER_BWD_PROGRAMS
    else:
        programs = max(sm_count, min(sm_count * LAYER_NORM_BWD_PROGRAMS_PER_SM,
                                     rows // LAYER_NORM_BWD_MIN_ROWS_PER_PROGRAM))
    return max(1, min(programs, rows))


# ============================================================================
# ffn / gated_ffn (kernels/ffn.py: five GEMM kernels with different epilogues)
# ============================================================================
#
# Every kernel of kernels/ffn.py is a tiled GEMM C (M, N) = A (M, K)·B (K, N) plus an
# epilogue: "fwd" (bias and activation), "gated_fwd" (two accumulators, gate and up, on
# the same A tiles), "dact" (loads H, writes dH and act(H)), "dgated" (loads G and U,
# writes dG, dU and P), "dw" (weight gradients: K = tokens, and the bias gradient's row
# sums) and "dx" (the input gradient, one or two products). A config is the tile (BLOCK_M, BLOCK_N, BLOCK_K), GROUP_M
# (tile rows visited together so the B tiles of a group stay in L2), num_warps and
# num_stages.
#
# Default (no tuning): FFN_DEFAULTS[(family, operands)][class], where family is
# arch_family's ("sm80", "sm90"), operands "16bit" (fp16, bf16) or "fp32" (tf32 or
# ieee), and the class comes from the kernel (FFN_CONFIG_CLASS: plain epilogue, an
# activation, an activation gradient, two accumulators), or is "small" when C has at
# most FFN_SMALL_M rows (a handful of tokens: more, narrower tiles over the weights).
# The sm90 plain GEMM is the 128×256×64, 8-warp, 3-stage tile of Triton's matmul
# tutorial; the epilogue kernels take narrower tiles because their epilogue math
# (erf, sigmoid, two or three stores) spills at 128 accumulators per thread; the sm80
# tiles fit the 99 KB of shared memory of sm_86/sm_89 as well as the A100's 163 KB.
# None spills registers on sm_90 or sm_80 (benchmarks/NOTES.md). A GPU with less shared
# memory than its family's default needs (ffn_shared_memory) gets fewer stages
# (ffn_fit_stages).
# FASTATTN_AUTOTUNE=1 tunes over FFN_AUTOTUNE_SPACE[family] (8 tiles, fewer after
# pruning for the call), keyed on the power-of-2 buckets of (M, N, K) (Triton adds the
# operand dtypes), so that a new token count does not retune; results are cached on disk.
# FASTATTN_FFN_CONFIG pins one config for all of them, e.g.
#     FASTATTN_FFN_CONFIG="BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,GROUP_M=8,num_warps=4,num_stages=3"
# where keys left out take the call's default. Under the Triton interpreter
# FFN_INTERPRETER_CONFIG is used (small tiles, so that the test shapes still cover
# several tiles and masked edges).

FFN_CONFIG_ENV = "FASTATTN_FFN_CONFIG"
FFN_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4,
                          "num_stages": 1}
# kernel (as kernels/ffn.py launches it) -> config class; "out" is the forward kernel
# without activation (the second GEMM)
FFN_CONFIG_CLASS = {"fwd": "act", "out": "plain", "gated_fwd": "gated", "dact": "grad", "dgated": "grad",
                    "dw": "plain", "dx": "plain"}
FFN_KERNELS = tuple(FFN_CONFIG_CLASS)
FFN_GROUP_M = 8
FFN_SMALL_M = 64  # C with at most this many rows takes the "small" default
_FFN_FP32 = (64, 64, 32, 8, 3)  # every class: 16 accumulators per thread, no spills with tf32 or ieee
# (family, operands) -> class -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
FFN_DEFAULTS = {
    ("sm90", "16bit"): {"plain": (128, 256, 64, 8, 3), "act": (128, 128, 64, 8, 4), "grad": (128, 64, 64, 8, 4),
                        "gated": (128, 64, 64, 8, 4), "small": (64, 64, 64, 4, 4)},
    ("sm90", "fp32"): dict.fromkeys(("plain", "act", "grad", "gated", "small"), _FFN_FP32),
    ("sm80", "16bit"): {"plain": (128, 128, 32, 8, 4), "act": (128, 128, 32, 8, 4), "grad": (128, 64, 32, 8, 4),
                        "gated": (128, 128, 32, 8, 4), "small": (64, 64, 64, 4, 3)},
    ("sm80", "fp32"): dict.fromkeys(("plain", "act", "grad", "gated", "small"), _FFN_FP32),
}
# family -> the tiles FASTATTN_AUTOTUNE=1 tries: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
FFN_AUTOTUNE_SPACE = {
    "sm90": ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4),
             (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
    "sm80": ((128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 32, 4, 4),
             (128, 64, 32, 8, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4)),
}
FFN_ACCUMULATOR_REGISTERS = (32, 128)  # fp32 accumulator elements per thread worth trying
FFN_MIN_STAGES = 2
_FFN_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def ffn_accumulators(kernel: str) -> int:
    """(BLOCK_M, BLOCK_N) fp32 accumulators kernel `kernel` holds (and B tiles it streams)."""
    if kernel not in FFN_CONFIG_CLASS:
        raise ValueError(f"ffn kernel must be one of {', '.join(FFN_KERNELS)}; got {kernel!r}")
    return 2 if FFN_CONFIG_CLASS[kernel] == "gated" else 1


def ffn_shared_memory(block_m: int, block_n: int, block_k: int, num_stages: int, accumulators: int,
                      element_size: int) -> int:
    """Bytes of the num_stages buffered A and B tiles (what Triton's pipeliner allocates;
    the epilogue reuses them)."""
    return num_stages * block_k * (block_m + accumulators * block_n) * element_size


def ffn_keep(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
             accumulators: int = 1, element_size: int = 2, arch: int = 90) -> bool:
    """Whether a GEMM config is worth trying on compute capability `arch`: the fp32
    accumulators fit the register budget and the staged tiles the shared memory."""
    per_thread = accumulators * block_m * block_n // (32 * num_warps)
    low, high = FFN_ACCUMULATOR_REGISTERS
    if not low <= per_thread <= high:
        return False
    staged = ffn_shared_memory(block_m, block_n, block_k, num_stages, accumulators, element_size)
    return staged <= shared_memory_per_block(arch)


def ffn_configs(kernel: str = "fwd", family: str = "sm90") -> list:
    """The autotune space of `kernel` on `family` (at most 8 configs); ffn_prune narrows
    it per call."""
    accumulators = ffn_accumulators(kernel)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": FFN_GROUP_M},
                      num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in FFN_AUTOTUNE_SPACE[family]
        if ffn_keep(m, n, k, warps, stages, accumulators, 2, 90 if family == "sm90" else 80)
    ]


def ffn_prune(kernel: str):
    """early_config_prune: the configs that fit the call's operands (element size) and GPU
    (shared memory), tiles no taller than the problem (keeps at least one config)."""
    accumulators = ffn_accumulators(kernel)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        operand = next(v for v in args.values() if hasattr(v, "element_size"))
        arch = target_arch(operand.device)
        max_m = max(FFN_SMALL_M, triton.next_power_of_2(args["M"]))
        kept = [
            c for c in configs
            if c.kwargs["BLOCK_M"] <= max_m
            and ffn_keep(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                         c.num_stages, accumulators, operand.element_size(), arch)
        ]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    return prune


def ffn_fit_stages(config: dict, accumulators: int, element_size: int, arch: int) -> dict:
    """config with num_stages lowered (to FFN_MIN_STAGES at least) until its staged tiles
    fit the shared memory of `arch`."""
    fitted = dict(config)
    while fitted["num_stages"] > FFN_MIN_STAGES and ffn_shared_memory(
            fitted["BLOCK_M"], fitted["BLOCK_N"], fitted["BLOCK_K"], fitted["num_stages"], accumulators,
            element_size) > shared_memory_per_block(arch):
        fitted["num_stages"] -= 1
    return fitted


def ffn_default(kernel: str, arch: int, dtype, M: int) -> dict:
    """The default config of `kernel` on compute capability `arch` for operands of
    torch dtype `dtype` and an output of M rows."""
    accumulators = ffn_accumulators(kernel)
    operands = "fp32" if dtype.itemsize == 4 else "16bit"
    kind = "small" if M <= FFN_SMALL_M else FFN_CONFIG_CLASS[kernel]
    m, n, k, warps, stages = FFN_DEFAULTS[(arch_family(arch), operands)][kind]
    config = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": FFN_GROUP_M, "num_warps": warps,
              "num_stages": stages}
    return ffn_fit_stages(config, accumulators, dtype.itemsize, arch)


def ffn_pinned_config() -> Optional[dict]:
    """The keys pinned by FASTATTN_FFN_CONFIG (only those given), or None."""
    text = os.environ.get(FFN_CONFIG_ENV, "").strip()
    if not text:
        return None
    pinned = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _FFN_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{FFN_CONFIG_ENV} must be comma-separated KEY=positive int with KEY in "
                             f"{', '.join(_FFN_KEYS)}; got {text!r}")
        pinned[key] = int(value)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if key in pinned and (pinned[key] < 16 or pinned[key] & (pinned[key] - 1)):
            raise ValueError(f"{FFN_CONFIG_ENV}: {key} must be a power of 2 >= 16; got {pinned[key]}")
    return pinned


def ffn_launch_config(kernel: str, device, dtype, M: int) -> Optional[dict]:
    """The config of one launch of `kernel` with operands of `dtype` on `device` and an
    output of M rows: the pinned keys over the default, None to autotune
    (FASTATTN_AUTOTUNE=1, nothing pinned), the interpreter's config, or the default of
    the device's architecture (target_arch)."""
    pinned = ffn_pinned_config()
    if pinned is None and autotune_enabled():
        return None
    if interpreted():
        config = dict(FFN_INTERPRETER_CONFIG)
    else:
        config = ffn_default(kernel, target_arch(device), dtype, M)
    config.update(pinned or {})
    return config


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
# within its 227 KB of shared memory per block (a bias with dropout takes the smaller dK/dV
# tile of ATTENTION_DEFAULTS_BIAS_AND_DROPOUT); the sm80 entries compiled for sm_80 within
# 99 KB, the limit of the 8.6 and 8.9 parts, so that one entry serves every 8.x GPU
# (checked there with bias, dropout, softcap and ALiBi together). `python -m
# fastattn.kernels.aot` checks them. The exception is fp32 dK/dV at head-dim bucket 256,
# which spills about 750 bytes with any tile (its ieee dots hold 256-long operand rows in
# registers; fp32 is the exact path, not the fast one; aot.ALLOWED_SPILLS names it). The
# entries follow Triton's tutorial 06 (forward 128x64) and FlashAttention-2's 8-warp
# backward; the dK/dV program holds K, V, dK and dV, so its tiles are smaller than the
# tutorial's 32x128 and it runs unpipelined (num_stages 1): pipelined 4-warp dK/dV configs
# spill. None is tuned on a GPU yet. Causal and non-causal calls share the entries (causal
# is a key of the table all the same, so a tuned entry can split them).
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
# the entries that replace ATTENTION_DEFAULTS' when a bias (float or bool) and dropout are
# both on: their extra registers (the bias tile, the keep bytes) spill sm90's 16x64 dK/dV
# program at head dims 96-128, so its key tile halves (as FlashAttention-2 takes smaller
# tiles with dropout at some head dims)
ATTENTION_DEFAULTS_BIAS_AND_DROPOUT = {
    ("sm90", "dkdv"): {128: (16, 32, 8, 1)},
}
# kind -> {head-dim bucket: config} for fp32 inputs, every family: ieee dots on the FMA
# units hold whole operand rows in registers, hence the small tiles
ATTENTION_DEFAULTS_FP32 = {
    "fwd": {64: (32, 16, 4, 1), 128: (16, 32, 8, 1), 256: (32, 16, 8, 1)},
    "bwd_preprocess": {64: (128, 0, 4, 1), 128: (64, 0, 4, 1), 256: (32, 0, 4, 1)},
    "dkdv": {64: (16, 16, 4, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    "dq": {64: (16, 32, 4, 1), 128: (16, 32, 8, 1), 256: (16, 16, 4, 1)},
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


def attention_default_config(arch: int, kind: str, dtype=None, head_dim: int = 0, causal: bool = False,
                             bias_and_dropout: bool = False) -> dict:
    """The table's config of kernel `kind` for compute capability `arch`, inputs of
    `dtype` (a torch dtype; None for the dropout mask) and max(head_dim, head_dim_v),
    with ATTENTION_DEFAULTS_BIAS_AND_DROPOUT's entry when a bias and dropout are both on.
    `causal` is part of the key; the entries do not differ by it yet."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kernel kind must be one of {', '.join(ATTENTION_KINDS)}; got {kind!r}")
    bucket = attention_head_dim_bucket(head_dim)
    family = arch_family(arch)
    heavy = ATTENTION_DEFAULTS_BIAS_AND_DROPOUT.get((family, kind), {}) if bias_and_dropout else {}
    if dtype is not None and getattr(dtype, "itemsize", 2) == 4:
        entry = ATTENTION_DEFAULTS_FP32[kind][bucket]
    elif bucket in heavy:
        entry = heavy[bucket]
    else:
        entry = ATTENTION_DEFAULTS[(family, kind)][bucket]
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
                               seqlen_q: int, seqlen_k: int, bias_and_dropout: bool = False) -> list:
    """At most ATTENTION_MAX_TUNE_CONFIGS configs of kernel `kind` worth timing for one
    call: the default entry first, then its neighbours (a tile side halved or doubled,
    num_stages and num_warps one step away) that pass attention_keep on `arch` and are
    no longer than the sequences need."""
    default = attention_default_config(arch, kind, dtype, max(block_d, block_dv), causal, bias_and_dropout)
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
        return attention_autotune_configs(target_arch(q.device), kind, q.dtype, args["BLOCK_D"], args["BLOCK_DV"],
                                          bool(args.get("causal", 0)), args["seqlen_q"], args["seqlen_k"],
                                          attention_bias_and_dropout(args))

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


def attention_bias_and_dropout(args: dict) -> bool:
    """Whether a launch's arguments switch on a bias (BIAS_KIND) and dropout together."""
    return bool(args.get("BIAS_KIND", 0)) and bool(args.get("HAS_DROPOUT", False))


def attention_launch_config(kind: str, device, dtype=None, head_dim: int = 0, causal: bool = False,
                            bias_and_dropout: bool = False) -> Optional[dict]:
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
        config = attention_default_config(target_arch(device), kind, dtype, head_dim, causal, bias_and_dropout)
    config.update(pinned or {})
    return {key: value for key, value in config.items() if key in _ATTENTION_KIND_KEYS[kind]}


# ============================================================================
# decode_attention (kernels/decode.py: the split-KV kernel and its combine kernel)
# ============================================================================
#
# One program runs BLOCK_M query rows (the q_len queries of the heads sharing one kv
# head; decode_attention_block_m) over one of NUM_SPLITS ranges of the cache in BLOCK_N
# key tiles. A config is BLOCK_N, num_warps and num_stages. NUM_SPLITS is not tuned:
# decode_attention_num_splits picks enough programs to fill the GPU
# (DECODE_ATTENTION_PROGRAMS_PER_SM) without splits shorter than
# DECODE_ATTENTION_MIN_SPLIT_KEYS, from the shapes and the cache capacity only (never
# from cache_seqlens, which would need the host to read the device).
#
# Default (no tuning): DECODE_ATTENTION_DEFAULTS[(family, operands, head-dim bucket)]
# for 16 query rows per program, operands "16bit" or "fp32", the bucket max(BLOCK_D,
# BLOCK_DV) (64, 128 or 256); with more rows, 8 warps where the program's fp32
# accumulators (output and score rows) would pass DECODE_ATTENTION_DEFAULT_ACCUMULATORS
# per thread, and 16-key tiles for fp32 (whose FMA dot holds q, K and the scores in
# registers; fp32 also takes at most 32 rows per program at head dim 256). The kernel is
# memory-bound: the sm90 16-bit tiles keep three 16 KB K/V tiles in flight per program at
# head dims 64 and 128, two at 256 (its 8-warp 3-stage config spilled with paging, softcap
# and ALiBi on); the sm80 ones stay within the 99 KB of sm_86/sm_89; none spills on sm_90 or
# sm_80 (benchmarks/NOTES.md). The combine kernel takes decode_attention_combine_config.
# FASTATTN_AUTOTUNE=1 tunes over DECODE_ATTENTION_AUTOTUNE_SPACE (8 configs, fewer after
# pruning), keyed on DECODE_ATTENTION_TUNE_KEY (a bucket of the keys per split, the tile
# widths and the flags; Triton adds the dtypes); results are cached on disk.
# FASTATTN_DECODE_ATTENTION_CONFIG pins a config, e.g.
#     FASTATTN_DECODE_ATTENTION_CONFIG="BLOCK_N=64,NUM_SPLITS=8,num_warps=4,num_stages=2"
# where BLOCK_N, num_warps, num_stages left out take the default's values and
# NUM_SPLITS left out is picked as above. Under the Triton interpreter
# DECODE_ATTENTION_INTERPRETER_CONFIG is used (small tiles, and a small pretend GPU, so
# that the test caches span several tiles and splits).

DECODE_ATTENTION_CONFIG_ENV = "FASTATTN_DECODE_ATTENTION_CONFIG"
DECODE_ATTENTION_INTERPRETER_CONFIG = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
# (family, operands, head-dim bucket) -> (BLOCK_N, num_warps, num_stages)
DECODE_ATTENTION_DEFAULTS = {
    ("sm90", "16bit", 64): (128, 4, 3),
    ("sm90", "16bit", 128): (64, 4, 3),
    ("sm90", "16bit", 256): (32, 4, 2),
    ("sm90", "fp32", 64): (32, 8, 2),
    ("sm90", "fp32", 128): (32, 8, 2),
    ("sm90", "fp32", 256): (32, 8, 2),
    ("sm80", "16bit", 64): (64, 4, 3),
    ("sm80", "16bit", 128): (64, 4, 2),
    ("sm80", "16bit", 256): (32, 8, 2),
    ("sm80", "fp32", 64): (32, 4, 2),
    ("sm80", "fp32", 128): (32, 8, 2),
    ("sm80", "fp32", 256): (16, 8, 2),
}
# (BLOCK_N, num_warps, num_stages) that FASTATTN_AUTOTUNE=1 tries
DECODE_ATTENTION_AUTOTUNE_SPACE = ((32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (128, 4, 2), (32, 8, 2),
                                   (64, 8, 2), (128, 8, 2))
DECODE_ATTENTION_TUNE_KEY = ("split_keys_bucket", "BLOCK_M", "BLOCK_D", "BLOCK_DV", "PAGED", "HAS_SOFTCAP",
                             "HAS_ALIBI")
DECODE_ATTENTION_MAX_BLOCK_M = 64  # most query rows per program (more rows of a kv head take more programs)
DECODE_ATTENTION_MAX_BLOCK_M_FP32_D256 = 32  # fp32 at head dim 256: q and the output rows fill the registers
DECODE_ATTENTION_MAX_SPLITS = 128
DECODE_ATTENTION_MIN_SPLIT_KEYS = 256  # shortest cache range worth its own program (and partial output)
DECODE_ATTENTION_PROGRAMS_PER_SM = 4  # programs wanted in flight per SM (a memory-bound kernel)
DECODE_ATTENTION_INTERPRETER_SMS = 2  # the pretend GPU of the interpreter
DECODE_ATTENTION_INTERPRETER_MIN_SPLIT_KEYS = 32
DECODE_ATTENTION_COMBINE_SPLITS = 16  # partial outputs the combine kernel loads at once
DECODE_ATTENTION_ACCUMULATOR_REGISTERS = 128  # most fp32 accumulator elements per thread (autotuning)
DECODE_ATTENTION_DEFAULT_ACCUMULATORS = 64  # the default goes to 8 warps above this (a margin from 255 registers)
DECODE_ATTENTION_SPLIT_KEYS_BUCKETS = (64, 131072)  # keys-per-split bucket = next power of 2 in this range
_DECODE_ATTENTION_KEYS = ("BLOCK_N", "NUM_SPLITS", "num_warps", "num_stages")


def decode_attention_block_m(rows: int, element_size: int = 2, block_d: int = 128) -> int:
    """Query rows per program for `rows` = group·q_len rows per kv head (>= 16 for tl.dot),
    operands of element_size bytes and the padded head dim block_d (the larger of q/k's
    and v's)."""
    most = DECODE_ATTENTION_MAX_BLOCK_M
    if element_size == 4 and block_d > 128:
        most = DECODE_ATTENTION_MAX_BLOCK_M_FP32_D256
    return min(most, max(16, triton.next_power_of_2(rows)))


def decode_attention_shared_memory(block_m: int, block_n: int, num_stages: int, block_d: int, block_dv: int,
                                   element_size: int) -> int:
    """Bytes of the q tile and the num_stages buffered K and V tiles."""
    return (block_m * block_d + num_stages * block_n * (block_d + block_dv)) * element_size


def decode_attention_keep(block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int,
                          block_dv: int, element_size: int = 2, arch: int = 90) -> bool:
    """Whether a config is worth trying: the fp32 accumulators (output and score tiles)
    fit in registers, the staged K/V tiles in the shared memory of `arch`, and every warp
    has a K tile share of at least 8 elements per thread."""
    threads = 32 * num_warps
    if (block_m * block_dv + block_m * block_n) // threads > DECODE_ATTENTION_ACCUMULATOR_REGISTERS:
        return False
    if block_n * block_d // threads < 8:
        return False
    staged = decode_attention_shared_memory(block_m, block_n, num_stages, block_d, block_dv, element_size)
    return staged <= shared_memory_per_block(arch)


def decode_attention_configs() -> list:
    """The autotune space (8 configs); decode_attention_prune keeps what fits a call."""
    return [triton.Config({"BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for n, warps, stages in DECODE_ATTENTION_AUTOTUNE_SPACE]


def decode_attention_prune(configs, named_args, **kwargs):
    """early_config_prune: decode_attention_keep for the call's tiles, dtype and GPU, key
    tiles no longer than a split (keeps at least one config)."""
    args = {**named_args, **kwargs}
    element_size = args["Q"].element_size()
    arch = target_arch(args["Q"].device)
    block_m, block_d, block_dv = args["BLOCK_M"], args["BLOCK_D"], args["BLOCK_DV"]
    fits = [c for c in configs
            if decode_attention_keep(block_m, c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, block_d, block_dv,
                                     element_size, arch)]
    short = [c for c in fits if c.kwargs["BLOCK_N"] <= max(16, args["split_keys_bucket"])]
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_stages, c.num_warps))
    return short or fits[:1] or [smallest]


def decode_attention_default(arch: int, dtype, block_m: int, block_d: int, block_dv: int) -> dict:
    """The default (BLOCK_N, num_warps, num_stages) on compute capability `arch` for
    caches of torch dtype `dtype`, BLOCK_M query rows and padded head dims."""
    operands = "fp32" if dtype.itemsize == 4 else "16bit"
    bucket = min(256, max(64, block_d, block_dv))
    block_n, warps, stages = DECODE_ATTENTION_DEFAULTS[(arch_family(arch), operands, bucket)]
    if operands == "fp32" and block_m > 16:
        block_n = 16
    if (block_m * block_dv + block_m * block_n) // (32 * warps) > DECODE_ATTENTION_DEFAULT_ACCUMULATORS:
        warps = 8
    while stages > 1 and decode_attention_shared_memory(block_m, block_n, stages, block_d, block_dv,
                                                        dtype.itemsize) > shared_memory_per_block(arch):
        stages -= 1
    return {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def decode_attention_combine_config(block_dv: int) -> dict:
    """The combine kernel's launch config: BLOCK_S partial outputs of BLOCK_DV fp32 per step."""
    return {"BLOCK_S": DECODE_ATTENTION_COMBINE_SPLITS, "num_warps": 4 if block_dv >= 128 else 2}


def decode_attention_split_keys_bucket(split_keys: int) -> int:
    low, high = DECODE_ATTENTION_SPLIT_KEYS_BUCKETS
    return min(high, max(low, triton.next_power_of_2(max(1, split_keys))))


def decode_attention_num_splits(programs: int, keys: int, sm_count: int) -> int:
    """Splits of the cache so that programs · splits fills sm_count SMs, each split at
    least DECODE_ATTENTION_MIN_SPLIT_KEYS long. `programs` = batch · kv_heads · row
    blocks, `keys` = the most keys one sequence can attend to (from the capacity)."""
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


def decode_attention_launch_config(device, dtype, block_m: int, block_d: int, block_dv: int, programs: int,
                                   keys: int, sm_count: Optional[int]) -> tuple[int, Optional[dict]]:
    """(num_splits, config) for one launch on `device` with caches of `dtype`: config is
    the pinned keys over the default (BLOCK_N, num_warps, num_stages), None to autotune
    (FASTATTN_AUTOTUNE=1, no tile pinned), the interpreter's config, or the default of the
    device's architecture. sm_count None = the interpreter's pretend GPU."""
    pinned = decode_attention_pinned() or {}
    sms = DECODE_ATTENTION_INTERPRETER_SMS if sm_count is None else sm_count
    num_splits = pinned.pop("NUM_SPLITS", None) or decode_attention_num_splits(programs, keys, sms)
    if not pinned and autotune_enabled():
        return num_splits, None
    if interpreted():
        config = dict(DECODE_ATTENTION_INTERPRETER_CONFIG)
    else:
        config = decode_attention_default(target_arch(device), dtype, block_m, block_d, block_dv)
    config.update(pinned)
    return num_splits, config
