"""The one source of truth for test tolerances, and small helpers shared by tests.

The rule (FlashAttention's): compared with the float64 reference, our error must be
at most FACTOR × the error of the naive PyTorch version run in the same precision,
plus a small absolute slack ATOL[dtype] for results that are exact in the naive run.
Gradients get GRAD_FACTOR.
"""

from __future__ import annotations

from typing import Optional

import torch

import fastattn
from fastattn import backends

# Tests of the Triton kernels run on the GPU where there is one (compiled kernels), else
# on CPU (the Triton interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

FACTOR = 2.0
GRAD_FACTOR = 3.0
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    diff = (value.detach().double() - reference.detach().double()).abs()
    return float(diff.max())


def assert_within_naive_error(
    ours: torch.Tensor,
    naive: torch.Tensor,
    reference: torch.Tensor,
    *,
    factor: float = FACTOR,
    atol: Optional[float] = None,
    what: str = "output",
) -> None:
    """error(ours) <= factor · error(naive) + atol, both against the float64 reference."""
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    if atol is None:
        atol = ATOL[ours.dtype]
    ours_err = max_error(ours, reference)
    naive_err = max_error(naive, reference)
    assert ours_err <= factor * naive_err + atol, (
        f"{what}: max error {ours_err:.3e} vs float64 exceeds {factor}× the naive same-precision "
        f"error {naive_err:.3e} + {atol:.1e}"
    )


def backends_of(table, device: torch.device = torch.device("cpu")) -> list[str]:
    """The concrete backends an op implements that can run on `device` here."""
    return [
        name for name in backends.CONCRETE_BACKENDS
        if name in table.forward and backends.backend_unavailable_reason(name, device) is None
    ]


def R(*shape: int) -> torch.Tensor:
    """Normal random numbers on DEVICE (never zeros: they hide unwritten outputs)."""
    return torch.randn(*shape, device=DEVICE)


def U(*shape: int) -> torch.Tensor:
    """Uniform [0, 1) random numbers on DEVICE."""
    return torch.rand(*shape, device=DEVICE)


def pin_config_on_gpu(monkeypatch, env: str, config: str) -> None:
    """On a real GPU, pin the Triton config `config` in the variable `env` so tests that
    do not pin one themselves skip per-case autotuning (the interpreter needs none)."""
    if DEVICE.type == "cuda" and not backends.triton_interpreter_on():
        monkeypatch.setenv(env, config)


def huge_strided(shape, strides, dtype=torch.float16) -> torch.Tensor:
    """A view on DEVICE with the given strides (in elements, they may pass 2³¹) over storage
    just big enough for it; only the view's elements are written, so the rest stays
    untouched virtual memory (a few GB of address space, a few MB resident)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    view = torch.empty(size, dtype=dtype, device=DEVICE).as_strided(shape, strides)
    view.copy_(torch.randn(shape, device=DEVICE).to(dtype))
    return view


def leaves(*tensors: Optional[torch.Tensor]):
    """Detached copies that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def grads(outputs, inputs, cotangent):
    """Gradients of `outputs` (one tensor) wrt `inputs`, None for inputs that are None."""
    present = [t for t in inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(outputs, present, cotangent))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


__all__ = ["fastattn", "DEVICE", "R", "U", "pin_config_on_gpu", "FACTOR", "GRAD_FACTOR", "ATOL", "assert_within_naive_error", "backends_of",
           "huge_strided", "leaves", "grads", "max_error"]
