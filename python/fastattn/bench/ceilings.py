"""The two ceilings every run measures first (TARGETS.md): a matmul in TFLOP/s and a
device copy in GB/s, bytes read + written (the unit of the memory-bound rows; also
recorded as copy_tbps, TARGETS.md's unit).

A ceiling is the best the machine did, not a typical call: the fastest timed call,
over several rounds of every size, measured under the thread settings the ops run with
(the caller sets them; the count is recorded as ceiling_threads).

CUDA: bf16 8192³ torch.matmul and a 1 GiB copy; the sweeps' inputs miss L2 (they are
larger, or rotated through copies that are), so a copy that misses L2 is their ceiling.
CPU: fp32 matmuls of 256³ to 1024³ and copies of 256 KiB to 64 MiB, the best of each:
the CPU sweeps reuse inputs that sit in the CPU's caches, so the ceiling counts the
caches too (a DRAM-sized copy alone sat below most memory-bound rows). The CPU figures
are the CPU sweep's own yardstick, not comparable with a GPU's.
"""

from __future__ import annotations

import torch

from .timing import TimerSettings, time_fn

CEILING_TIMER = TimerSettings(warmup_ms=50.0, rep_ms=200.0, min_reps=10, max_reps=100)
CPU_CEILING_TIMER = TimerSettings(warmup_ms=20.0, rep_ms=60.0, min_reps=8, max_reps=200)
GPU_MATMUL_SIZES, GPU_COPY_BYTES, GPU_ROUNDS = (8192,), (2**30,), 2
CPU_MATMUL_SIZES, CPU_COPY_BYTES, CPU_ROUNDS = (256, 512, 1024), tuple(2**k for k in range(18, 27, 2)), 2


def _size_text(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def _fastest_ms(fn, args, device, settings) -> float:
    timing = time_fn(fn, [args], device, settings)
    return timing.ms_min if timing.ms_min is not None else timing.ms_p20


def measure(device: torch.device) -> dict:
    """{"matmul_tflops", "matmul_desc", "copy_gbps", "copy_tbps", "copy_desc",
    "ceiling_threads"} measured on `device`: the best rate of every size and round."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    sizes, copies, rounds = (GPU_MATMUL_SIZES, GPU_COPY_BYTES, GPU_ROUNDS) if gpu else \
        (CPU_MATMUL_SIZES, CPU_COPY_BYTES, CPU_ROUNDS)
    settings = CEILING_TIMER if gpu else CPU_CEILING_TIMER
    generator = torch.Generator(device=device).manual_seed(0)
    matmul, copy = {}, {}  # size -> best TFLOP/s, bytes -> best GB/s
    for _ in range(rounds):  # rounds interleave the sizes: a busy spell does not hit one size only
        for n in sizes:
            a = torch.randn(n, n, device=device, generator=generator).to(dtype)
            b = torch.randn(n, n, device=device, generator=generator).to(dtype)
            ms = _fastest_ms(lambda ab: torch.matmul(*ab), (a, b), device, settings)
            matmul[n] = max(matmul.get(n, 0.0), 2.0 * n**3 / (ms * 1e-3) / 1e12)
            del a, b
        for nbytes in copies:
            src = torch.randn(nbytes // 4, device=device, generator=generator)
            dst = torch.empty_like(src)
            ms = _fastest_ms(lambda sd: sd[1].copy_(sd[0]), (src, dst), device, settings)
            copy[nbytes] = max(copy.get(nbytes, 0.0), 2.0 * nbytes / (ms * 1e-3) / 1e9)
            del src, dst
    best_n = max(matmul, key=matmul.get)
    best_bytes = max(copy, key=copy.get)
    dtype_name = str(dtype).replace("torch.", "")
    threads = torch.get_num_threads()
    where = "" if gpu else f", {threads} thread{'s' if threads > 1 else ''}"
    matmul_sizes = "/".join(f"{n}³" for n in sizes)
    copy_sizes = "/".join(_size_text(b) for b in copies)
    return {
        "matmul_tflops": matmul[best_n],
        "matmul_desc": (f"{dtype_name} torch.matmul, fastest call of {rounds} rounds over {matmul_sizes} "
                        f"(best: {best_n}³){where}"),
        "copy_gbps": copy[best_bytes],
        "copy_tbps": copy[best_bytes] / 1000.0,
        "copy_desc": (f"device copy, read + write, fastest call of {rounds} rounds over {copy_sizes} "
                      f"(best: {_size_text(best_bytes)}){where}"),
        "ceiling_threads": threads if not gpu else None,
    }


def copy_gbps(header: dict) -> float | None:
    """The copy ceiling of a results header in GB/s (older files carry copy_tbps only)."""
    if header.get("copy_gbps"):
        return header["copy_gbps"]
    if header.get("copy_tbps"):
        return header["copy_tbps"] * 1000.0
    return None
