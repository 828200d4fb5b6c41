"""Pieces shared by the op files: backend tables, gradients by recompute, seeded RNG."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

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
    """

    def __init__(self, op: str, forward: dict, backward: dict, limits: Callable[[str, object], Optional[str]]):
        self.op = op
        self.forward = forward
        self.backward = backward
        self.limits = limits

    def reason(self, backend: str, call: object) -> Optional[str]:
        if backend not in self.forward:
            return f"no {backend} implementation of {self.op} yet"
        return self.limits(backend, call)

    def resolve(self, requested: Optional[str], device: torch.device, call: object) -> str:
        return backends.resolve(self.op, requested, device, lambda name: self.reason(name, call))


def empty_placeholder(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A 0-element tensor standing for an output or gradient that does not exist."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def is_placeholder(t: Optional[Tensor]) -> bool:
    return t is None or t.numel() == 0 and t.dim() == 1


def vjp_by_recompute(
    forward: Callable[..., Sequence[Tensor]],
    primals: Sequence[Optional[Tensor]],
    wanted: Sequence[bool],
    cotangents: Sequence[Optional[Tensor]],
) -> list[Optional[Tensor]]:
    """Gradients of `forward(*primals)` for the primals marked `wanted`, by recomputing
    the forward under torch.func.vjp (which, unlike torch.autograd, also works inside a
    custom op's implementation). `cotangents[i]` is the gradient of output i; None = 0.
    Returns one entry per primal (None where not wanted).
    """
    diff_index = [i for i, (p, w) in enumerate(zip(primals, wanted)) if w and p is not None]

    def of_differentiable(*diff: Tensor) -> tuple[Tensor, ...]:
        args = list(primals)
        for i, t in zip(diff_index, diff):
            args[i] = t
        return tuple(forward(*args))

    outputs, pullback = torch.func.vjp(of_differentiable, *[primals[i] for i in diff_index])
    seeds = tuple(
        torch.zeros_like(out) if cot is None or is_placeholder(cot) else cot.to(out.dtype)
        for out, cot in zip(outputs, cotangents)
    )
    grads = pullback(seeds)
    result: list[Optional[Tensor]] = [None] * len(primals)
    for i, g in zip(diff_index, grads):
        result[i] = g
    return result


def draw_rng_seed() -> Tensor:
    """A fresh 63-bit seed from torch's default CPU generator (torch.manual_seed
    reproduces it), as a (1,) int64 tensor so torch.compile can trace it."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def seeded_generator(rng_seed: Tensor, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(rng_seed.item()))


@contextlib.contextmanager
def seeded_default_rng(rng_seed: Optional[Tensor], device: torch.device) -> Iterator[None]:
    """Run a block with `device`'s default generator seeded from rng_seed, restoring it
    after: how built-ins that draw from the default RNG (SDPA dropout) are replayed
    identically in the backward recompute."""
    if rng_seed is None:
        yield
        return
    seed = int(rng_seed.item())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
