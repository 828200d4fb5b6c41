"""Ahead-of-time compile check of every Triton kernel variant, without a GPU.

    python -m fastattn.kernels.aot --arch 90                  # compile the `all` matrix for sm_90
    python -m fastattn.kernels.aot --arch 90 --check          # ... and compare with benchmarks/triton_sm90.tsv
    python -m fastattn.kernels.aot --arch 90 --write          # ... and rewrite that table
    python -m fastattn.kernels.aot --count --matrix smoke     # only count the variants (no compile)

The variants are found by running the ops themselves on stand-in CUDA tensors
(kernels/_aot_record.py) over a named case matrix (kernels/_aot_cases.py), with
FASTATTN_TRITON_ARCH set to the target so that the ops pick that GPU's configs. Each
distinct variant is compiled with Triton's own compiler and bundled ptxas for
GPUTarget("cuda", arch, 32), one forked process per compile and --jobs at a time, with a
fresh Triton cache per run unless --cache-dir is given.

The run fails (exit 1) on: a case whose call raises, a grid beyond CUDA's limits, a
compile error or a compile over --cpu-limit CPU seconds, shared memory above the target's
per-block limit (shared_memory_limit: 232448 bytes on sm_90; 101376 on sm_80, whose configs
also serve the 8.6 and 8.9 parts), or a register spill (all but the one of ALLOWED_SPILLS:
fp32 dK/dV at head dims above 128). It prints a table of
registers, spill bytes, shared memory and the tensor-core instructions in the SASS
(wgmma = Hopper's HGMMA, mma = HMMA) per variant, and whether the attention forward
uses wgmma on sm_90.

Where a launch reaches an Autotuner (FASTATTN_AUTOTUNE=1, or kernels without a default
config), every config it would benchmark after pruning is a variant: that is what a real
first call compiles. FASTATTN_<OP>_CONFIG pins are honoured as in any call.

Run it as its own process: TRITON_INTERPRET is removed from its environment before the
kernels are imported (the command starts itself again without it when Triton was already
imported under the interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ARCHS = (80, 90)  # the targets of the check: sm_80 (the sm80 config family) and sm_90 (H100/H200)
# The one spill the check reports without failing: (kernel, operand dtype, a word of the
# variant's name) -> why no default avoids it.
ALLOWED_SPILLS = {
    ("attention_bwd_dkdv", "fp32", "BLOCK_D=256"):
        "fp32 dK/dV at head dims 129-256: its ieee dots (FMA units, not tensor cores) hold 256-long rows of "
        "q, dO, K, V, dK and dV in registers, and every tile tried spills (16x16 with 16 warps included); fp32 "
        "is the exact path, not the fast one",
}
TABLE_HEADER = ("variant", "regs", "spill_stores", "spill_loads", "smem", "mma")
_REPO = Path(__file__).resolve().parents[1]


def default_table(arch: int) -> Path:
    return _REPO / "benchmarks" / f"triton_sm{arch}.tsv"


def count(matrix: str = "smoke", arch: int = 90) -> int:
    """The number of distinct Triton kernel variants that the cases of `matrix` compile
    for compute capability `arch` (no compile). Needs a process whose kernels are not
    interpreted (python -m fastattn.kernels.aot --count does that)."""
    _require_compiled_kernels()
    from . import _aot_cases, _aot_record

    return len(_aot_record.enumerate_variants(_aot_cases.matrix(matrix), arch).variants)


# ----------------------------------------------------------------------------- compiling

_JOBS: list = []  # the variants to compile, inherited by the forked workers


def _compile(index: int) -> dict:
    """Compile variant `index` of _JOBS; its ptxas figures, shared memory and mma kind."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
    variant, arch = _JOBS[index]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        source = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs,
                           attrs=variant.attrs)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
    except Exception as error:  # noqa: BLE001 - a compile error is a result of the check
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}",
                "seconds": time.perf_counter() - start}
    ptxas = log.getvalue()
    if "Used" not in ptxas:  # taken from the Triton cache: ptxas did not run
        ptxas = _ptxas_verbose(kernel.asm["ptx"], arch, variant.options)
    sass = _sass(kernel.asm["cubin"])
    mma = "wgmma" if "HGMMA" in sass else "mma" if "HMMA" in sass else "-"
    return {"regs": _number(r"Used (\d+) registers", ptxas),
            "spill_stores": _number(r"(\d+) bytes spill stores", ptxas),
            "spill_loads": _number(r"(\d+) bytes spill loads", ptxas), "smem": kernel.metadata.shared, "mma": mma,
            "seconds": time.perf_counter() - start}


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"no {pattern!r} in the ptxas log:\n{text}")
    return int(found.group(1))


