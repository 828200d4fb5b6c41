"""The Python steps of benchmarks/device_run.sh (the one command of a GPU session).

    python -m fastattn.bench.device_run env --out OUT/env.jsonl [--build-status S ...]
    FASTATTN_AUTOTUNE=1 python -m fastattn.bench.device_run autotune --out OUT/autotune.jsonl --seconds 60

env appends one row at a time (so a step cut short keeps what it wrote): the versions
and commit, the device, nvidia-smi's report, the build of fastattn._C and whether it
imports, the available backends, and the two ceilings (bf16 matmul, device copy) of
fastattn.bench.ceilings.

autotune runs the key shapes (AUTOTUNE_SHAPES) through the Triton backend with
FASTATTN_AUTOTUNE=1 and, after each shape, appends the config every autotuner chose
per key (and the timings of the configs it tried, where Triton kept them): a candidate
table for the static configs of kernels/_config.py, not a result. Under the Triton
interpreter nothing is tuned; the rows say so. At --seconds (an alarm) or on SIGTERM
(device_run.sh's step limit) it writes what the autotuners hold so far and stops:
a key whose configs were still being timed is lost, the keys tuned before it are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def append(path: Path, row: dict) -> None:
    """Append one JSON row to `path` (created if missing) and flush it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_jsonable) + "\n")


def _command_output(*cmd: str, timeout: float = 30.0) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(cmd)} failed: {exc}"
    return (result.stdout + result.stderr).strip()


# ----------------------------------------------------------------------------- env


def versions_row() -> dict:
    from . import environment

    commit, dirty = environment.git_commit()
    nvcc = _command_output("nvcc", "--version")
    return {"kind": "versions", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": environment.package_version("triton"), "numpy": environment.package_version("numpy"),
            "fastattn": environment.package_version("fastattn"),
            "nvcc": nvcc.splitlines()[-1] if nvcc else None, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}


def device_row(device: torch.device) -> dict:
    from . import environment

    row = {"kind": "device", "device": environment.device_name(device), "slug": environment.device_slug(device),
           "cuda": device.type == "cuda"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   total_memory_gib=round(props.total_memory / 2**30, 1),
                   l2_bytes=int(getattr(props, "L2_cache_size", 0) or 0))
    return row


def nvidia_smi_row() -> dict:
    text = _command_output("nvidia-smi")
    if text is None:
        return {"kind": "nvidia-smi", "text": None, "reason": "nvidia-smi is not on PATH (no NVIDIA driver here)"}
    query = _command_output("nvidia-smi", "--format=csv",
                            "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
                            "power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode")
    return {"kind": "nvidia-smi", "text": text, "query": query}


def extension_row() -> dict:
    from .. import _extension

    reason = _extension.unavailable_reason()
    row = {"kind": "extension", "loaded": reason is None, "reason": reason, "build_info": None, "ops": None}
    if reason is None:
        module = _extension.extension()
        info = getattr(module, "build_info", None)
        row["build_info"] = info() if callable(info) else None
        row["ops"] = sorted(name for name in dir(torch.ops.fastattn_cuda) if not name.startswith("_"))
    return row


def env(out: Path, build: dict) -> int:
    import fastattn

    from . import ceilings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    versions = versions_row()
    append(out, versions)
    append(out, device_row(device))
    smi = nvidia_smi_row()
    append(out, smi)
    print(smi["text"] or smi["reason"])
    append(out, {"kind": "build", **build})
    extension = extension_row()
    append(out, extension)
    append(out, {"kind": "backends", "available": fastattn.available_backends()})
    print(f"torch {versions['torch']} (CUDA {versions['torch_cuda']}), triton {versions['triton']}, "
          f"nvcc {versions['nvcc']}; fastattn._C: "
          + ("loaded, " + str(extension["build_info"]) if extension["loaded"] else extension["reason"]))
    measured = ceilings.measure(device)
    append(out, {"kind": "ceilings", "device": device.type, **measured})
    print(f"ceilings on {device}: matmul {measured['matmul_tflops']:.4g} TFLOP/s ({measured['matmul_desc']}), "
          f"copy {measured['copy_tbps']:.4g} TB/s ({measured['copy_desc']})")
    # On a GPU the extension must load: the cuda backend's smoke cases would only be skipped.
    return 1 if device.type == "cuda" and not extension["loaded"] else 0


# ----------------------------------------------------------------------------- autotune


def _attention_shape(batch, heads, seqlen, head_dim, causal):
    return {"op": "attention", "batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim,
            "causal": causal}


