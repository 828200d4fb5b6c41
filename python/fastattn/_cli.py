"""What the command-line tools (fastattn-train, fastattn-generate, fastattn-bench) share:
user errors as one line and exit status 2, and the --help format.

A user error (a missing checkpoint, a device or backend this machine cannot run, an
output folder that holds another run ...) is raised as UsageError with a message
saying what is wrong and what to do; `run` prints it as `<prog>: error: <message>`
and returns 2, as argparse does for a bad option. Anything else is a genuine error
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import torch

from . import backends


SEED_RANGE = (-(2**63), 2**64)  # the seeds torch.manual_seed accepts: [low, high)


class UsageError(ValueError):
    """A mistake in how the tool was called: one line, exit status 2, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default after its help (unless
    the default is None or a flag's False, where the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown option, a bad value for a typed or
    `choices` option) are UsageErrors: one line through `run`, not the usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run(prog: str, body: Callable[[Optional[Sequence[str]]], Optional[int]],
        argv: Optional[Sequence[str]] = None) -> int:
    """body(argv)'s exit status (0 when it returns None); 2 with a one-line message on
    stderr when it raises UsageError."""
    try:
        status = body(argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0 if status is None else status


def resolve_device(text: str, option: str = "--device") -> torch.device:
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N' -> a device this process can
    use, or UsageError saying why not."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"{option} {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise UsageError(f"{option} {text}: the fastattn tools run on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if torch.version.cuda is None:
        raise UsageError(f"{option} {text}: this torch ({torch.__version__}) is a CPU build; install a CUDA build "
                         f"of torch or use {option} cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"{option} {text}: no CUDA device is visible to this process; use {option} cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {text}: there are {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def check_values(checks: Sequence[tuple[str, object, bool, str]]) -> None:
    """UsageError `<option> must be <need>, got <value>` for the first (option, value,
    ok, need) whose ok is False."""
    for option, value, ok, need in checks:
        if not ok:
            raise UsageError(f"{option} must be {need}, got {value}")


def check_backend_runs(backend: Optional[str], device: torch.device, option: str = "--backend") -> None:
    """UsageError when the named backend cannot run on `device` at all (not installed,
    not built, Triton on CPU without the interpreter ...)."""
    if backend in (None, "auto"):
        return
    why = backends.backend_unavailable_reason(backend, device)
    if why is not None:
        usable = [b for b in backends.BACKENDS if b == "auto" or backends.backend_unavailable_reason(b, device) is None]
        raise UsageError(f"{option} {backend} cannot run on {device.type}: {why}; use one of {', '.join(usable)}")


def backend_refusal(exc: BaseException) -> Optional[str]:
    """The message of a ValueError in which backend resolution refused a call (a
    backend asked for by name that cannot serve an op's dtype, head_dim or option),
    else None."""
    text = str(exc)
    if isinstance(exc, ValueError) and ("cannot serve this" in text or text.startswith("no backend can serve")):
        return text
    return None
