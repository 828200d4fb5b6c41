"""Lazy loading of the CUDA extension fastattn._C.

Importing fastattn never imports the extension. The first call that needs the `cuda`
backend loads it; a failure is remembered and reported as a reason string (the
backend is then unavailable), never raised at import.

That first call may come inside code that torch.compile traces (backend resolution
runs in every op), where importing a module cannot be traced: `unavailable_reason` is
therefore a constant to the compiler, run in Python when a trace reaches it.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

_module = None
_error: Optional[str] = None
_tried = False


def _cuda_device_present() -> bool:
    return torch.cuda.is_available()


def _load() -> None:
    global _module, _error, _tried
    if _tried:
        return
    _tried = True
    if not _cuda_device_present():
        _error = "no CUDA device is available"
        return
    try:
        _module = importlib.import_module("fastattn._C")
    except ImportError as exc:
        _error = (
            "the CUDA extension fastattn._C is not built or failed to load "
            f"({exc}); build it with `pip install --no-build-isolation -e .` on a "
            "machine with a CUDA torch and nvcc"
        )


@torch.compiler.assume_constant_result
def unavailable_reason() -> Optional[str]:
    """None when fastattn._C is loaded and a CUDA device exists, else why not."""
    _load()
    return None if _module is not None else _error


def extension():
    """The loaded fastattn._C module; raises RuntimeError with the reason if absent."""
    _load()
    if _module is None:
        raise RuntimeError(_error)
    return _module
