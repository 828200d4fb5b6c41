"""`fastattn-bench` (also `python -m fastattn.bench`): benchmark every op against naive
PyTorch and PyTorch's own best paths, and write the results (JSON Lines, Markdown,
PNG plots).

    fastattn-bench                              # every op, the full sweep (CUDA)
    fastattn-bench --op attention --quick       # a smaller sweep of one op
    fastattn-bench --op layer_norm --providers torch,triton --modes fwd
    fastattn-bench --preset quick-gpu --jsonl out/bench.jsonl   # benchmarks/device_run.sh's stage 3

Without a CUDA GPU it runs a small CPU sweep of the providers that run on CPU, to
show the harness works; GPU numbers need a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import _cli
from .run import OP_CHOICES, PRESETS
from .spec import SWEEPS


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog="fastattn-bench", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default=["all"], choices=OP_CHOICES, action="append", dest="ops",
                   help="op to benchmark (repeatable; default all, or the preset's). model = the reference "
                        "Transformer's training step and decoding")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a standard selection of ops, providers per op, modes and sweep; --op, --providers, "
                        "--modes and --sweep override its parts. "
                        + " ".join(f"{name}: {preset.description}." for name, preset in PRESETS.items()))
    p.add_argument("--quick", action="store_true", help="a smaller sweep (a few shapes per op)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="output folder; files go to OUT/<device>/ (default: bench-out)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to run (default: all; on CPU the torch.compile "
                        "providers run only when named here)")
    p.add_argument("--modes", default=None, help="comma-separated modes: fwd,bwd,full (default: all)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--sweep", choices=SWEEPS, default=None,
                   help="which sweep of shapes (default: full or, with --quick, quick on CUDA; cpu or "
                        "cpu-quick on CPU)")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N shapes of each op's sweep")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop measuring (rows marked skipped) after this long, shared out among the ops; "
                        "default 480 for the full CUDA sweep, none otherwise; 0 = no limit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--jsonl", type=Path, default=None, metavar="PATH",
                   help="write the results JSONL to exactly this file and nothing else (no Markdown, no plots; "
                        "python -m fastattn.bench.report renders them later); --out is then unused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit")
    return p


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """fastattn-bench: a user error is one line on stderr and exit status 2."""
    return _cli.run("fastattn-bench", _main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .run import default_sweep, expand_ops, run_benchmarks

    ops = args.ops[1:] if len(args.ops) > 1 else args.ops  # drop the default when --op is given
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _cli.UsageError("--device cuda asked for, but no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    sweep = args.sweep or default_sweep(device, args.quick)
    providers, modes = _split(args.providers), _split(args.modes)
    if args.preset:
        preset = PRESETS[args.preset]
        ops = ops if len(args.ops) > 1 else list(preset.ops)
        providers = providers if providers is not None else preset.providers
        modes = modes if modes is not None else list(preset.modes)
        sweep = args.sweep or (preset.sweep if device.type == "cuda" else preset.cpu_sweep)
    problem = _user_error(args, expand_ops(ops))
    if problem is not None:
        raise _cli.UsageError(problem)
    if args.list:
        return _list(expand_ops(ops), sweep, args, providers, modes)
    output = run_benchmarks(ops, out=args.out, device=device, dtype=dtype, sweep=sweep,
                            providers=providers, modes=modes, max_cases=args.max_cases,
                            time_budget_s=args.time_budget, progress=not args.no_progress,
                            plots=not args.no_plots, jsonl_path=args.jsonl, preset=args.preset)
    return 1 if output.aborted else 0


def _user_error(args, spec_names) -> Optional[str]:
    """What is wrong with the arguments argparse cannot check, and what to do; None if nothing."""
    from .specs import get_spec

    known = {p for name in spec_names for p in get_spec(name).providers}
    unknown = [p for p in _split(args.providers) or [] if p not in known]
    if unknown:
        return f"--providers {','.join(unknown)}: no such provider of these ops; pick from {','.join(sorted(known))}"
    modes = {m for name in spec_names for m in get_spec(name).modes}
    unknown = [m for m in _split(args.modes) or [] if m not in modes]
    if unknown:
        return f"--modes {','.join(unknown)}: not a mode of these ops; pick from {','.join(sorted(modes))}"
    if args.max_cases is not None and args.max_cases < 1:
        return f"--max-cases must be >= 1 (leave it out for every shape), got {args.max_cases}"
    if args.time_budget is not None and args.time_budget < 0:
        return f"--time-budget must be >= 0 seconds (0 = no limit), got {args.time_budget}"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} is a file; pass a folder (results go to OUT/<device>/)"
    return None


def _list(spec_names, sweep, args, providers, modes) -> int:
    from .run import providers_of
    from .specs import get_spec

    total = 0
    for name in spec_names:
        spec = get_spec(name)
        why = spec.unavailable()
        if why:
            print(f"{name}: not measured: {why}")
            continue
        shapes = spec.sweep(sweep)[: args.max_cases] if args.max_cases else spec.sweep(sweep)
        wanted = providers_of(providers, name)
        names = [p for p in spec.providers if wanted is None or p in wanted]
        chosen_modes = [m for m in spec.modes if modes is None or m in modes]
        count = len(shapes) * len(chosen_modes) * len(names)
        total += count
        print(f"{name}: {len(shapes)} shapes × modes {','.join(chosen_modes)} × providers {','.join(names)} "
              f"= {count}")
        for shape in shapes:
            print(f"    {spec.label(shape)}")
    print(f"sweep {sweep}: {total} measurements planned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
