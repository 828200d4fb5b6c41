"""fastattn.rms_norm on every backend: forward and every gradient against the float64
reference over hidden sizes 1..5000 (16384 and 65536 marked slow), rows 1..3000, fp32,
fp16 and bf16, with and without weight, residual, prenorm and residual_in_fp32; the
triton kernel's looped path (pinned narrow tiles), strides (stride-0 gradients included),
the saved rstd, deterministic dweight, opcheck, torch.compile and bad inputs. Shared
machinery: tests/norm_cases.py."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from helpers import assert_within_naive_error
from norm_cases import (
    CONFIG_ENV, RMS_NORM, SLOW_SHAPES, Flags, check_call, device_params, looped_params, make_inputs,
    skip_unless_runs, sweep_params,
)

OP = RMS_NORM
BACKEND_NAMES = tuple(OP.module.BACKENDS.forward)
ops = torch.ops.fastattn
AUTOTUNED_GPU_SIZES = (1024, 4096, 8192, 16384, 65536)


@pytest.fixture(autouse=True)
def _one_pinned_config(monkeypatch):
    """Every test runs one pinned config unless it pins its own or clears it to exercise the
    autotuner: on a GPU, tuning each test's shape would take minutes."""
    monkeypatch.setenv(CONFIG_ENV, "num_warps=8")


@pytest.mark.parametrize("hidden,rows,dtype,flags", sweep_params())
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("device", device_params())
def test_matches_float64_reference(device, backend, hidden, rows, dtype, flags):
    skip_unless_runs(OP, backend, device)
    check_call(OP, backend, device, dtype, rows, hidden, flags)


@pytest.mark.parametrize("hidden,rows,dtype,flags,config", looped_params())
@pytest.mark.parametrize("device", device_params())
def test_triton_looped_path_matches_float64_reference(device, hidden, rows, dtype, flags, config, monkeypatch):
    """Rows wider than the pinned tile take the chunked two-pass path (tails included)."""
    skip_unless_runs(OP, "triton", device)
    monkeypatch.setenv(CONFIG_ENV, config)
    check_call(OP, "triton", device, dtype, rows, hidden, flags)


@pytest.mark.slow
@pytest.mark.parametrize("hidden,rows", SLOW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_wide_rows_cpu(hidden, rows, dtype):
    skip_unless_runs(OP, "triton", torch.device("cpu"))
    check_call(OP, "triton", torch.device("cpu"), dtype, rows, hidden, Flags(residual=True, prenorm=True))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_triton_large_shapes_gpu(hidden, dtype, monkeypatch):
    """Benchmark-like shapes in both row layouts; bf16 at the benchmark's sizes autotuned."""
    device = torch.device("cuda")
    skip_unless_runs(OP, "triton", device)
    if dtype == torch.bfloat16 and hidden in AUTOTUNED_GPU_SIZES:
        monkeypatch.delenv(CONFIG_ENV)
    rows = max(16, (1 << 24) // (hidden * 8))
    check_call(OP, "triton", device, dtype, rows, hidden, Flags(residual=True, prenorm=True))
    check_call(OP, "triton", device, dtype, rows, hidden, Flags())


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_one_row_and_eps(backend):
    skip_unless_runs(OP, backend, torch.device("cpu"))
    check_call(OP, backend, torch.device("cpu"), torch.float32, 1, 4096, Flags(residual=True), eps=0.5)
    check_call(OP, backend, torch.device("cpu"), torch.float16, 1, 33, Flags(), eps=0.0)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("device", device_params())
def test_strided_inputs_and_stride0_gradient(device, backend):
    """Non-contiguous x, residual and weight, 3-D x, and the expanded (stride 0) dy and
    dresidual_out that `.sum().backward()` produces."""
    skip_unless_runs(OP, backend, device)
    hidden, rows = 37, 24
    base = torch.randn(hidden, 2 * rows, device=device) + 1
    x = base.t()[::2].reshape(2, 12, hidden)  # (2, 12, hidden), strided
    residual = torch.randn(2, hidden, 12, device=device).transpose(1, 2)  # (2, 12, hidden), strided
    weight = torch.randn(2 * hidden, device=device)[::2]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, residual)]
    y, summed = fastattn.rms_norm(*leaves[:2], residual=leaves[2], prenorm=True, backend=backend)
    (y.sum() + summed.sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in (x, weight, residual)]
    y_ref, s_ref = reference.rms_norm(*ref[:2], residual=ref[2], prenorm=True)
    (y_ref.sum() + s_ref.sum()).backward()
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed.double(), s_ref, atol=1e-6, rtol=1e-6)
    for name, ours, theirs in zip(("x", "weight", "residual"), leaves, ref):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("config", [None, "BLOCK_N=32,ROWS=32"])
