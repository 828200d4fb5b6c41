"""Pieces shared by the op files: backend tables, result layouts, placeholders, seeded RNG."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import backends


class BackendTable:
    """The implementations of one op, per backend, and the rules for who serves a call.

    `forward[backend]` and `backward[backend]` are the functions the registered
    `_fwd` / `_bwd` ops run for that backend (same arguments as the op, minus
    `backend`). A backend absent from `forward` is reported as "no <backend>
    implementation of <op> yet"; `limits(backend, call)` adds the per-call reasons
    (dtype, head_dim, option ...). New kernels plug in by adding entries.

    Every result of every op is contiguous, whatever the inputs' strides: the fake
    ops allocate contiguous tensors and torch.compile checks the real strides against
    them (inductor lays out a custom op's outputs from its fake on inputs whose
    strides it may choose itself, so a result that follows an input's layout breaks).
    """

    def __init__(self, op: str, forward: dict, backward: dict, limits: Callable[[str, object], Optional[str]]):
        self.op = op
        self.forward = _ContiguousResults(forward)
        self.backward = _ContiguousResults(backward)
        self.limits = limits

    def reason(self, backend: str, call: object) -> Optional[str]:
        if backend not in self.forward:
            return f"no {backend} implementation of {self.op} yet"
        return self.limits(backend, call)

    def resolve(self, requested: Optional[str], device: torch.device, call: object) -> str:
        return backends.resolve(self.op, requested, device, lambda name: self.reason(name, call))


class _ContiguousResults(dict):
    """backend -> implementation, whose results come back contiguous (a no-op for
    kernels that write contiguous tensors; the reference math keeps the strides of a
    non-contiguous input)."""

    def __getitem__(self, backend: str):
        implementation = super().__getitem__(backend)

        def with_contiguous_results(*args):
            return tuple(t.contiguous() for t in implementation(*args))

        return with_contiguous_results


def empty_placeholder(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A 0-element tensor standing for an output or gradient that does not exist."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def is_placeholder(t: Optional[Tensor]) -> bool:
    return t is None or t.numel() == 0 and t.dim() == 1


def draw_rng_seed(device=None) -> Tensor:
    """The dropout state of one call: a (2,) int64 tensor (Philox key, counter offset) on
    `device` (default CPU), drawn by torch's generator of that device (torch.manual_seed
    reproduces it). A tensor on the device: the Triton kernels read it there, so it
    never forks a compile, and a CUDA graph replays the draw, giving each replay its
    own mask."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def seeded_generator(rng_seed: Tensor, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from the (2,) dropout state (reads it back to the host)."""
    seed, offset = (int(value) for value in rng_seed.tolist())
    return torch.Generator(device=device).manual_seed((seed ^ (offset << 1)) % 2**63)