def _sass(cubin: bytes) -> str:
    """The cubin's SASS as cuobjdump (bundled with Triton) prints it."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(cubin)
        binary.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", binary.name], capture_output=True, text=True,
                              check=True).stdout


def _ptxas_verbose(ptx: str, arch: int, options: dict) -> str:
    """ptxas -v's report for `ptx`, with the flags Triton's make_cubin passes."""
    from triton import knobs

    flags = ["-lineinfo", "-v"] + ([] if options["enable_fp_fusion"] else ["--fmad=false"])
    flags += options["ptx_options"].split(" ") if options.get("ptx_options") else []
    suffix = "a" if arch == 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        done = subprocess.run([knobs.nvidia.ptxas.path, *flags, f"--gpu-name=sm_{arch}{suffix}", source.name, "-o",
                               os.devnull], capture_output=True, text=True, check=True)
    return done.stderr


def _expected_cost(variant) -> tuple:
    """Sort key putting the slow compiles (attention backward, wide heads) first, so that
    the pool does not end on one long compile."""
    order = ("bwd_dkdv", "bwd_dbias", "bwd_dq", "attention_fwd", "decode_attention_fwd", "gated", "ffn")
    rank = next((i for i, part in enumerate(order) if part in variant.kernel), len(order))
    width = max([v for (i,), v in variant.constexprs.items() if variant.fn.arg_names[i] in ("BLOCK_D", "BLOCK_N")
                 and isinstance(v, int)] or [0])
    return rank, -width


def _compile_in_child(index: int, connection, cpu_limit: int) -> None:
    """Forked worker: compile one variant within cpu_limit CPU seconds (ptxas, which
    inherits the limit, as well), in its own process group, and send back the result."""
    os.setpgrp()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))
    result = _compile(index)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_seconds"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    connection.send(result)
    connection.close()


def compile_all(variants: list, arch: int, jobs: int, cpu_limit: int) -> list:
    """Results of _compile for each variant (in the given order), one forked process per
    compile, `jobs` at a time; a compile over cpu_limit CPU seconds is a failure."""
    order = sorted(range(len(variants)), key=lambda i: _expected_cost(variants[i]))
    _JOBS[:] = [(variants[i], arch) for i in order]
    context = multiprocessing.get_context("fork")
    pending, running, done = list(range(len(order))), {}, {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            position = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_compile_in_child, args=(position, send, cpu_limit))
            process.start()
            send.close()
            running[position] = (process, receive, time.perf_counter())
        ready = multiprocessing.connection.wait([receive for _, receive, _ in running.values()])
        for position, (process, receive, start) in list(running.items()):
            if receive not in ready:
                continue
            try:
                done[position] = receive.recv()
            except EOFError:
                process.join()
                over = process.exitcode in (-signal.SIGXCPU, -signal.SIGKILL)
                done[position] = {"error": f"compile took over {cpu_limit} CPU seconds" if over else
                                  f"compile process died (exit {process.exitcode})",
                                  "seconds": time.perf_counter() - start, "cpu_seconds": cpu_limit if over else 0.0}
            process.join()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # a ptxas left behind
            del running[position]
    results = [None] * len(variants)
    for position, index in enumerate(order):
        results[index] = done[position]
    return results


def shared_memory_limit(arch: int) -> int:
    """Bytes of shared memory a variant compiled for `arch` may use: the smallest per-block
    limit of the GPUs its config family serves (the sm80 defaults also run on the 8.6 and
    8.9 parts, 99 KB; sm_90 227 KB)."""
    from . import _config

    return _config.shared_memory_per_block(86 if _config.arch_family(arch) == "sm80" else arch)


def allowed_spill(variant) -> str:
    """Why `variant` may spill (ALLOWED_SPILLS), or "" where it may not."""
    words = variant.name.split()
    return next((why for (kernel, dtype, word), why in ALLOWED_SPILLS.items()
                 if variant.kernel == kernel and variant.dtype == dtype and word in words), "")


def failures(result: dict, arch: int, variant=None) -> list:
    """Why a compiled variant fails the check (empty: it passes)."""
    if "error" in result:
        return [result["error"]]
    reasons = []
    if (result["spill_stores"] or result["spill_loads"]) and not (variant is not None and allowed_spill(variant)):
        reasons.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    if result["smem"] > shared_memory_limit(arch):
        reasons.append(f"shared memory {result['smem']} B > {shared_memory_limit(arch)} B")
    return reasons


# ----------------------------------------------------------------------------- the table


def table_rows(variants: list, results: list) -> dict:
    """variant name -> its TSV row (TABLE_HEADER), for the compiled variants."""
    rows = {}
    for variant, result in zip(variants, results):
        if "error" in result:
            continue
        rows[variant.name] = "\t".join([variant.name] + [str(result[k]) for k in TABLE_HEADER[1:]])
    return rows


def write_table(path: Path, rows: dict, arch: int) -> None:
    import triton

    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                        if k.startswith("FASTATTN_") and (k.endswith("_CONFIG") or k == "FASTATTN_AUTOTUNE"))
    lines = [f"# Triton {triton.__version__}, sm_{arch}, matrix all: registers, spill bytes and shared memory per "
             f"kernel variant, and the SASS tensor-core instructions (wgmma = HGMMA, mma = HMMA).",
             f"# Regenerate: python -m fastattn.kernels.aot --arch {arch} --write"
             + (f"   (run with {settings})" if settings else ""),
             "\t".join(TABLE_HEADER)]
    path.write_text("\n".join(lines + [rows[name] for name in sorted(rows)]) + "\n")


def read_table(path: Path) -> dict:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.startswith(TABLE_HEADER[0] + "\t") or not line.strip():
            continue
        rows[line.split("\t", 1)[0]] = line
    return rows


def compare_table(expected: dict, got: dict, complete: bool) -> list:
    """Differences between the committed rows and this run's; rows of variants this run
    did not compile count only when it compiled the table's whole matrix."""
    problems = [f"changed: {expected[name]}\n     now: {got[name]}" for name in sorted(got)
                if name in expected and expected[name] != got[name]]
    problems += [f"new:     {got[name]}" for name in sorted(got) if name not in expected]
    if complete:
        problems += [f"gone:    {expected[name]}" for name in sorted(expected) if name not in got]
    return problems


