"""The two ceilings every run measures first (TARGETS.md): a large matmul in TFLOP/s
and a large device-to-device copy in TB/s (bytes read + written).

CUDA: bf16 8192³ torch.matmul and a 1 GiB copy. CPU: fp32 1024³ and a 64 MiB copy
(the CPU sweep's own yardstick, not comparable with a GPU's).
"""

from __future__ import annotations

import torch

from .timing import TimerSettings, time_fn

CEILING_TIMER = TimerSettings(warmup_ms=50.0, rep_ms=200.0, min_reps=10, max_reps=100)
CPU_CEILING_TIMER = TimerSettings(warmup_ms=50.0, rep_ms=300.0, min_reps=5, max_reps=30)


def measure(device: torch.device) -> dict:
    """{"matmul_tflops", "matmul_desc", "copy_tbps", "copy_desc"} measured on `device`."""
    gpu = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    copy_bytes = 2**30 if gpu else 64 * 2**20
    settings = CEILING_TIMER if gpu else CPU_CEILING_TIMER
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    matmul = time_fn(lambda ab: torch.matmul(*ab), [(a, b)], device, settings)
    del a, b
    src = torch.randn(copy_bytes // 4, device=device, generator=generator)
    dst = torch.empty_like(src)
    copy = time_fn(lambda sd: sd[1].copy_(sd[0]), [(src, dst)], device, settings)
    del src, dst
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "matmul_tflops": 2.0 * n**3 / (matmul.ms_p50 * 1e-3) / 1e12,
        "matmul_desc": f"{dtype_name} {n}×{n}×{n} torch.matmul, median",
        "copy_tbps": 2.0 * copy_bytes / (copy.ms_p50 * 1e-3) / 1e12,
        "copy_desc": f"{copy_bytes // 2**20} MiB device copy, read + write, median",
    }
