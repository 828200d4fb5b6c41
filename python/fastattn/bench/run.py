"""One benchmark run: ceilings first, then each op's sweep, written as it goes.

Files, under <out>/<device>/ (device: e.g. nvidia-h100-80gb-hbm3, or cpu):
    <YYYY-MM-DD>-<commit>.jsonl         the TARGETS.md rows, header row first
    <YYYY-MM-DD>-<commit>.md            Markdown tables of every op and mode
    <YYYY-MM-DD>-<commit>-<op>.png      one plot per op
Copy that folder into benchmarks/results/ to commit a GPU run. With `jsonl_path` the
JSONL alone is written there (no Markdown, no plots): benchmarks/device_run.sh does
that and `python -m fastattn.bench.report --device-run` renders the rest later.

A preset (PRESETS, `fastattn-bench --preset NAME`) names the ops, the providers of
each op, the modes and the sweep of a standard run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from . import ceilings as ceilings_module
from . import environment, timing
from .harness import DeviceLost, OpRunner, RunConfig
from .plots import plot_op
from .results import ResultsWriter, make_row, markdown_report
from .specs import OPS, get_spec

# Which specs each --op name runs.
OP_CHOICES = OPS + ("all",)
EXPANSION = {"model": ("model_train", "model_decode")}
# Shares of the time budget (renormalized over the ops that run; unused time rolls on).
BUDGET_WEIGHTS = {"attention": 0.34, "decode_attention": 0.07, "layer_norm": 0.10, "rms_norm": 0.10,
                  "ffn": 0.06, "gated_ffn": 0.06, "model_train": 0.15, "model_decode": 0.12}
DEFAULT_GPU_BUDGET_S = 480.0


@dataclass(frozen=True)
class Preset:
    """A standard run: its ops (in run order), the providers of each op, its modes, and
    its sweep on CUDA and on CPU (where it only checks that the run works)."""

    ops: tuple
    providers: Mapping[str, tuple]
    modes: tuple
    sweep: str
    cpu_sweep: str
    description: str


_NORM_PROVIDERS = ("naive", "torch", "triton", "cuda")
_FFN_PROVIDERS = ("naive", "torch", "gemm-only", "triton", "cuda")
PRESETS = {
    "quick-gpu": Preset(
        ops=("attention", "layer_norm", "rms_norm", "ffn", "gated_ffn", "decode_attention"),
        providers={"attention": ("naive", "torch-flash", "torch-cudnn", "triton", "cuda"),
                   "layer_norm": _NORM_PROVIDERS, "rms_norm": _NORM_PROVIDERS,
                   "ffn": _FFN_PROVIDERS, "gated_ffn": _FFN_PROVIDERS,
                   "decode_attention": ("naive", "torch", "torch-flash", "triton", "cuda")},
        modes=("fwd", "bwd"), sweep="quick-gpu", cpu_sweep="cpu-quick",
        description="stage 3 of benchmarks/device_run.sh: attention fwd/bwd at d 64/128, seqlen 1k/4k/16k "
                    "(16k tokens), causal and not, against SDPA's flash and cuDNN backends; norms at 32k × 4k/8k "
                    "against F.layer_norm / F.rms_norm; ffn and gated_ffn at 16k × 4096 against F.linear and the "
                    "bare cuBLAS GEMMs; decode at batch 1 and 32 over a 32k cache; naive everywhere"),
}
CPU_NOTE = ("No CUDA GPU here: this is a small CPU sweep of the providers that run on CPU, timed with "
            "the CPU clock. It checks that the harness works; it says nothing about the kernels' speed. "
            "GPU numbers need a CUDA GPU: run `fastattn-bench` on a machine with one.")


@dataclass
class RunOutput:
    directory: Path
    jsonl: Path
    markdown: Optional[Path]
    plots: list = field(default_factory=list)
    header: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    aborted: Optional[str] = None  # why the run stopped early (a broken CUDA context)


def expand_ops(names: Sequence[str]) -> list[str]:
    """--op names -> spec names in run order (all = every op)."""
    chosen = []
    for name in names:
        if name not in OP_CHOICES:
            raise ValueError(f"op must be one of {', '.join(OP_CHOICES)}; got {name!r}")
        for op in (OPS if name == "all" else (name,)):
            for spec_name in EXPANSION.get(op, (op,)):
                if spec_name not in chosen:
                    chosen.append(spec_name)
    return chosen


def default_sweep(device: torch.device, quick: bool) -> str:
    if device.type == "cuda":
        return "quick" if quick else "full"
    return "cpu-quick" if quick else "cpu"


def run_benchmarks(
    ops: Sequence[str],
    *,
    out: Path,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    quick: bool = False,
    sweep: Optional[str] = None,
    providers: Union[Sequence[str], Mapping[str, Sequence[str]], None] = None,
    modes: Optional[Sequence[str]] = None,
    max_cases: Optional[int] = None,
    time_budget_s: Optional[float] = None,
    progress: bool = True,
    plots: bool = True,
    extra_providers: Optional[dict] = None,
    log: Callable[[str], None] = print,
    jsonl_path: Optional[Path] = None,
    preset: Optional[str] = None,
) -> RunOutput:
    """Measure the ceilings, then every op's sweep; write the JSONL (row by row), the
    Markdown tables and the plots under out/<device>/ (with jsonl_path: the JSONL alone,
    at that path). `providers`: names for every op, or {op: names}. Returns where they are."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sweep = sweep or default_sweep(device, quick)
    if time_budget_s is None:
        time_budget_s = DEFAULT_GPU_BUDGET_S if sweep == "full" else 0.0
    spec_names = expand_ops(ops)
    started = time.monotonic()
    if jsonl_path is not None:
        plots = False
    if plots and importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        plots = False
    if device.type != "cuda":
        log(CPU_NOTE)
    with _cpu_threads(device):
        info = environment.run_info(device)
        log(f"measuring the ceilings on {info['device']} ...")
        measured = ceilings_module.measure(device)
        specs, skipped_ops = [], {}
        for name in spec_names:
            spec = get_spec(name)
            why = spec.unavailable()
            if why is None:
                specs.append(spec)
            else:
                skipped_ops[name] = why
                log(f"{name}: not measured: {why}")
        header = {"kind": "header", **info, **measured, "dtype": str(dtype).replace("torch.", ""),
                  "sweep": sweep, "preset": preset, "ops": [s.name for s in specs],
                  "providers": _providers_field(providers), "time_budget_s": time_budget_s or None,
                  "python": platform.python_version(), "fastattn": environment.package_version("fastattn"),
                  "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
                  "skipped_ops": skipped_ops, "notes": [CPU_NOTE] if device.type != "cuda" else []}
        directory = Path(out) / environment.device_slug(device)
        stem = environment.results_stem(info)
        if jsonl_path is not None:
            directory, stem = Path(jsonl_path).parent, Path(jsonl_path).stem
        writer = ResultsWriter(directory / f"{stem}.jsonl", header)
        markdown = None if jsonl_path is not None else directory / f"{stem}.md"
        output = RunOutput(directory, writer.path, markdown, header=header, rows=writer.rows)
        config = RunConfig(device=device, dtype=dtype, sweep=sweep, providers=None, modes=modes,
                           max_cases=max_cases, timer=SWEEP_TIMERS.get(sweep), progress=progress,
                           extra_providers=extra_providers or {})
        try:
            for spec, deadline in _with_deadlines(specs, time_budget_s, started):
                spec_config = dataclasses.replace(config, providers=providers_of(providers, spec.name))
                _run_spec(spec, spec_config, writer, output, deadline, progress=progress, plots=plots, stem=stem)
        except DeviceLost as exc:
            output.aborted = (f"run stopped: a provider broke the CUDA context ({exc}); rerun without it "
                              "(--providers) to measure the rest")
            header["notes"].append(output.aborted)
            log(output.aborted)
            if plots:
                for spec in specs:
                    png = plot_op(header, writer.rows, spec.name, directory / f"{stem}-{spec.name}.png")
                    if png is not None and png not in output.plots:
                        output.plots.append(png)
        finally:
            writer.close()
            if output.markdown is not None:
                output.markdown.write_text(markdown_report(header, writer.rows), encoding="utf-8")
    _log_summary(output, time.monotonic() - started, log)
    return output


