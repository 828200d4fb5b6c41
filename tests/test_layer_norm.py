"""fastattn.layer_norm on every backend: forward and every gradient against the float64
reference over hidden sizes 1..5000 (16384 and 65536 marked slow), rows 1..3000, fp32,
fp16 and bf16, with and without weight, bias, residual, prenorm and residual_in_fp32;
the triton kernel's looped path (pinned narrow tiles), strides (stride-0 gradients
included), saved statistics, deterministic dweight/dbias, opcheck, torch.compile, bad inputs,
and (slow) a PTX compile of the kernel pair for sm_90 / sm_80, which also covers
rms_norm. Shared machinery: tests/norm_cases.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import reference
from helpers import assert_within_naive_error, max_error, require_module
from norm_cases import (
    CONFIG_ENV, LAYER_NORM, Flags, check_compile_fullgraph, check_opcheck, device_params, make_inputs, skip_unless_runs,
)
# The tests both norm ops share, written once in tests/norm_cases.py: pytest collects them
# here, and the `op` fixture below runs them on this file's op.
from norm_cases import (  # noqa: F401
    _one_pinned_config, test_auto_serves_float64_on_cpu, test_matches_float64_reference, test_one_row_and_eps,
    test_strided_inputs_and_stride0_gradient, test_triton_backward_is_deterministic, test_triton_large_shapes_gpu,
    test_triton_looped_path_matches_float64_reference, test_triton_wide_rows_cpu,
)
from norm_cases import test_triton_tails_every_residue  # noqa: F401  (the tile-edge sweep)

OP = LAYER_NORM
ops = torch.ops.fastattn


@pytest.fixture
def op():
    """The op the shared tests imported above run on."""
    return OP


@pytest.mark.parametrize("config", [None, "BLOCK_N=32,ROWS=32"])
@pytest.mark.parametrize("device", device_params())
def test_triton_saved_statistics(device, config, monkeypatch):
    skip_unless_runs(OP, "triton", device)
    if config:
        monkeypatch.setenv(CONFIG_ENV, config)
    x, weight, bias, residual = make_inputs(OP, 90, 100, torch.bfloat16, Flags(residual=True), device, offset=50.0)
    _, summed, mean, rstd = ops.layer_norm_fwd(x, weight, bias, residual, 1e-5, True, "triton")
    assert summed.dtype == mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (90,)
    s64 = x.double() + residual.double()
    torch.testing.assert_close(summed.double(), s64, atol=0, rtol=0)
    _, mean_ref, rstd_ref = reference.layer_norm(s64, None, None, 1e-5, return_stats=True)
    _, mean_naive, rstd_naive = reference.layer_norm(summed, None, None, 1e-5, return_stats=True)
    assert_within_naive_error(mean, mean_naive, mean_ref, what="mean")
    assert_within_naive_error(rstd, rstd_naive, rstd_ref, what="rstd")


@pytest.mark.parametrize("config", [None, "BLOCK_N=128,ROWS=16"])
def test_triton_statistics_are_stable_for_a_large_mean(config, monkeypatch):
    """A mean 10⁴ times the spread: the variance must not cancel away (one-pass sums would)."""
    skip_unless_runs(OP, "triton", torch.device("cpu"))
    if config:
        monkeypatch.setenv(CONFIG_ENV, config)
    x = torch.randn(16, 1000) * 0.01 + 100.0
    y, _, mean, rstd = ops.layer_norm_fwd(x, None, None, None, 1e-12, False, "triton")
    y_ref, mean_ref, rstd_ref = reference.layer_norm(x.double(), None, None, 1e-12, return_stats=True)
    y_naive = reference.layer_norm(x, None, None, 1e-12)
    assert_within_naive_error(y, y_naive, y_ref, what="y")
    assert max_error(rstd, rstd_ref) <= 1e-3 * float(rstd_ref.abs().max())


OPCHECK_FLAGS = [Flags(), Flags(residual=True, prenorm=True, residual_in_fp32=True),
                 Flags(weight=False, bias=False, residual=True, residual_dtype=torch.float32)]


@pytest.mark.parametrize("flags", OPCHECK_FLAGS, ids=str)
@pytest.mark.parametrize("device", device_params())
def test_triton_opcheck(device, flags):
    check_opcheck(OP, device, torch.float16, flags)


@pytest.mark.parametrize("device", device_params())
def test_triton_compile_fullgraph(device):
    check_compile_fullgraph(OP, device, torch.bfloat16, Flags(residual=True, prenorm=True, residual_in_fp32=True))


BAD_INPUTS = [
    (dict(x=torch.randn(4, 0)), ValueError, "x must have a last"),
    (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(weight=torch.randn(7)), ValueError, r"weight must have shape"),
    (dict(weight=torch.randn(8, 1)), ValueError, "weight must be 1-D"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must have shape"),
    (dict(residual=torch.randn(4, 7)), ValueError, "residual must have the shape of x"),
    (dict(eps=-1.0), ValueError, "eps must be >="),
    (dict(prenorm=1), TypeError, "prenorm must be a bool"),
    (dict(residual_in_fp32="yes"), TypeError, "residual_in_fp32 must be a bool"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), ValueError, "triton.*float64"),
    (dict(backend="tritonn"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("change,error,match", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(8), bias=torch.randn(8), eps=1e-5, residual=None,
                prenorm=False, residual_in_fp32=False, backend="triton")
    args.update(change)
    if args["backend"] == "triton":
        skip_unless_runs(OP, "triton", torch.device("cpu"))
    with pytest.raises(error, match=match):
        fastattn.layer_norm(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("eps"), **args)


@pytest.mark.parametrize("value", ["ROWS=3", "BLOCK_N", "WARPS=4", "BLOCK_N=0"])
def test_triton_bad_pinned_config_names_the_variable(value, monkeypatch):
    skip_unless_runs(OP, "triton", torch.device("cpu"))
    monkeypatch.setenv(CONFIG_ENV, value)
    with pytest.raises(ValueError, match=CONFIG_ENV):
        fastattn.layer_norm(torch.randn(2, 8), None, backend="triton")


def test_config_space_serves_every_hidden_size():
    """For each hidden size the pruned space is small and non-empty, and every kept config
    fits the register budget (pure Python: no kernel runs)."""
    _config = require_module("fastattn.kernels._config")
    space = _config.layer_norm_configs()
    for backward in (False, True):
        prune = _config.layer_norm_prune(backward)
        for hidden in [1, 2, 7, 64, 100, 1000, 1024, 4096, 5000, 8192, 8193, 16384, 16385, 65536, 100000]:
            block_n = _config.layer_norm_block_n(hidden, backward)
            single_pass = block_n >= hidden
            kept = prune(space, {}, BLOCK_N=block_n, SINGLE_PASS=single_pass)
            assert 1 <= len(kept) <= 12, (hidden, backward, len(kept))
            for config in kept:
                assert config.kwargs["ROWS"] * block_n <= max(_config.LAYER_NORM_MAX_TILE[backward], block_n)
            assert single_pass == (hidden <= (_config.LAYER_NORM_MAX_FUSED_BWD if backward
                                              else _config.LAYER_NORM_MAX_FUSED_FWD))



_COMPILE_FOR_GPU = textwrap.dedent("""
    import itertools, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastattn.kernels import layer_norm as K

    FP32 = {"MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"}
    UNIT_STRIDES = {"stride_xn", "stride_rn", "stride_yn", "stride_on", "stride_w", "stride_b", "stride_dyn",
                    "stride_drn", "stride_sn", "stride_dsn", "stride_mean", "stride_rstd"}

    def ptx(fn, arch, dtypes, constexprs, num_warps):
        signature, constants, attrs = {}, {}, {}
        for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
            if param.is_constexpr:
                signature[name], constants[(i,)] = "constexpr", constexprs[name]
            elif name in UNIT_STRIDES:  # Triton specializes a stride of 1 like this
                signature[name], constants[(i,)] = "constexpr", 1
            elif name.isupper() and name not in ("M", "N"):
                signature[name] = "*fp32" if name in FP32 else "*" + dtypes.get(name, dtypes["x"])
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
                if name != "eps":
                    attrs[(i,)] = [["tt.divisibility", 16]]  # hidden % 16 == 0, as launched then
        kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps})
        return kernel.asm["ptx"]

    cases = [(90, x, s, rms, single) for (x, s), rms, single in itertools.product(
        (("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "fp32")), (False, True), (True, False))]
    cases += [(80, "bf16", "fp32", False, True), (80, "fp16", "fp16", True, False)]
    for arch, x, s, rms, single in cases:
        block_n, rows = (1024, 4) if single else (4096, 2)
        flags = dict(IS_RMS_NORM=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, SINGLE_PASS=single, BLOCK_N=block_n,
                     ROWS=rows)
        fwd = ptx(K._layer_norm_fwd_kernel, arch, {"x": x, "R": s, "R_OUT": s}, dict(flags, HAS_RESIDUAL=True), 8)
        bwd = ptx(K._layer_norm_bwd_kernel, arch, {"x": x, "S": s, "DS": s, "DRES": s},
                  dict(flags, HAS_DRESIDUAL=True), 8)
        for name, code in (("fwd", fwd), ("bwd", bwd)):
            if not re.search(r"ld\\.global(\\.[a-z0-9_]+)*\\.v4", code):
                sys.exit(f"{name} sm_{arch} {x}/{s} rms={rms} single={single}: no 128-bit global loads")
        print(arch, x, s, rms, single)
    for single, block_n, rows in ((True, 1, 128), (False, 16, 1)):
        flags = dict(IS_RMS_NORM=False, HAS_WEIGHT=False, HAS_BIAS=False, SINGLE_PASS=single, BLOCK_N=block_n,
                     ROWS=rows)
        ptx(K._layer_norm_fwd_kernel, 90, {"x": "bf16"}, dict(flags, HAS_RESIDUAL=False), 4)
        ptx(K._layer_norm_bwd_kernel, 90, {"x": "bf16"}, dict(flags, HAS_DRESIDUAL=False), 4)
        print("plain", single, block_n)
""")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_sm80():
    """Without a GPU: Triton compiles the norm kernels (both ops, both row layouts, with
    and without every option) to PTX for sm_90 and sm_80, with 128-bit global loads for
    contiguous rows: what the interpreter cannot check."""
    require_module("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 16


# ----------------------------------------------------------------------------- offsets, backward grid, default configs


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_triton_column_offsets_past_2_to_the_31(norm):
    """A transposed x whose column stride times the column index passes 2³¹ elements
    (600 columns 2²² + 1 apart): forward and backward read the right elements (int64
    column offsets). The storage is a few GB of address space, barely touched."""
    from norm_cases import RMS_NORM
    from helpers import huge_strided

    op = OP if norm == "layer_norm" else RMS_NORM
    rows, hidden, column_stride = 3, 600, (1 << 22) + 1
    x = huge_strided((rows, hidden), (1, column_stride))
    assert (hidden - 1) * column_stride >= 2**31
    weight = (1 + 0.5 * torch.randn(hidden)).half()
    bias = torch.randn(hidden).half() if op.has_bias else None
    leaves = [t if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
    args = leaves if op.has_bias else leaves[:2]
    y = op.public(*args, backend="triton")
    cotangent = torch.randn(rows, hidden).half()
    grads = torch.autograd.grad(y, [t for t in args if t is not None], cotangent)
    ref_leaves = [t if t is None else t.detach().double().requires_grad_() for t in args]
    y_ref = op.ref(*ref_leaves)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], cotangent.double())
    torch.testing.assert_close(y.double(), y_ref, atol=2e-2, rtol=2e-2)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), ref, atol=5e-2, rtol=2e-2)


def test_backward_grid_is_a_few_programs_per_sm():
    """The backward's persistent grid: up to LAYER_NORM_BWD_PROGRAMS_PER_SM programs per SM
    while each keeps LAYER_NORM_BWD_MIN_ROWS_PER_PROGRAM rows, never below one per SM or
    above the rows; a fixed count under the interpreter."""
    _config = pytest.importorskip("fastattn.kernels._config")
    per_sm, min_rows = _config.LAYER_NORM_BWD_PROGRAMS_PER_SM, _config.LAYER_NORM_BWD_MIN_ROWS_PER_PROGRAM
    assert 2 <= per_sm <= 4
    assert _config.layer_norm_backward_programs(32768, 132) == 132 * per_sm
    assert _config.layer_norm_backward_programs(132 * 2 * min_rows, 132) == 132 * 2
    assert _config.layer_norm_backward_programs(4096, 132) == 132
    assert _config.layer_norm_backward_programs(100, 132) == 100
    assert _config.layer_norm_backward_programs(100, None) == _config.LAYER_NORM_INTERPRETER_BWD_PROGRAMS


def test_split_ds_hands_ds_to_both_inputs_without_a_copy():
    """ds is both dx and dresidual: when both are s's dtype they are ds itself (as
    PyTorch's own add hands one gradient to both inputs), converted only when a dtype
    differs."""
    from types import SimpleNamespace

    from fastattn.ops.layer_norm import split_ds

    ds = torch.randn(4, 8)
    ctx = SimpleNamespace(x_dtype=torch.float32, residual_dtype=torch.float32, residual_index=3,
                          needs_input_grad=(True, False, False, True))
    dx, dresidual = split_ds(ctx, ds)
    assert dx is ds and dresidual is ds
    ctx.x_dtype = torch.float16
    dx, dresidual = split_ds(ctx, ds)
    assert dx.dtype == torch.float16 and dresidual is ds


def test_default_configs_one_per_key(monkeypatch):
    """Without FASTATTN_AUTOTUNE every launch gets one config from the rule (for any GPU
    family), within the tuned ranges and the register budget; FASTATTN_AUTOTUNE=1 hands
    the launch to the autotuner, whose pruned space has at most 8 configs per key; a
    pinned key overrides the default."""
    _config = pytest.importorskip("fastattn.kernels._config")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(_config, "interpreted", lambda: False)
    space = _config.layer_norm_configs()
    for backward in (False, True):
        prune = _config.layer_norm_prune(backward)
        for hidden in (1, 7, 64, 1000, 1024, 4096, 5000, 8192, 8193, 16384, 16385, 65536):
            block_n, config = _config.layer_norm_launch_config(hidden, backward)
            single_pass = block_n >= hidden
            assert config == _config.layer_norm_rule(block_n, single_pass, backward)
            assert config["ROWS"] * block_n <= max(_config.LAYER_NORM_MAX_TILE[backward], block_n)
            per_thread = config["ROWS"] * block_n // (32 * config["num_warps"])
            assert per_thread <= _config.LAYER_NORM_ELEMENTS_PER_THREAD[backward][1]
            assert 1 <= len(prune(space, {}, BLOCK_N=block_n, SINGLE_PASS=single_pass)) <= 8
    monkeypatch.setenv(_config.AUTOTUNE_ENV, "1")
    assert _config.layer_norm_launch_config(4096, False)[1] is None
    monkeypatch.setenv(CONFIG_ENV, "num_warps=2")
    assert _config.layer_norm_launch_config(4096, False)[1] == dict(_config.layer_norm_rule(4096, True, False),
                                                                    num_warps=2)
