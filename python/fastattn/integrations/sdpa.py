"""fastattn.patch_sdpa(): route torch.nn.functional.scaled_dot_product_attention
through fastattn.scaled_dot_product_attention.

    with fastattn.patch_sdpa():            # or patch_sdpa(backend="triton")
        out = model(x)                     # every F.scaled_dot_product_attention call inside

A call fastattn cannot serve (a nested tensor, a device other than CPU/CUDA, an
argument it does not know, or a ValueError/TypeError from its checks or backend
resolution: e.g. a named backend that does not support the head_dim) goes to the
original PyTorch function unchanged, so the patch never makes a working call fail.
fastattn's own torch backend reaches PyTorch's function, bound at import
(fastattn.ops.attention.TORCH_SDPA).
The patch replaces the attribute of torch.nn.functional for the whole process (all
threads) while the context is open; code that imported the function by name before
(`from torch.nn.functional import scaled_dot_product_attention`) keeps PyTorch's.
Contexts nest: each restores what it found on exit.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..backends import use_backend
from ..nn import check_backend
from ..ops.attention import scaled_dot_product_attention

_KNOWN = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}


def _servable(tensors) -> bool:
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.is_nested or t.device.type not in ("cpu", "cuda"):
            return False
    return True


def make_sdpa(original: Callable, backend: Optional[str] = None) -> Callable:
    """A drop-in for `original` (F.scaled_dot_product_attention) that runs fastattn
    where it can and `original` elsewhere. backend None = fastattn's current default."""

    @functools.wraps(original)
    def sdpa(query, key, value, *args, **kwargs):
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args), **kwargs)
        if len(args) > len(names) or set(call) - _KNOWN or not _servable((query, key, value)):
            return original(query, key, value, *args, **kwargs)
        mask = call.get("attn_mask")
        if mask is not None and not _servable((mask,)):
            return original(query, key, value, *args, **kwargs)
        try:
            context = use_backend(backend) if backend is not None else contextlib.nullcontext()
            with context:
                return scaled_dot_product_attention(query, key, value, **call)
        except (ValueError, TypeError):
            return original(query, key, value, *args, **kwargs)

    sdpa.__fastattn_patch__ = True
    return sdpa


@contextlib.contextmanager
def patch_sdpa(backend: Optional[str] = None) -> Iterator[Callable]:
    """Context manager: F.scaled_dot_product_attention -> fastattn (falling back to
    PyTorch per call where fastattn cannot serve it). Yields the patched function."""
    check_backend(backend)
    original = F.scaled_dot_product_attention
    patched = make_sdpa(original, backend)
    F.scaled_dot_product_attention = patched
    try:
        yield patched
    finally:
        F.scaled_dot_product_attention = original
