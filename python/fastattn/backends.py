"""Backend names, availability, the process-wide default, and per-call resolution.

| name   | what runs                                                              |
|--------|------------------------------------------------------------------------|
| naive  | explicit PyTorch math (reference.py): the baseline and the test oracle |
| torch  | PyTorch's best built-ins (F.scaled_dot_product_attention, F.layer_norm) |
| triton | our Triton kernels (CPU tensors only under TRITON_INTERPRET=1)         |
| cuda   | our CUDA kernels from fastattn._C                                      |
| auto   | the fastest of ours that serves the call; CPU tensors -> torch         |

Each op module describes which calls a backend can serve with a function
`reason(backend, call) -> str | None` (None = can serve). `resolve` turns the
requested name into a concrete backend, or raises a ValueError saying why not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Callable, Iterator, Optional

import torch

from . import _extension

BACKENDS = ("naive", "torch", "triton", "cuda", "auto")
CONCRETE_BACKENDS = ("naive", "torch", "triton", "cuda")
# auto's preference order per device type; the first that can serve the call wins.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch", "naive"), "cpu": ("torch", "naive")}

_state = threading.local()
_global_default = "auto"

# Whether the triton package is installed: decided once, here, at import. Availability is
# asked inside traced code (resolve() runs under torch.compile), and torch < 2.13 cannot
# trace importlib.util.find_spec.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _check_name(name: object, argument: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend() -> str:
    """The current default backend: the innermost `use_backend`, else `set_backend`'s."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _global_default


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when an op gets `backend=None`."""
    global _global_default
    _global_default = _check_name(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: ops called inside (on this thread) default to `name`."""
    _check_name(name, "use_backend(name)")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why `name` cannot run on this machine (or on `device`), or None if it can."""
    if name in ("naive", "torch"):
        return None
    if name == "triton":
        if not TRITON_INSTALLED:
            return "the triton package is not installed"
        if device is not None and device.type == "cpu" and not triton_interpreter_on():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        if device is None and not triton_interpreter_on() and not torch.cuda.is_available():
            return "no CUDA device and TRITON_INTERPRET is not set"
        return None
    if name == "cuda":
        if device is not None and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        return _extension.unavailable_reason()
    raise ValueError(f"backend must be one of {', '.join(CONCRETE_BACKENDS)}; got {name!r}")


def available_backends() -> list[str]:
    """Backends that can run on this machine, in the order of BACKENDS ('auto' always)."""
    return [name for name in BACKENDS if name == "auto" or backend_unavailable_reason(name) is None]


def resolve(
    op: str,
    requested: Optional[str],
    device: torch.device,
    reason: Callable[[str], Optional[str]],
) -> str:
    """Pick the concrete backend for one call of `op` on `device`.

    `reason(backend)` says why a backend cannot serve this particular call (dtype,
    head_dim, option not implemented ...) or None. Raises ValueError naming the
    backend and the reason when an explicitly requested backend cannot serve it.
    """
    name = _check_name(get_backend() if requested is None else requested)
    if name != "auto":
        why = backend_unavailable_reason(name, device) or reason(name)
        if why is not None:
            raise ValueError(f"backend {name!r} cannot serve this {op} call: {why}")
        return name
    order = AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
    refusals = []
    for candidate in order:
        why = backend_unavailable_reason(candidate, device) or reason(candidate)
        if why is None:
            return candidate
        refusals.append(f"{candidate}: {why}")
    raise ValueError(f"no backend can serve this {op} call ({'; '.join(refusals)})")