# ----------------------------------------------------------------------------- the command


def _require_compiled_kernels() -> None:
    """The kernels must be real JITFunctions, not the interpreter's."""
    for name in ("attention", "decode", "ffn", "layer_norm"):
        module = sys.modules.get(f"fastattn.kernels.{name}")
        if module is not None and any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values()):
            raise RuntimeError("fastattn.kernels.aot needs a process without TRITON_INTERPRET: the kernels were "
                               "imported for the interpreter (run python -m fastattn.kernels.aot)")


def _parse(argv):
    from . import _aot_cases

    parser = argparse.ArgumentParser(prog="python -m fastattn.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, default=90,
                        help="compute capability to compile for (default 90)")
    parser.add_argument("--matrix", default="all",
                        help=f"the named case matrix: {', '.join(_aot_cases.MATRICES)} (kernels/_aot_cases.py; "
                             f"default all); with --count, several comma-separated")
    parser.add_argument("--only", default="", help="comma-separated ops to keep (e.g. attention,ffn)")
    parser.add_argument("--dtype", default="", help="comma-separated dtypes to keep (e.g. float16)")
    parser.add_argument("--count", action="store_true", help="print the number of distinct variants, compile nothing")
    parser.add_argument("--list", action="store_true", help="print every variant and the first case launching it")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    parser.add_argument("--cpu-limit", type=int, default=300,
                        help="CPU seconds one compile may take before it counts as failed (default 300)")
    parser.add_argument("--cache-dir", default="", help="Triton cache directory (default: a fresh temporary one)")
    parser.add_argument("--autotune", action="store_true", help="FASTATTN_AUTOTUNE=1: compile the autotune spaces")
    parser.add_argument("--table", default="", help="the committed table (default benchmarks/triton_sm<arch>.tsv)")
    parser.add_argument("--write", action="store_true", help="rewrite the table from this run")
    parser.add_argument("--check", action="store_true", help="fail if the table differs from this run")
    return parser.parse_args(argv)


