"""What a results file records about where and when it was measured."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine() or 'unknown'}, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """The folder name of a device under benchmarks/results/: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit() -> tuple[str, Optional[bool]]:
    """(short commit, dirty) of the checkout; FASTATTN_GIT_COMMIT overrides it (for a
    copy of the tree without .git, e.g. on the GPU machine)."""
    forced = os.environ.get("FASTATTN_GIT_COMMIT")
    if forced:
        return forced, None
    commit = _git("rev-parse", "--short=10", "HEAD")
    if commit is None:
        return "unknown", None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def run_info(device: torch.device) -> dict:
    """device, torch, triton, cuda, git_commit, date (the fields every row carries), and
    for a CPU run cpu_threads and cpu_cores (the header's)."""
    commit, dirty = git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        # A CPU run's thread count (what every timing used) beside the machine's cores.
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cpu_cores": os.cpu_count() if device.type == "cpu" else None,
    }


def results_stem(info: dict) -> str:
    """<YYYY-MM-DD>-<commit>: the name of a run's files (newest sorts last)."""
    return f"{info['date'][:10]}-{info['git_commit']}"
