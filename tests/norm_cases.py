"""Shared machinery of tests/test_layer_norm.py and tests/test_rms_norm.py: the cases
(hidden sizes, rows, flag combinations, tile layouts) and the check of one call, forward
and every gradient, against the float64 reference."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import pytest
import torch

import fastattn
from fastattn import reference
from helpers import GRAD_FACTOR, assert_within_naive_error, backends_of

CONFIG_ENV = "FASTATTN_LAYER_NORM_CONFIG"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (hidden, rows): wide rows get few rows to keep the interpreter quick.
SHAPES = ((1, 3000), (7, 1531), (64, 517), (1000, 37), (1023, 9), (4096, 5), (5000, 3))
SLOW_SHAPES = ((16384, 3), (65536, 2))
# Pinned tile caps that force the looped (chunked) path onto small rows: hidden -> (rows, config).
LOOPED = {7: (45, "BLOCK_N=4,ROWS=16"), 1000: (37, "BLOCK_N=256,ROWS=8"), 1023: (9, "BLOCK_N=512,ROWS=4"),
          5000: (3, "BLOCK_N=1024,ROWS=2")}


@dataclass(frozen=True)
class Flags:
    """Which optional inputs a call has. residual_dtype: the residual's dtype when it
    differs from x's (None = x's)."""

    weight: bool = True
    bias: bool = True
    residual: bool = False
    prenorm: bool = False
    residual_in_fp32: bool = False
    residual_dtype: Optional[torch.dtype] = None

    def __str__(self):
        parts = [name for name in ("weight", "bias", "residual", "prenorm", "residual_in_fp32") if getattr(self, name)]
        if self.residual_dtype is not None:
            parts.append(f"r{str(self.residual_dtype)[6:]}")
        return "+".join(parts) or "plain"


FLAG_SETS = (
    Flags(),
    Flags(residual=True, prenorm=True),
    Flags(weight=False, bias=False, residual=True, prenorm=True, residual_in_fp32=True),
    Flags(bias=False, residual=True, residual_dtype=torch.float32),
    Flags(weight=False),
    Flags(weight=False, bias=False, prenorm=True, residual_in_fp32=True),
)


@dataclass(frozen=True)
class NormOp:
    """One of the two ops: its public function, its reference and its ops module."""

    name: str
    module: object
    public: Callable
    ref: Callable
    has_bias: bool

    def call(self, x, weight, bias, residual, flags: Flags, backend=None, eps=None):
        kwargs = dict(residual=residual, prenorm=flags.prenorm, residual_in_fp32=flags.residual_in_fp32)
        args = (x, weight, bias) if self.has_bias else (x, weight)
        if eps is not None:
            args += (eps,)
        out = self.public(*args, backend=backend, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    def reference(self, x, weight, bias, residual, flags: Flags, eps=None):
        args = (x, weight, bias) if self.has_bias else (x, weight)
        if eps is not None:
            args += (eps,)
        out = self.ref(*args, residual=residual, prenorm=flags.prenorm, residual_in_fp32=flags.residual_in_fp32)
        return out if isinstance(out, tuple) else (out,)

    def flags(self, flags: Flags) -> Flags:
        return replace(flags, bias=False) if not self.has_bias else flags

    def backends(self, device: torch.device) -> list[str]:
        return backends_of(self.module.BACKENDS, device)


LAYER_NORM = NormOp("layer_norm", fastattn.ops.layer_norm, fastattn.layer_norm, reference.layer_norm, True)
RMS_NORM = NormOp("rms_norm", fastattn.ops.rms_norm, fastattn.rms_norm, reference.rms_norm, False)


def device_params():
    return [pytest.param(torch.device("cpu"), id="cpu"),
            pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.gpu)]


def skip_unless_runs(op: NormOp, backend: str, device: torch.device):
    if backend not in op.backends(device):
        pytest.skip(f"backend {backend} does not run on {device.type} here")


def make_inputs(op: NormOp, rows: int, hidden: int, dtype, flags: Flags, device, *, offset=3.0):
    """fp32 inputs cast to the call's dtypes: (x, weight, bias, residual), None where absent.
    x is shifted by `offset` so the mean matters."""
    x = (torch.randn(rows, hidden) * 2 + offset).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden)).to(dtype) if flags.weight else None
    bias = torch.randn(hidden).to(dtype) if flags.bias and op.has_bias else None
    residual = torch.randn(rows, hidden).to(flags.residual_dtype or dtype) if flags.residual else None
    return tuple(None if t is None else t.to(device) for t in (x, weight, bias, residual))


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def _outputs_and_grads(fn, leaves, cotangents):
    outputs = fn(*leaves)
    loss = sum((out * cot.to(out.dtype)).sum() for out, cot in zip(outputs, cotangents))
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return outputs, [None if t is None else next(grads) for t in leaves]


def check_call(op: NormOp, backend: str, device, dtype, rows: int, hidden: int, flags: Flags, eps=None):
    """Output(s) and the gradients of x, weight, bias, residual within the naive error."""
    flags = op.flags(flags)
    inputs = make_inputs(op, rows, hidden, dtype, flags, device)
    names = ("x", "weight", "bias", "residual")
    ref_out = op.reference(*_leaves(inputs, torch.float64), flags, eps=eps)
    cotangents = [torch.randn_like(out) for out in ref_out]
    ref_out, ref_grads = _outputs_and_grads(lambda *a: op.reference(*a, flags, eps=eps),
                                            _leaves(inputs, torch.float64), cotangents)
    # The naive run in the call's precision; residual_in_fp32 only matters with a residual
    # (without one the op normalizes x itself and returns x.float() as s).
    naive_flags = replace(flags, residual_in_fp32=flags.residual_in_fp32 and flags.residual)
    naive_out, naive_grads = _outputs_and_grads(lambda *a: op.reference(*a, naive_flags, eps=eps),
                                                _leaves(inputs), cotangents)
    ours_out, ours_grads = _outputs_and_grads(lambda *a: op.call(*a, flags, backend=backend, eps=eps),
                                              _leaves(inputs), cotangents)
    expected_dtypes = (dtype, reference.residual_dtype(inputs[0], inputs[3], flags.residual_in_fp32))
    for i, (ours, naive, ref) in enumerate(zip(ours_out, naive_out, ref_out)):
        assert ours.dtype == expected_dtypes[i], f"output {i}: dtype {ours.dtype} != {expected_dtypes[i]}"
        assert_within_naive_error(ours, naive, ref, what=f"{op.name} {backend} output {i}")
    for name, t, ours, naive, ref in zip(names, inputs, ours_grads, naive_grads, ref_grads):
        if t is None:
            continue
        assert ours.dtype == t.dtype, f"d{name}: dtype {ours.dtype} != {t.dtype}"
        assert_within_naive_error(ours, naive, ref, factor=GRAD_FACTOR, what=f"{op.name} {backend} d{name}")


def sweep_params(shapes=SHAPES, per_shape=2):
    """(hidden, rows, dtype, flags) cases: every shape in every dtype, each with
    `per_shape` flag sets, rotating so every flag set meets every dtype and size class."""
    cases, turn = [], 0
    for hidden, rows in shapes:
        for dtype in DTYPES:
            for _ in range(per_shape):
                flags = FLAG_SETS[turn % len(FLAG_SETS)]
                turn += 1
                cases.append(pytest.param(hidden, rows, dtype, flags,
                                          id=f"{hidden}x{rows}-{str(dtype)[6:]}-{flags}"))
    return cases


def looped_params():
    cases, turn = [], 0
    for hidden, (rows, config) in LOOPED.items():
        for dtype in DTYPES:
            flags = FLAG_SETS[turn % len(FLAG_SETS)]
            turn += 1
            cases.append(pytest.param(hidden, rows, dtype, flags, config,
                                      id=f"{hidden}x{rows}-{str(dtype)[6:]}-{flags}-{config}"))
    return cases
