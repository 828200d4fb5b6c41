"""Timers: CUDA events with the L2 flushed before every timed call, or the CPU clock.

`time_fn(fn, arg_sets, device)` calls `fn(arg_sets[i % len(arg_sets)])` repeatedly and
returns the 20th, 50th and 80th percentile in milliseconds, and the fastest call (what
a ceiling is measured by: the best the machine did). Passing several argument
sets rotates the inputs, so that inputs small enough to sit in L2 are not reused
warm from one call to the next (the harness makes them; see harness.rotation_count).

On CUDA, as triton.testing.do_bench does: a first estimate of the time sets the
number of warm-up and timed calls; before each timed call a buffer larger than L2 is
overwritten (the flush), and each call is bracketed by its own pair of CUDA events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class Timing:
    ms_p20: float
    ms_p50: float
    ms_p80: float
    reps: int
    ms_min: Optional[float] = None  # the fastest timed call


@dataclass(frozen=True)
class TimerSettings:
    """How long to warm up and to measure, in milliseconds of the timed function."""

    warmup_ms: float = 5.0
    rep_ms: float = 25.0
    min_reps: int = 5
    max_reps: int = 100
    fixed: bool = False  # True: one warm-up call and min_reps timed calls, no estimate


QUICK = TimerSettings(warmup_ms=5.0, rep_ms=15.0, min_reps=3, max_reps=50)
CPU = TimerSettings(warmup_ms=20.0, rep_ms=150.0, min_reps=3, max_reps=30)
CPU_QUICK = TimerSettings(warmup_ms=5.0, rep_ms=40.0, min_reps=3, max_reps=15)

_flush_buffers: dict[int, torch.Tensor] = {}


def l2_cache_bytes(device: torch.device) -> int:
    """The L2 size of a CUDA device (0 where it is not known)."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 0)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _flush_buffers:
        size = max(256 * 2**20, 4 * l2_cache_bytes(device))
        _flush_buffers[index] = torch.empty(size, dtype=torch.int8, device=device)
    return _flush_buffers[index]


def quantiles(times_ms: Sequence[float]) -> tuple[float, float, float]:
    values = torch.tensor(list(times_ms), dtype=torch.float64)
    q = torch.quantile(values, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _counts(estimate_ms: float, settings: TimerSettings) -> tuple[int, int]:
    estimate_ms = max(estimate_ms, 1e-4)
    warmup = max(1, int(settings.warmup_ms / estimate_ms))
    reps = int(settings.rep_ms / estimate_ms)
    return min(warmup, settings.max_reps), max(settings.min_reps, min(reps, settings.max_reps))


def time_cuda(fn: Callable, arg_sets: Sequence, settings: TimerSettings = TimerSettings(),
              device: torch.device | None = None) -> Timing:
    device = device or torch.device("cuda", torch.cuda.current_device())
    flush = _flush_buffer(device)
    n = len(arg_sets)
    fn(arg_sets[0])
    torch.cuda.synchronize(device)
    if settings.fixed:
        warmup, reps = 0, settings.min_reps
    else:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(3):
            flush.zero_()
            fn(arg_sets[i % n])
        end.record()
        torch.cuda.synchronize(device)
        warmup, reps = _counts(start.elapsed_time(end) / 3, settings)
    for i in range(warmup):
        fn(arg_sets[i % n])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn(arg_sets[i % n])
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    p20, p50, p80 = quantiles(times)
    return Timing(p20, p50, p80, reps, min(times))


def time_cpu(fn: Callable, arg_sets: Sequence, settings: TimerSettings = CPU) -> Timing:
    n = len(arg_sets)
    begin = time.perf_counter()
    fn(arg_sets[0])
    if settings.fixed:
        warmup, reps = 0, settings.min_reps
    else:
        warmup, reps = _counts((time.perf_counter() - begin) * 1e3, settings)
    for i in range(warmup):
        fn(arg_sets[i % n])
    times = []
    for i in range(reps):
        begin = time.perf_counter()
        fn(arg_sets[i % n])
        times.append((time.perf_counter() - begin) * 1e3)
    p20, p50, p80 = quantiles(times)
    return Timing(p20, p50, p80, reps, min(times))


def time_fn(fn: Callable, arg_sets: Sequence, device: torch.device,
            settings: TimerSettings | None = None) -> Timing:
    """Time fn over the rotated argument sets on `device` (CUDA events or the CPU clock)."""
    if device.type == "cuda":
        return time_cuda(fn, arg_sets, settings or TimerSettings(), device)
    return time_cpu(fn, arg_sets, settings or CPU)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_sync_timer() -> float:
    """A clock for pytest-benchmark that first waits for the GPU to finish."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def flush_l2(device: torch.device) -> None:
    """Overwrite a buffer larger than L2 (no-op off CUDA)."""
    if device.type == "cuda":
        _flush_buffer(device).zero_()