SWEEP_TIMERS = {"quick": timing.QUICK, "quick-gpu": timing.QUICK, "cpu-quick": timing.CPU_QUICK}


def providers_of(providers, spec_name: str) -> Optional[list]:
    """The provider names asked for `spec_name` (None: all of them)."""
    if providers is None:
        return None
    if isinstance(providers, Mapping):
        chosen = providers.get(spec_name)
        return None if chosen is None else list(chosen)
    return list(providers)


def _providers_field(providers):
    if not providers:
        return None
    if isinstance(providers, Mapping):
        return {name: list(names) for name, names in providers.items()}
    return list(providers)


@contextlib.contextmanager
def _cpu_threads(device: torch.device):
    """One torch thread for a CPU sweep: on a busy machine OpenMP threads waiting on
    each other make CPU timings swing by 10×; one thread keeps them steady."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _with_deadlines(specs, budget_s: float, started: float):
    """(spec, deadline or None): each op's share of what is left of the budget, by
    BUDGET_WEIGHTS, so time an op does not use passes to the ones after it."""
    weights_left = sum(BUDGET_WEIGHTS.get(s.name, 0.1) for s in specs)
    for spec in specs:
        weight = BUDGET_WEIGHTS.get(spec.name, 0.1)
        deadline = None
        if budget_s:
            left = max(0.0, budget_s - (time.monotonic() - started))
            deadline = time.monotonic() + left * weight / weights_left
        weights_left -= weight
        yield spec, deadline


def _run_spec(spec, config, writer, output, deadline, *, progress, plots, stem) -> None:
    header = output.header
    tokens = getattr(spec, "tokens", None)

    def emit(record):
        writer.add(make_row(record, header["dtype"], header, header,
                            tokens=tokens(record["shape"]) if tokens else None))

    runner = OpRunner(spec, config, emit, deadline=deadline)
    bar = _progress_bar(runner.planned(), spec.name) if progress else None
    try:
        runner.run(bar)
    finally:
        if bar is not None:
            bar.close()
    if output.markdown is not None:
        output.markdown.write_text(markdown_report(header, writer.rows), encoding="utf-8")
    if plots:
        png = plot_op(header, writer.rows, spec.name, output.directory / f"{stem}-{spec.name}.png")
        if png is not None:
            output.plots.append(png)


def _progress_bar(total: int, name: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # In a log file (not a terminal) redraw rarely, so the log stays readable.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=name, unit="case", file=sys.stderr, dynamic_ncols=True, leave=True,
                mininterval=interval, maxinterval=max(interval, 10.0))


def _log_summary(output: RunOutput, seconds: float, log) -> None:
    counts: dict = {}
    for row in output.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    log(f"done in {seconds:.0f} s: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    for row in output.rows:
        if row["status"] in ("failed", "error"):
            log(f"  {row['status'].upper()} {row['op']} {row['mode']} {row['provider']} {row['shape']}: "
                f"{row['reason']}")
    log(f"results: {output.jsonl}")
    if output.markdown is not None:
        log(f"table:   {output.markdown}")
    for png in output.plots:
        log(f"plot:    {png}")
    if output.header.get("notes"):
        log(output.header["notes"][0])