# The shapes whose tuned configs matter most (bench stage shapes), in order of value.
AUTOTUNE_SHAPES = (
    _attention_shape(4, 16, 4096, 128, True),
    _attention_shape(4, 16, 4096, 128, False),
    {"op": "ffn", "tokens": 16384, "d_model": 4096, "d_hidden": 16384},
    {"op": "gated_ffn", "tokens": 16384, "d_model": 4096, "d_hidden": 11008},
    {"op": "layer_norm", "rows": 32768, "hidden": 4096},
    {"op": "rms_norm", "rows": 32768, "hidden": 8192},
    {"op": "decode_attention", "batch": 32, "cache_len": 32768},
    {"op": "decode_attention", "batch": 1, "cache_len": 32768},
    _attention_shape(4, 32, 4096, 64, True),
    _attention_shape(4, 32, 4096, 64, False),
)
# The same kinds of call at interpreter sizes (the dry run: nothing is tuned there).
AUTOTUNE_SHAPES_TINY = (
    _attention_shape(1, 2, 64, 32, True),
    {"op": "ffn", "tokens": 16, "d_model": 32, "d_hidden": 64},
    {"op": "layer_norm", "rows": 8, "hidden": 64},
    {"op": "decode_attention", "batch": 2, "cache_len": 64},
)


def _autotune_call(shape: dict, device: torch.device, dtype: torch.dtype) -> None:
    """One forward and backward (forward only for decode) of `shape` on the triton backend."""
    import fastattn

    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*size, scale=1.0):
        return (torch.randn(size, generator=g, device=device) * scale).to(dtype).requires_grad_()

    op = shape["op"]
    if op == "attention":
        b, h, s, d = shape["batch"], shape["heads"], shape["seqlen"], shape["head_dim"]
        out = fastattn.attention(leaf(b, h, s, d), leaf(b, h, s, d), leaf(b, h, s, d), causal=shape["causal"],
                                 backend="triton")
    elif op in ("ffn", "gated_ffn"):
        m, d, h = shape["tokens"], shape["d_model"], shape["d_hidden"]
        if op == "ffn":
            out = fastattn.ffn(leaf(m, d), leaf(h, d, scale=d ** -0.5), leaf(h, scale=0.1),
                               leaf(d, h, scale=h ** -0.5), leaf(d, scale=0.1), backend="triton")
        else:
            out = fastattn.gated_ffn(leaf(m, d), leaf(h, d, scale=d ** -0.5), leaf(h, d, scale=d ** -0.5),
                                     leaf(d, h, scale=h ** -0.5), backend="triton")
    elif op in ("layer_norm", "rms_norm"):
        rows, hidden = shape["rows"], shape["hidden"]
        x, w = leaf(rows, hidden), leaf(hidden, scale=0.1)
        out = (fastattn.layer_norm(x, w, leaf(hidden, scale=0.1), backend="triton") if op == "layer_norm"
               else fastattn.rms_norm(x, w, backend="triton"))
    elif op == "decode_attention":
        b, n = shape["batch"], shape["cache_len"]
        heads, kv_heads, d = (32, 4, 128) if n >= 1024 else (4, 2, 32)
        with torch.no_grad():
            fastattn.decode_attention(leaf(b, heads, 1, d), leaf(b, kv_heads, n, d), leaf(b, kv_heads, n, d),
                                      torch.full((b,), n, dtype=torch.int32, device=device), backend="triton")
        return
    else:
        raise ValueError(f"no autotune call for op {op!r}")
    out.float().sum().backward()


