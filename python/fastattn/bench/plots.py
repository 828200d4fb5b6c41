"""PNG plots of a run, one file per op: a panel per mode and shape group, throughput
against the swept size, a line per provider; the measured ceiling dashed. A run without
a CUDA GPU says on the figure that it is not a statement about kernel speed."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from .ceilings import copy_gbps
from .results import METRIC_UNITS, metric_of, provider_sort_key, shape_label

CEILING_NAME = {"tflops": "matmul ceiling", "gbps": "copy ceiling"}
CPU_PLOT_NOTE = ("No CUDA GPU: a CPU sweep that checks the harness runs. Not a statement about kernel speed; "
                 "GPU numbers need a CUDA GPU.")


def ceiling_of(header: dict, metric: str) -> Optional[float]:
    """The run's ceiling in the metric's unit (TFLOP/s or GB/s), or None."""
    if metric == "tflops":
        return header.get("matmul_tflops")
    if metric == "gbps":
        return copy_gbps(header)
    return None


def is_cpu_run(header: dict) -> bool:
    return not header.get("cuda") and str(header.get("device", "")).startswith("CPU")


def _note_cpu_run(fig, header: dict) -> None:
    if is_cpu_run(header):
        fig.text(0.5, 0.005, CPU_PLOT_NOTE, ha="center", va="bottom", fontsize=8, color="#b22222", wrap=True)


OURS = ("triton", "cuda", "auto")
COLORS = {
    "naive": "#7f7f7f", "torch": "#1f77b4", "torch-flash": "#ff7f0e", "torch-efficient": "#2ca02c",
    "torch-cudnn": "#9467bd", "torch-math": "#c7c7c7", "naive-compile": "#8c564b", "torch-compile": "#17becf",
    "gemm-only": "#bcbd22", "liger": "#e377c2", "flash-attn": "#ffbb78", "triton": "#d62728", "cuda": "#000000",
    "auto": "#d62728",
}


def provider_color(name: str) -> str:
    """One color per provider, the same in every plot (ours: red and black, drawn thicker)."""
    return COLORS.get(name, "#aec7e8")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_op(header: dict, rows: list[dict], op: str, path: Path) -> Optional[Path]:
    """Write the op's plot to `path`; None when the op has no timed row."""
    from .specs import get_spec

    rows = [r for r in rows if r["op"] == op and r.get("status") == "ok"]
    metric = metric_of(op)
    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        return None
    spec = get_spec(op)
    plt = _pyplot()
    if op.startswith("model"):
        return _bar_plot(plt, header, rows, op, metric, path)
    modes = list(OrderedDict.fromkeys(r["mode"] for r in rows))
    groups = list(OrderedDict.fromkeys(tuple((k, r["shape"].get(k)) for k in spec.group_keys()) for r in rows))
    panels: "OrderedDict[tuple, list[dict]]" = OrderedDict(((m, g), []) for g in groups for m in modes)
    for r in rows:
        panels[(r["mode"], tuple((k, r["shape"].get(k)) for k in spec.group_keys()))].append(r)
    panels = OrderedDict((key, value) for key, value in panels.items() if value)
    # A row of panels per shape group and a column per mode; one mode: wrap the groups.
    columns = len(modes) if len(modes) > 1 else min(4, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.3 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    providers = sorted({r["provider"] for r in rows}, key=provider_sort_key)
    ceiling, ceiling_name = ceiling_of(header, metric), CEILING_NAME.get(metric, "")
    for ax, ((mode, group), panel_rows) in zip(axes.flat, panels.items()):
        for provider in providers:
            points = sorted((r["shape"][spec.x_key], r[metric]) for r in panel_rows if r["provider"] == provider)
            if points:
                ours = provider in OURS
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4 if ours else 3,
                        linewidth=2.2 if ours else 1.2, label=provider, color=provider_color(provider))
        if ceiling:
            ax.axhline(ceiling, linestyle="--", color="gray", linewidth=1, label=ceiling_name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(spec.x_key)
        ax.set_ylabel(METRIC_UNITS[metric])
        title = " · ".join([mode] + [f"{k}={v}" for k, v in group])
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    cpu = is_cpu_run(header)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.03 if cpu else 0.0))
    fig.suptitle(f"{op} — {header.get('device', '')}, {header.get('dtype', '')}", fontsize=11)
    bottom = (0.07 if lines == 1 else 0.04) + (0.05 if cpu else 0.0)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    _note_cpu_run(fig, header)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_plot(plt, header, rows, op, metric, path):
    shapes: "OrderedDict[str, list[dict]]" = OrderedDict()
    for r in rows:
        shapes.setdefault(json.dumps(r["shape"], sort_keys=True), []).append(r)
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, shape_rows in zip(axes.flat, shapes.values()):
        shape_rows = sorted(shape_rows, key=lambda r: provider_sort_key(r["provider"]))
        ax.bar([r["provider"] for r in shape_rows], [r[metric] for r in shape_rows],
               color=[provider_color(r["provider"]) for r in shape_rows])
        ax.set_title(shape_label(op, shape_rows[0]["shape"]), fontsize=9)
        ax.set_ylabel(METRIC_UNITS[metric])
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{op} — {header.get('device', '')}, {header.get('dtype', '')}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if is_cpu_run(header) else 0, 1, 0.92))
    _note_cpu_run(fig, header)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
