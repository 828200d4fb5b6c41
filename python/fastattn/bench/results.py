"""Results: the JSON Lines file of TARGETS.md, and Markdown tables made from it.

One file per run: a header row (`"kind": "header"`: the measured ceilings, the
device and versions, the sweep) and one row per measurement:

    {"op", "mode", "provider", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80",
     "tflops" | "gbps" | "tokens_per_s", "fraction_of_ceiling", "max_abs_err_vs_fp32",
     "device", "torch", "triton", "cuda", "git_commit", "date",
     "status", "reason", "rel_err_vs_fp32", "reps", "peak_mem_mb", "note"}

status is ok (timed), failed (wrong result vs the fp32 reference: not timed), skipped
(the provider cannot run the case; reason says why) or error (it raised). A number
that was not measured is null.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

from . import counting
from .ceilings import copy_gbps
from .spec import PROVIDER_ORDER

METRIC_UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}
INFO_KEYS = ("device", "torch", "triton", "cuda", "git_commit", "date")


def metric_of(op: str) -> str:
    if op.startswith("model"):
        return "tokens_per_s"
    return "tflops" if counting.WORK_KIND[op] == "flops" else "gbps"


def make_row(record: dict, dtype_name: str, info: dict, ceilings: dict, tokens: Optional[int] = None) -> dict:
    """A results row from the harness's record {op, mode, provider, shape, outcome}."""
    op, mode, outcome = record["op"], record["mode"], record["outcome"]
    metric = metric_of(op)
    t = outcome.timing
    row = {"op": op, "mode": mode, "provider": record["provider"], "shape": record["shape"], "dtype": dtype_name,
           "ms_p50": None, "ms_p20": None, "ms_p80": None, metric: None, "fraction_of_ceiling": None,
           "max_abs_err_vs_fp32": outcome.max_abs_err}
    if t is not None:
        row.update(ms_p50=t.ms_p50, ms_p20=t.ms_p20, ms_p80=t.ms_p80)
        if metric == "tokens_per_s":
            row[metric] = tokens / (t.ms_p50 * 1e-3) if tokens else None
        else:
            amount = counting.work(op, record["shape"], mode, dtype_name)
            _, value = counting.throughput(op, amount, t.ms_p50)
            row[metric] = value
            row["fraction_of_ceiling"] = counting.fraction_of_ceiling(metric, value, ceilings)
    row.update({k: info.get(k) for k in INFO_KEYS})
    row.update(status=outcome.status, reason=outcome.reason, rel_err_vs_fp32=outcome.rel_err,
               reps=t.reps if t is not None else None, peak_mem_mb=outcome.peak_mem_mb, note=outcome.note or None)
    return row


