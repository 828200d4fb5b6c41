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
# attention (kernels/attention.py: the forward, backward dK/dV and backward dQ kernels)
# ============================================================================
#
# The tuned parameters are the tile (BLOCK_M query rows, BLOCK_N key columns), num_warps
# and num_stages, one space per kernel ("fwd", "dkdv", "dq"), keyed on the padded head
# dims, causal, the option flags and a seqlen bucket (ATTENTION_TUNE_KEY; Triton adds the
# dtypes). FASTATTN_ATTENTION_CONFIG pins one config for every attention kernel, e.g.
#     FASTATTN_ATTENTION_CONFIG="BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1"
# where keys left out take ATTENTION_DEFAULT's values. Under the Triton interpreter
# ATTENTION_INTERPRETER_CONFIG is used without tuning (small tiles, so that the test
# shapes cover several tiles, the full and the masked ones). The untuned kernels (the
# backward preprocess and dbias) use the pinned config or ATTENTION_DEFAULT.

ATTENTION_CONFIG_ENV = "FASTATTN_ATTENTION_CONFIG"
ATTENTION_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
ATTENTION_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
ATTENTION_TUNE_KEY = ("seqlen_bucket", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_SOFTCAP", "HAS_ALIBI",
                      "BIAS_KIND", "HAS_DROPOUT")
ATTENTION_SHARED_MEMORY = 200 * 1024  # bytes for resident + num_stages buffered tiles (H100: 227 KiB)
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


def attention_seqlen_bucket(seqlen_q: int, seqlen_k: int) -> int:
    low, high = ATTENTION_SEQLEN_BUCKETS
    return min(high, max(low, triton.next_power_of_2(max(seqlen_q, seqlen_k))))


def attention_keep(kind: str, block_m: int, block_n: int, num_warps: int, num_stages: int,
                   block_d: int, block_dv: int, element_size: int = 2) -> bool:
    """Whether a config of kernel `kind` is worth trying for (padded) head dims
    block_d / block_dv and operands of element_size bytes: the staged tiles fit in shared
    memory, the fp32 accumulators and the score tile in registers, and 8 warps only for
    tiles big enough to keep them busy."""
    threads = 32 * num_warps
    if kind == "fwd":  # q resident, k and v streamed; accumulates o
        resident, streamed, accumulator = block_m * block_d, block_n * (block_d + block_dv), block_m * block_dv
    elif kind == "dkdv":  # k and v resident, q and do streamed; accumulates dk and dv
        resident = accumulator = block_n * (block_d + block_dv)
        streamed = block_m * (block_d + block_dv)
    elif kind == "dq":  # q and do resident, k and v streamed; accumulates dq
        resident, streamed, accumulator = block_m * (block_d + block_dv), block_n * (block_d + block_dv), block_m * block_d
    else:
        raise ValueError(f"attention kernel kind must be fwd, dkdv or dq; got {kind!r}")
    if num_warps == 8 and resident < ATTENTION_EIGHT_WARPS_TILE:
        return False
    if accumulator > ATTENTION_ACCUMULATOR_REGISTERS * threads:
        return False
    if block_m * block_n > ATTENTION_SCORE_REGISTERS * threads:
        return False
    return (resident + num_stages * streamed) * element_size <= ATTENTION_SHARED_MEMORY


def attention_configs(kind: str) -> list:
    """The whole space of one kernel; attention_prune keeps what fits a call."""
    space = _ATTENTION_SPACE[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in itertools.product(space["BLOCK_M"], space["BLOCK_N"],
                                                         space["num_warps"], space["num_stages"])]


def attention_prune(kind: str):
    """early_config_prune of kernel `kind`: attention_keep for the call's head dims and
    dtype, tiles no longer than the sequences need (keeps at least one config)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        element_size = args["Q"].element_size()
        block_d, block_dv = args["BLOCK_D"], args["BLOCK_DV"]
        max_m = max(16, triton.next_power_of_2(args["seqlen_q"]))
        max_n = max(16, triton.next_power_of_2(args["seqlen_k"]))
        fits = [c for c in configs
                if attention_keep(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                                  block_d, block_dv, element_size)]
        short = [c for c in fits if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n]
        smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
        return short or fits[:1] or [smallest]

    return prune


def attention_pinned_config() -> Optional[dict]:
    """The launch config pinned by FASTATTN_ATTENTION_CONFIG (missing keys from
    ATTENTION_DEFAULT), ATTENTION_INTERPRETER_CONFIG under the interpreter, or None to
    autotune."""
    text = os.environ.get(ATTENTION_CONFIG_ENV, "").strip()
    if not text:
        if interpreted():
            return dict(ATTENTION_INTERPRETER_CONFIG)
        return None
    pinned = dict(ATTENTION_DEFAULT)
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _ATTENTION_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ATTENTION_CONFIG_ENV} must be comma-separated KEY=positive int with KEY in "
                             f"{', '.join(_ATTENTION_KEYS)}; got {text!r}")
        pinned[key] = int(value)
    for key in ("BLOCK_M", "BLOCK_N"):
        if pinned[key] < 16 or pinned[key] & (pinned[key] - 1):
            raise ValueError(f"{ATTENTION_CONFIG_ENV}: {key} must be a power of 2 >= 16; got {pinned[key]}")
    return pinned


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