def _enumerate(matrix: str, args):
    """The variants of one matrix (filtered by --only / --dtype), with a summary printed."""
    from . import _aot_cases, _aot_record

    cases = _aot_cases.matrix(matrix)
    if args.only:
        cases = [c for c in cases if c.op in args.only.split(",")]
    if args.dtype:
        cases = [c for c in cases if c.dtype in args.dtype.split(",")]
    start = time.perf_counter()
    found = _aot_record.enumerate_variants(cases, args.arch)
    variants = list(found.variants.values())
    tuned = sum(v.autotuned for v in variants)
    print(f"{len(variants)} distinct Triton kernel variants for sm_{args.arch} (matrix {matrix}, {len(cases)} cases, "
          f"{found.launches} launches, {tuned} from autotune config lists; {time.perf_counter() - start:.1f} s)")
    for kernel, n in sorted(Counter(v.kernel for v in variants).items()):
        print(f"  {n:5d}  {kernel}")
    for case, message in found.errors:
        print(f"ERROR  {case}: {message}")
    if args.list:
        for variant in variants:
            more = f" (+{len(variant.cases) - 1} more)" if len(variant.cases) > 1 else ""
            print(f"{variant.name}\t<- {variant.cases[0]}{more}")
    return found, variants


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" in sys.modules:
        # Triton was imported under its interpreter (python -m imports the fastattn package
        # first), so its own library functions are interpreted ones: start again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "fastattn.kernels.aot", *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, command, env)
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported
    args = _parse(argv)
    if args.autotune:
        os.environ["FASTATTN_AUTOTUNE"] = "1"
    _require_compiled_kernels()
    from . import _aot_cases

    matrices = args.matrix.split(",")
    unknown = [m for m in matrices if m not in _aot_cases.MATRICES]
    if unknown or (len(matrices) > 1 and not args.count):
        print(f"--matrix takes one of {', '.join(_aot_cases.MATRICES)} (several, comma-separated, only with "
              f"--count); got {args.matrix!r}")
        return 2
    if args.count:
        return 1 if any(_enumerate(matrix, args)[0].errors for matrix in matrices) else 0
    whole = args.matrix == "all" and not args.only and not args.dtype
    if args.write and not whole:
        print("--write rewrites the whole table: run it on the `all` matrix without --only / --dtype")
        return 2
    found, variants = _enumerate(args.matrix, args)

    with tempfile.TemporaryDirectory(prefix="fastattn-aot-") as scratch:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir or scratch
        start = time.perf_counter()
        results = compile_all(variants, args.arch, args.jobs, args.cpu_limit)
    seconds = time.perf_counter() - start
    failed = 0
    print("\t".join(TABLE_HEADER + ("cpu_s", "check")))
    for variant, result in sorted(zip(variants, results), key=lambda vr: vr[0].name):
        reasons = failures(result, args.arch, variant)
        failed += bool(reasons)
        values = [str(result.get(k, "-")) for k in TABLE_HEADER[1:]]
        cpu = f"{result.get('cpu_seconds', result['seconds']):.1f}"
        allowed = "error" not in result and result["spill_stores"] and allowed_spill(variant)
        verdict = "; ".join(reasons) or ("ok (allowed spill: see ALLOWED_SPILLS)" if allowed else "ok")
        print("\t".join([variant.name] + values + [cpu, verdict]))
    cpu = sum(r.get("cpu_seconds", r["seconds"]) for r in results)
    print(f"compiled {len(variants)} variants in {seconds:.0f} s ({cpu:.0f} CPU seconds) with {args.jobs} jobs; "
          f"{failed} fail the check "
          f"(compile error, spills, or shared memory > {shared_memory_limit(args.arch)} B)")
    forward = [r["mma"] for v, r in zip(variants, results) if v.kernel == "attention_fwd" and v.dtype != "fp32"
               and "error" not in r]
    if forward:
        print(f"attention forward, fp16/bf16: {forward.count('wgmma')} of {len(forward)} variants use wgmma (HGMMA), "
              f"{forward.count('mma')} mma.sync (HMMA)")

    status = 1 if failed or found.errors else 0
    path = Path(args.table) if args.table else default_table(args.arch)
    rows = table_rows(variants, results)
    if args.write:
        write_table(path, rows, args.arch)
        print(f"wrote {path} ({len(rows)} rows)")
    if args.check:
        if not path.exists():
            print(f"CHECK  no table at {path} (write it with --write)")
            return 1
        problems = compare_table(read_table(path), rows, complete=whole)
        for problem in problems:
            print(f"CHECK  {problem}")
        if problems:
            print(f"CHECK  {len(problems)} rows differ from {path}: rerun with --write and commit the diff")
            status = 1
        else:
            print(f"CHECK  {len(rows)} rows match {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
