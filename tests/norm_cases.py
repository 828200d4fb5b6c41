"""Shared machinery of tests/test_layer_norm.py and tests/test_rms_norm.py: the cases
(hidden sizes, rows, flag combinations, tile layouts), the check of one call, forward
and every gradient, against the float64 reference, and the tests whose logic is the same
for both ops. Those tests take the op from an `op` fixture that each test file defines;
each file imports them, and pytest collects them there, under that file's name."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import pytest
import torch

import fastattn
from fastattn import reference
from helpers import (
    DEVICE, GRAD_FACTOR, assert_within_naive_error, backends_of, every_residue_once, forward_is_reference, require,
    triton_missing_reason,
)

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
    """One of the two ops: its public function, its reference and its ops module; eps: the
    eps the tests pass to its registered ops."""

    name: str
    module: object
    public: Callable
    ref: Callable
    has_bias: bool
    eps: float

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

    @property
    def fwd(self):
        """The registered forward op: returns (y, summed, *statistics)."""
        return getattr(torch.ops.fastattn, f"{self.name}_fwd")

    @property
    def bwd(self):
        return getattr(torch.ops.fastattn, f"{self.name}_bwd")

    def fwd_args(self, x, weight, bias, residual, residual_in_fp32, backend):
        bias = (bias,) if self.has_bias else ()
        return (x, weight, *bias, residual, self.eps, residual_in_fp32, backend)

    def bwd_args(self, dy, dresidual_out, summed, weight, bias, stats, backend):
        """stats: the statistics the forward op returned after summed."""
        bias = (bias,) if self.has_bias else ()
        return (dy, dresidual_out, summed, weight, *bias, *stats, self.eps, backend)

    def flags(self, flags: Flags) -> Flags:
        return replace(flags, bias=False) if not self.has_bias else flags

    def backends(self, device: torch.device) -> list[str]:
        return backends_of(self.module.BACKENDS, device)


LAYER_NORM = NormOp("layer_norm", fastattn.ops.layer_norm, fastattn.layer_norm, reference.layer_norm, True, 1e-5)
RMS_NORM = NormOp("rms_norm", fastattn.ops.rms_norm, fastattn.rms_norm, reference.rms_norm, False, 1e-6)
# Every backend either op registers; a test skips those its op does not run.
BACKEND_NAMES = tuple(dict.fromkeys([*LAYER_NORM.module.BACKENDS.forward, *RMS_NORM.module.BACKENDS.forward]))
AUTOTUNED_GPU_SIZES = (1024, 4096, 8192, 16384, 65536)


def device_params():
    return [pytest.param(torch.device("cpu"), id="cpu"),
            pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.gpu)]


def skip_unless_runs(op: NormOp, backend: str, device: torch.device):
    """Skip where `backend` does not run on `device` (the cuda backend on CPU tensors); the
    triton backend on DEVICE is a prerequisite (fails under CI=true where missing)."""
    if backend == "triton" and device.type == DEVICE.type:
        require(triton_missing_reason())
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
        if not forward_is_reference(backend):  # the naive forward is naive_out itself: only its backward is checked
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


# ------------------------------------------------------------- tests both op files run


@pytest.fixture(autouse=True)
def _one_pinned_config(monkeypatch):
    """Every test runs one pinned config unless it pins its own or clears it to exercise the
    autotuner: on a GPU, tuning each test's shape would take minutes."""
    monkeypatch.setenv(CONFIG_ENV, "num_warps=8")


@pytest.mark.parametrize("hidden,rows,dtype,flags", sweep_params())
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("device", device_params())
def test_matches_float64_reference(op, device, backend, hidden, rows, dtype, flags):
    skip_unless_runs(op, backend, device)
    check_call(op, backend, device, dtype, rows, hidden, flags)


