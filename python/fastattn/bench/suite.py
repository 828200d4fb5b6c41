"""pytest-benchmark glue for benchmarks/bench_<op>.py.

Each test is one (shape, mode, provider) of an op's quick sweep (the cases
`fastattn-bench --quick` runs), set up and checked by the same harness: a provider
that cannot serve the case is skipped with its reason, a wrong one fails. The timing
is pytest-benchmark's, in pedantic mode, with a clock that synchronizes CUDA first
(timing.cuda_sync_timer) and, before each round (outside the timed region), the L2
flushed and the next rotated input copy picked. Without CUDA every test is skipped.
"""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch

from . import counting, timing
from .harness import Case, OpRunner, RunConfig
from .results import metric_of
from .run import EXPANSION

SWEEP = "quick"
ROUNDS, WARMUP_ROUNDS = 20, 3

PYTEST_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device"),
    pytest.mark.benchmark(timer=timing.cuda_sync_timer, disable_gc=True, warmup=False),
]


def params(op: str) -> list:
    """pytest.param(spec name, shape, mode, provider) for every case of `op` (model:
    training and decoding), shape-major so that one shape's setup serves its tests."""
    from .specs import get_spec

    out = []
    for name in EXPANSION.get(op, (op,)):
        spec = get_spec(name)
        if spec.unavailable():
            out.append(pytest.param(name, None, None, None, id=f"{name}-unavailable",
                                    marks=pytest.mark.skip(reason=spec.unavailable())))
            continue
        for shape in spec.sweep(SWEEP):
            label = spec.label(shape).replace(" ", "_")
            for mode in spec.modes:
                for provider in spec.providers:
                    out.append(pytest.param(name, shape, mode, provider, id=f"{label}-{mode}-{provider}"))
    return out


class _Cache:
    """The last shape's set-up case (one at a time, to keep GPU memory free)."""

    key: Optional[str] = None
    runner: Optional[OpRunner] = None
    case: Optional[Case] = None


def _case(spec_name: str, shape: dict) -> tuple[OpRunner, Case]:
    from .specs import get_spec

    key = f"{spec_name}:{sorted(shape.items())}"
    if _Cache.key != key:
        _Cache.key = _Cache.runner = _Cache.case = None
        torch.cuda.empty_cache()
        device = torch.device("cuda", torch.cuda.current_device())
        config = RunConfig(device=device, dtype=torch.bfloat16, sweep=SWEEP, progress=False)
        runner = OpRunner(get_spec(spec_name), config, emit=lambda record: None)
        _Cache.case = runner.setup_case(shape)
        _Cache.key, _Cache.runner = key, runner
    return _Cache.runner, _Cache.case


def run(benchmark, spec_name: str, shape: dict, mode: str, provider: str) -> None:
    """Set up (cached per shape), check, then benchmark one provider on one case."""
    runner, case = _case(spec_name, shape)
    outcome, state = runner.check(case, mode, provider, runner.spec.providers[provider])
    if state is None:
        if outcome.status == "skipped":
            pytest.skip(outcome.reason)
        pytest.fail(f"{provider} {outcome.status}: {outcome.reason}")
    benchmark.group = f"{spec_name} {mode} {runner.spec.label(shape)}"
    counter = itertools.count()
    device = runner.device

    def setup():
        timing.flush_l2(device)
        return (state.args[next(counter) % len(state.args)],), {}

    fixed = runner.spec.timer is not None and runner.spec.timer.fixed
    rounds, warmup = (runner.spec.timer.min_reps, 1) if fixed else (ROUNDS, WARMUP_ROUNDS)
    benchmark.pedantic(state.run, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update(provider=provider, mode=mode, shape=shape,
                                max_abs_err_vs_fp32=outcome.max_abs_err)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        ms = stats.median * 1e3
        metric = metric_of(spec_name)
        if metric == "tokens_per_s":
            benchmark.extra_info[metric] = runner.spec.tokens(shape) / (ms * 1e-3)
        else:
            _, value = counting.throughput(spec_name, counting.work(spec_name, shape, mode, "bfloat16"), ms)
            benchmark.extra_info[metric] = value
