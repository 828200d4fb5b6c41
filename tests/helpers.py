"""The one source of truth for test tolerances, and small helpers shared by tests.

The rule (FlashAttention's): compared with the float64 reference, our error must be
at most FACTOR × the error of the naive PyTorch version run in the same precision,
plus a small absolute slack ATOL[dtype] for results that are exact in the naive run.
Gradients get GRAD_FACTOR.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn, Optional

import pytest
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
    """The concrete backends an op implements that can run on `device` here. The triton
    backend is listed on DEVICE's type even where Triton is missing, so that its cases
    are collected and then skip, or fail under CI (check_prerequisites), instead of
    vanishing from the run."""
    return [
        name for name in backends.CONCRETE_BACKENDS
        if name in table.forward and (backends.backend_unavailable_reason(name, device) is None
                                      or (name == "triton" and device.type == DEVICE.type))
    ]


# ----------------------------------------------------------------------------- forward checks

# The naive backend's forward IS reference.<op> run in the call's dtype, which is what the
# checks compare with ("naive" in assert_within_naive_error): checking its forward would
# compare the reference with itself. Its backward (the explicit formulas of
# reference.<op>_backward) still meets autograd through the float64 reference.
FORWARD_IS_REFERENCE = ("naive",)


def forward_is_reference(backend: str) -> bool:
    """Whether `backend`'s forward is the reference itself (no forward check to make)."""
    return backend in FORWARD_IS_REFERENCE


# ----------------------------------------------------------------------------- prerequisites

# A test that cannot run because a package, tool or header is missing skips on a
# developer's machine and FAILS in CI (CI=true, as CI services set it): CI installs
# everything the tests need, so there a skip would only hide tests that never ran. Every
# skip for a missing prerequisite goes through missing_prerequisite. Skips that are
# expected (gpu tests without a GPU, a backend that cannot serve a device) stay skips.
CI_ENV = "CI"


def in_ci() -> bool:
    """Whether this is a CI run (CI=true or 1)."""
    return os.environ.get(CI_ENV, "").strip().lower() in ("true", "1", "yes")


def missing_prerequisite(reason: str) -> NoReturn:
    """Skip the calling test for `reason` (what is missing), or fail it under CI."""
    if in_ci():
        pytest.fail(f"missing prerequisite ({CI_ENV}=true: a missing prerequisite fails, it does not skip): "
                    f"{reason}", pytrace=False)
    pytest.skip(reason)


def require(reason: Optional[str]) -> None:
    """missing_prerequisite(reason) unless reason is None (nothing missing)."""
    if reason is not None:
        missing_prerequisite(reason)


def require_module(name: str) -> ModuleType:
    """The imported module `name`; missing_prerequisite if it cannot be imported
    (pytest.importorskip that fails under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing_prerequisite(f"{name} cannot be imported: {error}")


def triton_missing_reason() -> Optional[str]:
    """Why the triton backend cannot run on DEVICE (not installed; on a machine without
    a GPU, TRITON_INTERPRET off), or None."""
    return backends.backend_unavailable_reason("triton", DEVICE)


# Marks a test that runs the triton backend on DEVICE. Tests parametrized with
# backend="triton" need no mark: check_prerequisites sees the parameter.
requires_triton = pytest.mark.requires_triton


def check_prerequisites(item) -> None:
    """conftest.py's pytest_runtest_setup: a test marked requires_triton or parametrized
    with backend="triton" needs the triton backend on DEVICE."""
    callspec = getattr(item, "callspec", None)
    runs_triton = item.get_closest_marker("requires_triton") is not None or (
        callspec is not None and callspec.params.get("backend") == "triton")
    if runs_triton:
        require(triton_missing_reason())


# ----------------------------------------------------------------------------- tile-edge sweeps

# Loop bounds and masks computed from a size modulo a tile width (how many tiles, which
# are whole, where the tail starts) go wrong at one residue only when they are off by
# one. The tile-edge sweeps pin small tiles and take the size through every residue,
# not a few lucky sizes.


def all_residues(block: int) -> list[int]:
    """0 .. 2·block: every residue modulo `block` in two periods (clamps at 0 act in the
    first only)."""
    return list(range(2 * block + 1))


def every_residue_once(block: int) -> list[int]:
    """Each residue modulo `block` once: the even ones from the first period, the odd ones
    from the second (for sweeps too costly to take twice)."""
    return [r if r % 2 == 0 else r + block for r in range(block)]


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
           "huge_strided", "leaves", "grads", "max_error", "FORWARD_IS_REFERENCE", "forward_is_reference", "in_ci",
           "missing_prerequisite", "require", "require_module", "triton_missing_reason", "requires_triton",
           "check_prerequisites", "all_residues", "every_residue_once"]
