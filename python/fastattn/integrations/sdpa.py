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

Which calls went where: the patched function the context yields counts them,

    with fastattn.patch_sdpa() as sdpa:
        model(x)
    sdpa.counts     # {"fastattn": 24, "pytorch": 2}
    sdpa.fallbacks  # {"ValueError: ...": 2}: why each PyTorch call was not served

and every call that goes to PyTorch is logged at DEBUG level on the logger
"fastattn.integrations.sdpa" (`logging.basicConfig(level=logging.DEBUG)` shows them).
Code that never calls F.scaled_dot_product_attention is not affected: e.g.
nn.TransformerEncoderLayer / nn.MultiheadAttention in eval mode under no_grad take
PyTorch's fused "fast path" (torch._transformer_encoder_layer_fwd,
torch._native_multi_head_attention), which never calls SDPA through F.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..backends import use_backend
from ..nn import check_backend
from ..ops.attention import scaled_dot_product_attention

_KNOWN = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
logger = logging.getLogger(__name__)


def _unservable(names_and_tensors) -> Optional[str]:
    """Why fastattn cannot take these arguments (not tensors, nested, on another
    device), or None."""
    for name, t in names_and_tensors:
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.is_nested:
            return f"{name} is a nested tensor"
        if t.device.type not in ("cpu", "cuda"):
            return f"{name} is on {t.device.type}"
    return None


def make_sdpa(original: Callable, backend: Optional[str] = None) -> Callable:
    """A drop-in for `original` (F.scaled_dot_product_attention) that runs fastattn
    where it can and `original` elsewhere. backend None = fastattn's current default.
    The function counts its calls: `.counts` {"fastattn": n, "pytorch": m} and
    `.fallbacks` {reason: count} for the calls PyTorch answered."""
    counts = {"fastattn": 0, "pytorch": 0}
    fallbacks: dict[str, int] = {}

    def to_pytorch(reason, query, key, value, args, kwargs):
        counts["pytorch"] += 1
        fallbacks[reason] = fallbacks.get(reason, 0) + 1
        logger.debug("F.scaled_dot_product_attention -> PyTorch: %s", reason)
        return original(query, key, value, *args, **kwargs)

    @functools.wraps(original)
    def sdpa(query, key, value, *args, **kwargs):
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args), **kwargs)
        if len(args) > len(names):
            return to_pytorch(f"{len(args)} positional arguments after value (fastattn knows {len(names)})",
                              query, key, value, args, kwargs)
        unknown = sorted(set(call) - _KNOWN)
        if unknown:
            return to_pytorch(f"an argument fastattn does not know: {', '.join(unknown)}", query, key, value,
                              args, kwargs)
        tensors = [("query", query), ("key", key), ("value", value)]
        if call.get("attn_mask") is not None:
            tensors.append(("attn_mask", call["attn_mask"]))
        reason = _unservable(tensors)
        if reason is not None:
            return to_pytorch(reason, query, key, value, args, kwargs)
        try:
            context = use_backend(backend) if backend is not None else contextlib.nullcontext()
            with context:
                out = scaled_dot_product_attention(query, key, value, **call)
        except (ValueError, TypeError) as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            return to_pytorch(f"{type(exc).__name__}: {first_line}", query, key, value, args, kwargs)
        counts["fastattn"] += 1
        return out

    sdpa.__fastattn_patch__ = True
    sdpa.counts = counts
    sdpa.fallbacks = fallbacks
    return sdpa


@contextlib.contextmanager
def patch_sdpa(backend: Optional[str] = None) -> Iterator[Callable]:
    """Context manager: F.scaled_dot_product_attention -> fastattn (falling back to
    PyTorch per call where fastattn cannot serve it). Yields the patched function, whose
    `.counts` and `.fallbacks` say which calls went where (see the module docstring)."""
    check_backend(backend)
    original = F.scaled_dot_product_attention
    patched = make_sdpa(original, backend)
    F.scaled_dot_product_attention = patched
    try:
        yield patched
    finally:
        F.scaled_dot_product_attention = original