@pytest.mark.parametrize("hidden,rows,dtype,flags,config", looped_params())
@pytest.mark.parametrize("device", device_params())
def test_triton_looped_path_matches_float64_reference(op, device, hidden, rows, dtype, flags, config, monkeypatch):
    """Rows wider than the pinned tile take the chunked two-pass path (tails included)."""
    skip_unless_runs(op, "triton", device)
    monkeypatch.setenv(CONFIG_ENV, config)
    check_call(op, "triton", device, dtype, rows, hidden, flags)


@pytest.mark.slow
@pytest.mark.parametrize("hidden,rows", SLOW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_wide_rows_cpu(op, hidden, rows, dtype):
    skip_unless_runs(op, "triton", torch.device("cpu"))
    check_call(op, "triton", torch.device("cpu"), dtype, rows, hidden, Flags(residual=True, prenorm=True))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_triton_large_shapes_gpu(op, hidden, dtype, monkeypatch):
    """Benchmark-like shapes in both row layouts; bf16 at the benchmark's sizes autotuned."""
    device = torch.device("cuda")
    skip_unless_runs(op, "triton", device)
    if dtype == torch.bfloat16 and hidden in AUTOTUNED_GPU_SIZES:
        monkeypatch.delenv(CONFIG_ENV)
    rows = max(16, (1 << 24) // (hidden * 8))
    check_call(op, "triton", device, dtype, rows, hidden, Flags(residual=True, prenorm=True))
    check_call(op, "triton", device, dtype, rows, hidden, Flags())


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_one_row_and_eps(op, backend):
    skip_unless_runs(op, backend, torch.device("cpu"))
    check_call(op, backend, torch.device("cpu"), torch.float32, 1, 4096, Flags(residual=True), eps=0.5)
    check_call(op, backend, torch.device("cpu"), torch.float16, 1, 33, Flags(), eps=0.0)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("device", device_params())
def test_strided_inputs_and_stride0_gradient(op, device, backend):
    """Non-contiguous x, residual and weight, 3-D x, and the expanded (stride 0) dy and
    dresidual_out that `.sum().backward()` produces."""
    skip_unless_runs(op, backend, device)
    hidden, rows = 37, 24
    base = torch.randn(hidden, 2 * rows, device=device) + 1
    x = base.t()[::2].reshape(2, 12, hidden)  # (2, 12, hidden), strided
    residual = torch.randn(2, hidden, 12, device=device).transpose(1, 2)  # (2, 12, hidden), strided
    weight = torch.randn(2 * hidden, device=device)[::2]
    bias = torch.randn(hidden, device=device) if op.has_bias else None
    inputs = (x, weight, bias, residual)
    flags = op.flags(Flags(residual=True, prenorm=True))
    leaves = _leaves(inputs)
    y, summed = op.call(*leaves, flags, backend=backend)
    (y.sum() + summed.sum()).backward()
    ref = _leaves(inputs, torch.float64)
    y_ref, s_ref = op.reference(*ref, flags)
    (y_ref.sum() + s_ref.sum()).backward()
    if not forward_is_reference(backend):  # the naive forward is the reference in fp32
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(summed.double(), s_ref, atol=1e-6, rtol=1e-6)
    for name, ours, theirs in zip(("x", "weight", "bias", "residual"), leaves, ref):
        if ours is not None:
            torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("config", [None, "BLOCK_N=128,ROWS=32"])
@pytest.mark.parametrize("device", device_params())
def test_triton_backward_is_deterministic(op, device, config, monkeypatch):
    """Repeated backward passes are bitwise equal (dweight and, for layer norm, dbias:
    partials, no atomics)."""
    skip_unless_runs(op, "triton", device)
    if config:
        monkeypatch.setenv(CONFIG_ENV, config)
    else:
        monkeypatch.delenv(CONFIG_ENV)  # autotuned on a GPU
    rows, hidden = (100, 300) if device.type == "cpu" else (65536, 4096)
    x, weight, bias, residual = make_inputs(op, rows, hidden, torch.bfloat16, Flags(residual=True), device)
    _, summed, *stats = op.fwd(*op.fwd_args(x, weight, bias, residual, False, "triton"))
    dy, dres = torch.randn_like(x), torch.randn_like(summed)
    for dresidual_out in (dres, None):
        bwd_args = op.bwd_args(dy, dresidual_out, summed, weight, bias, stats, "triton")
        first = op.bwd(*bwd_args)
        for _ in range(1 if device.type == "cpu" else 3):
            again = op.bwd(*bwd_args)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    check_call(op, "triton", device, torch.bfloat16, rows, hidden, Flags(residual=True))  # and right, at this shape


# Tile edges: rows of `hidden` elements are walked in BLOCK_N-column chunks, the last one
# masked (or, when BLOCK_N >= hidden, one tile of next_power_of_2(hidden) columns). The
# sweep pins 8-column chunks and 4-row tiles (5 rows: a row tail too) and takes hidden
# through every width of the single tile, 1 .. 8, then every residue of the chunked path's
# tail once, over 2 to 4 chunks. In the interpreter only: on a GPU each width would
# compile its own kernels.
EDGE_BLOCK = 8
EDGE_HIDDEN = list(range(1, EDGE_BLOCK + 1)) + [2 * EDGE_BLOCK + r for r in every_residue_once(EDGE_BLOCK)]


def test_triton_tails_every_residue(op, monkeypatch):
    device = torch.device("cpu")
    skip_unless_runs(op, "triton", device)
    monkeypatch.setenv(CONFIG_ENV, f"BLOCK_N={EDGE_BLOCK},ROWS=4")
    failures = []
    for hidden in EDGE_HIDDEN:
        try:
            check_call(op, "triton", device, torch.float32, 5, hidden, Flags(residual=True, prenorm=True))
        except AssertionError as error:
            failures.append(f"hidden {hidden} (≡ {hidden % EDGE_BLOCK} mod {EDGE_BLOCK}): {str(error).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def test_auto_serves_float64_on_cpu(op):
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(op.public(x, None), op.ref(x, None))


# ------------------------------------------------- checks the op files parametrize alike


def check_opcheck(op: NormOp, device, dtype, flags: Flags):
    """torch.library.opcheck on the registered forward and backward ops (dy contiguous and
    expanded with stride 0)."""
    skip_unless_runs(op, "triton", device)
    x, weight, bias, residual = make_inputs(op, 19, 45, dtype, flags, device)
    fwd_args = op.fwd_args(x, weight, bias, residual, flags.residual_in_fp32, "triton")
    torch.library.opcheck(op.fwd, fwd_args)
    _, summed, *stats = op.fwd(*fwd_args)
    if residual is None:
        summed = x
    dy_stride0 = torch.randn(1, 45, device=device, dtype=x.dtype).expand(19, 45)
    dres = torch.randn_like(summed) if residual is not None else None
    for dy in (torch.randn_like(x), dy_stride0):
        torch.library.opcheck(op.bwd, op.bwd_args(dy, dres, summed, weight, bias, stats, "triton"))
    check_call(op, "triton", device, dtype, 19, 45, flags)


def check_compile_fullgraph(op: NormOp, device, dtype, flags: Flags):
    """torch.compile(fullgraph=True) of a prenorm call and a loss on both outputs: loss and
    every gradient equal to eager."""
    skip_unless_runs(op, "triton", device)
    torch._dynamo.reset()
    inputs = make_inputs(op, 33, 70, dtype, flags, device)

    def run(x, weight, bias, residual):
        y, summed = op.call(x, weight, bias, residual, flags, backend="triton")
        return y.float().square().sum() + summed.float().sin().sum()

    def loss_and_grads(fn):
        leaves = _leaves(inputs)
        loss = fn(*leaves)
        return loss, torch.autograd.grad(loss, [t for t in leaves if t is not None])

    eager = loss_and_grads(run)
    compiled = loss_and_grads(torch.compile(run, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    for ours, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    check_call(op, "triton", device, dtype, 33, 70, flags)