class ResultsWriter:
    """Appends rows to <out_dir>/<stem>.jsonl as they come (a run cut short keeps what
    it measured) and keeps them for the tables and plots."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.rows: list[dict] = []
        self._file = open(self.path, "w", encoding="utf-8")
        self._write(header)

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row, default=_jsonable) + "\n")
        self._file.flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write(row)

    def close(self) -> None:
        self._file.close()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def read_results(path: Path) -> tuple[dict, list[dict]]:
    """(header, rows) of a results file."""
    header, rows = {}, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("kind") == "header":
                header = row
            else:
                rows.append(row)
    return header, rows


# ----------------------------------------------------------------------------- tables


def provider_sort_key(name: str) -> tuple:
    return (PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER), name)


def shape_label(op: str, shape: dict) -> str:
    from .specs import get_spec

    try:
        return get_spec(op).label(shape)
    except Exception:  # noqa: BLE001 - an op unknown to this version: a plain label
        return ", ".join(f"{k}={v}" for k, v in shape.items())


def format_number(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(row: Optional[dict], metric: str) -> str:
    if row is None:
        return ""
    status = row.get("status")
    if status == "ok":
        return format_number(row.get(metric))
    return {"failed": "FAIL", "error": "ERR"}.get(status, "—")


def op_table(op: str, mode: str, rows: list[dict], *, with_notes: bool = True, skip_notes: bool = True) -> str:
    """A Markdown table for one op and mode: a line per shape, a column per provider
    (providers skipped everywhere are left out), cells in the op's unit; below it why
    cells are not numbers (skip_notes=False: failures and errors only)."""
    rows = [r for r in rows if r["op"] == op and r["mode"] == mode]
    if not rows:
        return ""
    metric = metric_of(op)
    providers = sorted({r["provider"] for r in rows}, key=provider_sort_key)
    shown = [p for p in providers if any(r["provider"] == p and r.get("status") != "skipped" for r in rows)]
    by_shape: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        by_shape.setdefault(json.dumps(r["shape"], sort_keys=True), {"shape": r["shape"]})[r["provider"]] = r
    lines = [f"| shape | {' | '.join(shown)} |", "|---|" + "---:|" * len(shown)]
    for entry in by_shape.values():
        cells = [_cell(entry.get(p), metric) for p in shown]
        lines.append(f"| {shape_label(op, entry['shape'])} | {' | '.join(cells)} |")
    if with_notes:
        notes = provider_notes(r for r in rows if skip_notes or r.get("status") != "skipped")
        if notes:
            lines.append("")
            lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines)


def provider_notes(rows: Iterable[dict]) -> list[str]:
    """One line per (provider, status, reason) that is not ok: why cells are empty."""
    counts: "OrderedDict[tuple, int]" = OrderedDict()
    for r in sorted(rows, key=lambda r: provider_sort_key(r["provider"])):
        if r.get("status") != "ok":
            key = (r["provider"], r.get("status"), r.get("reason") or "")
            counts[key] = counts.get(key, 0) + 1
    return [f"{provider} {status} ({n} case{'s' if n > 1 else ''}): {reason}" for (provider, status, reason), n
            in counts.items()]


def skip_reasons(rows: Iterable[dict]) -> list[str]:
    """Each distinct (provider, reason) of the skipped rows once, with its count and ops."""
    found: "OrderedDict[tuple, list]" = OrderedDict()
    for r in sorted(rows, key=lambda r: provider_sort_key(r["provider"])):
        if r.get("status") == "skipped":
            entry = found.setdefault((r["provider"], r.get("reason") or ""), [0, []])
            entry[0] += 1
            if r["op"] not in entry[1]:
                entry[1].append(r["op"])
    return [f"{provider} skipped ({n} case{'s' if n > 1 else ''}: {', '.join(ops)}): {reason}"
            for (provider, reason), (n, ops) in found.items()]


def run_summary(header: dict) -> str:
    """A line naming the device, versions, the threads of a CPU run and the measured
    ceilings (the copy in GB/s, the unit of the memory-bound rows)."""
    parts = [f"{header.get('device', '?')}", f"torch {header.get('torch')}"]
    if header.get("triton"):
        parts.append(f"triton {header['triton']}")
    if header.get("cuda"):
        parts.append(f"CUDA {header['cuda']}")
    commit = header.get("git_commit", "?") + (" (uncommitted changes)" if header.get("git_dirty") else "")
    parts.append(f"commit {commit}")
    parts.append(f"{header.get('date', '?')}")
    ceilings = []
    if header.get("matmul_tflops"):
        ceilings.append(f"matmul {header['matmul_tflops']:.0f} TFLOP/s ({header.get('matmul_desc', '')})"
                        if header["matmul_tflops"] >= 10 else
                        f"matmul {header['matmul_tflops']:.3g} TFLOP/s ({header.get('matmul_desc', '')})")
    copy = copy_gbps(header)
    if copy:
        ceilings.append(f"copy {format_number(copy)} GB/s ({header.get('copy_desc', '')})")
    line = ", ".join(parts)
    if header.get("cpu_threads"):
        cores = header.get("cpu_cores")
        of = f" of {cores} cores" if cores else ""
        line += (f". Every timing, the ceilings' included, on {header['cpu_threads']} torch "
                 f"thread{'s' if header['cpu_threads'] > 1 else ''}{of}")
    if ceilings:
        line += ". Ceilings measured in the same run: " + "; ".join(ceilings) + "."
    return line


def markdown_report(header: dict, rows: list[dict], *, title_level: int = 1) -> str:
    """Every op and mode of a run as Markdown tables, with the run's summary."""
    hashes = "#" * title_level
    out = [f"{hashes} fastattn benchmarks", "", run_summary(header), ""]
    if header.get("sweep"):
        out += [f"Sweep `{header['sweep']}`, dtype {header.get('dtype')}. Cells: the median's throughput "
                "(TFLOP/s, GB/s or tokens/s); FAIL = wrong result vs the fp32 reference (not timed), "
                "ERR = raised, — = skipped (each reason once, at the end).", ""]
    for note in header.get("notes", []):
        out += [f"> {note}", ""]
    ops = list(OrderedDict.fromkeys(r["op"] for r in rows))
    for op in ops:
        for mode in OrderedDict.fromkeys(r["mode"] for r in rows if r["op"] == op):
            unit = METRIC_UNITS[metric_of(op)]
            out += [f"{hashes}# {op} — {mode} ({unit})", "", op_table(op, mode, rows, skip_notes=False), ""]
    for op, reason in header.get("skipped_ops", {}).items():
        out += [f"{hashes}# {op}", "", f"Not measured: {reason}", ""]
    skipped = skip_reasons(rows)
    if skipped:
        out += [f"{hashes}# Skipped cases", "", *(f"- {line}" for line in skipped), ""]
    return "\n".join(out).rstrip() + "\n"