def autotuners() -> list:
    """Every Triton Autotuner object the kernel modules hold (module globals, and one
    level into dicts and lists, where wrappers built on first use are kept)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    found = []
    for name in ("attention", "decode", "ffn", "layer_norm"):
        try:
            module = importlib.import_module(f"fastattn.kernels.{name}")
        except ImportError:
            continue
        for value in list(vars(module).values()):
            items = list(value.values()) if isinstance(value, dict) else (
                list(value) if isinstance(value, (list, tuple)) else [value])
            for item in items:
                if isinstance(item, Autotuner) and all(item is not f for f in found):
                    found.append(item)
    return found


def _kernel_name(tuner) -> str:
    fn = getattr(tuner, "base_fn", None) or getattr(tuner, "fn", None)
    return getattr(fn, "__name__", repr(fn))


def _config_dict(config) -> dict:
    kwargs = dict(getattr(config, "kwargs", {}) or {})
    return {**kwargs, "num_warps": getattr(config, "num_warps", None), "num_stages": getattr(config, "num_stages", None)}


def _new_config_rows(label: str, seen: set) -> list[dict]:
    rows = []
    for tuner in autotuners():
        new_keys = [key for key in tuner.cache if (id(tuner), key) not in seen]
        timings = getattr(tuner, "configs_timings", None) if len(new_keys) == 1 else None
        for key in new_keys:
            seen.add((id(tuner), key))
            names = list(getattr(tuner, "keys", []) or [])
            row = {"kind": "config", "shape": label, "kernel": _kernel_name(tuner),
                   "key": dict(zip(names, key[: len(names)])), "key_dtypes": list(key[len(names):]),
                   "config": _config_dict(tuner.cache[key]), "bench_time_s": getattr(tuner, "bench_time", None)}
            if timings:
                row["tried"] = [{"config": _config_dict(c), "ms": list(t) if isinstance(t, (list, tuple)) else t}
                                for c, t in sorted(timings.items(), key=lambda ct: _first(ct[1]))]
            rows.append(row)
    return rows


def _first(value) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) else value)


class _OutOfTime(BaseException):
    """The autotune step's time is up (an alarm or SIGTERM); not an Exception, so that
    no error handler swallows it."""


def _out_of_time(signum, frame):
    raise _OutOfTime(signal.Signals(signum).name)


def _label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def autotune(out: Path, seconds: float, tiny: bool) -> int:
    from .. import backends
    from ..kernels import _config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    shapes = AUTOTUNE_SHAPES_TINY if tiny or device.type != "cuda" else AUTOTUNE_SHAPES
    enabled = _config.autotune_enabled()
    append(out, {"kind": "autotune", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                 "enabled": enabled, "interpreter": backends.triton_interpreter_on(),
                 "note": None if enabled else
                 f"{_config.AUTOTUNE_ENV}=1 is not in force (or the Triton interpreter is on): the kernels ran "
                 "their default configs and nothing was tuned"})
    why = backends.backend_unavailable_reason("triton", device)
    if why is not None:
        append(out, {"kind": "summary", "shapes_done": 0, "configs": 0, "reason": why})
        print(f"autotune: triton backend unavailable: {why}")
        return 1
    deadline = time.monotonic() + seconds
    signal.signal(signal.SIGTERM, _out_of_time)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(max(1, math.ceil(seconds)))
    seen: set = set()
    done = configs = 0
    failures = 0
    out_of_time = None
    for shape in shapes:
        label = _label(shape)
        if out_of_time is not None or time.monotonic() > deadline:
            append(out, {"kind": "skipped", "shape": label, "reason": f"the step's {seconds:.0f} s were used up"})
            continue
        started = time.monotonic()
        try:
            _autotune_call(shape, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except _OutOfTime as exc:
            out_of_time = str(exc)
            rows = _new_config_rows(label, seen)
            for row in rows:
                append(out, row)
            configs += len(rows)
            append(out, {"kind": "interrupted", "shape": label, "signal": out_of_time, "configs": len(rows),
                         "seconds": round(time.monotonic() - started, 2)})
            print(f"autotune {label}: stopped by {out_of_time}; {len(rows)} tuned keys kept")
            continue
        except Exception as exc:  # noqa: BLE001 - every shape gets its row
            failures += 1
            append(out, {"kind": "error", "shape": label, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"autotune {label}: {type(exc).__name__}: {exc}")
            continue
        rows = _new_config_rows(label, seen)
        for row in rows:
            append(out, row)
        done += 1
        configs += len(rows)
        append(out, {"kind": "shape", "shape": label, "seconds": round(time.monotonic() - started, 2),
                     "configs": len(rows)})
        print(f"autotune {label}: {len(rows)} tuned keys in {time.monotonic() - started:.1f} s")
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    append(out, {"kind": "summary", "shapes_done": done, "shapes": len(shapes), "configs": configs,
                 "errors": failures, "stopped_by": out_of_time})
    return 1 if failures else 0


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.bench.device_run", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, device, nvidia-smi, build, extension, backends, ceilings")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--build-status", default="unknown")
    e.add_argument("--build-seconds", type=float, default=None)
    e.add_argument("--build-note", default="")
    a = sub.add_parser("autotune", help="tune the key shapes (with FASTATTN_AUTOTUNE=1) and write the chosen configs")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--seconds", type=float, default=60.0, help="stop starting new shapes after this long")
    a.add_argument("--tiny", action="store_true", help="interpreter-sized shapes (the dry run)")
    args = p.parse_args(argv)
    if args.command == "env":
        return env(args.out, {"status": args.build_status, "seconds": args.build_seconds, "note": args.build_note})
    return autotune(args.out, args.seconds, args.tiny)


if __name__ == "__main__":
    sys.exit(main())