@pytest.mark.parametrize("device", device_params())
def test_triton_saved_rstd(device, config, monkeypatch):
    skip_unless_runs(OP, "triton", device)
    if config:
        monkeypatch.setenv(CONFIG_ENV, config)
    x, weight, _, residual = make_inputs(OP, 90, 100, torch.float16, Flags(residual=True), device, offset=5.0)
    _, summed, rstd = ops.rms_norm_fwd(x, weight, residual, 1e-6, True, "triton")
    assert summed.dtype == rstd.dtype == torch.float32 and rstd.shape == (90,)
    s64 = x.double() + residual.double()
    torch.testing.assert_close(summed.double(), s64, atol=0, rtol=0)
    _, _, rstd_ref = reference.rms_norm(s64, None, 1e-6, prenorm=True, return_stats=True)
    _, _, rstd_naive = reference.rms_norm(summed, None, 1e-6, prenorm=True, return_stats=True)
    assert_within_naive_error(rstd, rstd_naive, rstd_ref, what="rstd")


@pytest.mark.parametrize("config", [None, "BLOCK_N=128,ROWS=32"])
@pytest.mark.parametrize("device", device_params())
def test_triton_backward_is_deterministic(device, config, monkeypatch):
    """Repeated backward passes are bitwise equal (dweight: partials, no atomics)."""
    skip_unless_runs(OP, "triton", device)
    if config:
        monkeypatch.setenv(CONFIG_ENV, config)
    else:
        monkeypatch.delenv(CONFIG_ENV)  # autotuned on a GPU
    rows, hidden = (100, 300) if device.type == "cpu" else (65536, 4096)
    x, weight, _, residual = make_inputs(OP, rows, hidden, torch.bfloat16, Flags(residual=True), device)
    _, summed, rstd = ops.rms_norm_fwd(x, weight, residual, 1e-6, False, "triton")
    dy, dres = torch.randn_like(x), torch.randn_like(summed)
    for dresidual_out in (dres, None):
        first = ops.rms_norm_bwd(dy, dresidual_out, summed, weight, rstd, 1e-6, "triton")
        for _ in range(1 if device.type == "cpu" else 3):
            again = ops.rms_norm_bwd(dy, dresidual_out, summed, weight, rstd, 1e-6, "triton")
            assert all(torch.equal(a, b) for a, b in zip(first, again))


OPCHECK_FLAGS = [Flags(bias=False), Flags(bias=False, residual=True, prenorm=True, residual_in_fp32=True),
                 Flags(weight=False, bias=False, residual=True, residual_dtype=torch.float32)]


@pytest.mark.parametrize("flags", OPCHECK_FLAGS, ids=str)
@pytest.mark.parametrize("device", device_params())
def test_triton_opcheck(device, flags):
    skip_unless_runs(OP, "triton", device)
    x, weight, _, residual = make_inputs(OP, 19, 45, torch.bfloat16, flags, device)
    fwd_args = (x, weight, residual, 1e-6, flags.residual_in_fp32, "triton")
    torch.library.opcheck(ops.rms_norm_fwd, fwd_args)
    _, summed, rstd = ops.rms_norm_fwd(*fwd_args)
    if residual is None:
        summed = x
    dy_stride0 = torch.randn(1, 45, device=device, dtype=x.dtype).expand(19, 45)
    dres = torch.randn_like(summed) if residual is not None else None
    for dy in (torch.randn_like(x), dy_stride0):
        torch.library.opcheck(ops.rms_norm_bwd, (dy, dres, summed, weight, rstd, 1e-6, "triton"))


@pytest.mark.parametrize("device", device_params())
def test_triton_compile_fullgraph(device):
    skip_unless_runs(OP, "triton", device)
    torch._dynamo.reset()
    inputs = make_inputs(OP, 33, 70, torch.float16, Flags(bias=False, residual=True), device)
    inputs = (inputs[0], inputs[1], inputs[3])

    def run(x, weight, residual):
        y, summed = fastattn.rms_norm(x, weight, residual=residual, prenorm=True, backend="triton")
        return y.float().square().sum() + summed.float().sin().sum()

    def loss_and_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        return loss, torch.autograd.grad(loss, leaves)

    eager = loss_and_grads(run)
    compiled = loss_and_grads(torch.compile(run, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    for ours, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)


BAD_INPUTS = [
    (dict(x=torch.randn(4, 0)), ValueError, "x must have a last"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(9)), ValueError, r"weight must have shape"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, "weight must have dtype"),
    (dict(residual=torch.randn(2, 8)), ValueError, "residual must have the shape of x"),
    (dict(eps=-1e-6), ValueError, "eps must be >="),
    (dict(prenorm=None), TypeError, "prenorm must be a bool"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), ValueError, "triton.*float64"),
]


@pytest.mark.parametrize("change,error,match", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    skip_unless_runs(OP, "triton", torch.device("cpu"))
    args = dict(x=torch.randn(4, 8), weight=torch.randn(8), eps=1e-6, residual=None, prenorm=False,
                residual_in_fp32=False, backend="triton")
    args.update(change)
    with pytest.raises(error, match=match):
        fastattn.rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), **args)


def test_auto_serves_float64_on_cpu():
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(fastattn.rms_norm(x, None), reference.rms_norm(x, None))
