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
    CONFIG_ENV, RMS_NORM, Flags, check_compile_fullgraph, check_opcheck, device_params, make_inputs, skip_unless_runs,
)
# The tests both norm ops share, written once in tests/norm_cases.py: pytest collects them
# here, and the `op` fixture below runs them on this file's op.
from norm_cases import (  # noqa: F401
    _one_pinned_config, test_auto_serves_float64_on_cpu, test_matches_float64_reference, test_one_row_and_eps,
    test_strided_inputs_and_stride0_gradient, test_triton_backward_is_deterministic, test_triton_large_shapes_gpu,
    test_triton_looped_path_matches_float64_reference, test_triton_wide_rows_cpu,
)
from norm_cases import test_triton_tails_every_residue  # noqa: F401  (the tile-edge sweep)

OP = RMS_NORM
ops = torch.ops.fastattn


@pytest.fixture
def op():
    """The op the shared tests imported above run on."""
    return OP


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


OPCHECK_FLAGS = [Flags(bias=False), Flags(bias=False, residual=True, prenorm=True, residual_in_fp32=True),
                 Flags(weight=False, bias=False, residual=True, residual_dtype=torch.float32)]


@pytest.mark.parametrize("flags", OPCHECK_FLAGS, ids=str)
@pytest.mark.parametrize("device", device_params())
def test_triton_opcheck(device, flags):
    check_opcheck(OP, device, torch.bfloat16, flags)


@pytest.mark.parametrize("device", device_params())
def test_triton_compile_fullgraph(device):
    check_compile_fullgraph(OP, device, torch.float16, Flags(bias=False, residual=True, prenorm=True))


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
