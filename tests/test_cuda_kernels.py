"""The cuda backend (fastattn._C, csrc/layer_norm and csrc/ffn) on a GPU.

Layer norm, RMSNorm, ffn and gated_ffn with backend="cuda" in float16, bfloat16 and
float32, odd sizes, every gradient, against the float64 reference (tests/helpers.py's
rule: error <= 2x the naive same-precision error + ATOL, 3x for gradients); every launch
path pinned through FASTATTN_LAYER_NORM_CUDA_CONFIG / FASTATTN_FFN_CUDA_CONFIG (warp and
block rows, 16-byte and one-element accesses, row cache and shared-memory accumulators on
and off, cuBLASLt epilogues, cuBLASLt off); mixed residual / parameter dtypes, strided and
stride-0 inputs, empty inputs, bitwise reproducible parameter gradients, opcheck,
torch.compile, and a compute-sanitizer memcheck run over a small case of every kernel.

All but the last two tests need a CUDA device and the built extension
(`pip install --no-build-isolation -e .` on the GPU machine) and are marked gpu; those two
check, anywhere, that the backend's refusals name the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import ffn as ffn_op
from fastattn.ops import gated_ffn as gated_ffn_op
from fastattn.ops import layer_norm as layer_norm_op
from fastattn.ops import rms_norm as rms_norm_op
from helpers import GRAD_FACTOR, assert_within_naive_error, missing_prerequisite

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACTIVATIONS = list(reference.ACTIVATIONS)
NORM_CONFIG_ENV = "FASTATTN_LAYER_NORM_CUDA_CONFIG"
FFN_CONFIG_ENV = "FASTATTN_FFN_CUDA_CONFIG"


@pytest.fixture(autouse=True)
def _cuda_extension(request, monkeypatch):
    """gpu tests fail (not skip) without the extension: on a GPU machine it must be built.
    Each starts with the automatic launch choices."""
    from fastattn import _extension

    if request.node.get_closest_marker("gpu") is None:
        return
    reason = _extension.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the cuda backend is unavailable: {reason}")
    monkeypatch.delenv(NORM_CONFIG_ENV, raising=False)
    monkeypatch.delenv(FFN_CONFIG_ENV, raising=False)


def _leaf(t, dtype=None):
    t = t.detach().to(dtype or t.dtype).clone()
    return t.requires_grad_(t.is_floating_point())


def _grads(outputs, cotangents, inputs):
    """Gradients of Σ outputs·cotangents wrt the inputs that are not None."""
    present = [t for t in inputs if t is not None]
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outputs, cotangents))
    found = iter(torch.autograd.grad(loss, present))
    return [None if t is None else next(found) for t in inputs]


def _assert_all(ours, naive, ref, names, what):
    for name, o, n, r in zip(names, ours, naive, ref):
        if r is None:
            continue
        factor = GRAD_FACTOR if name.startswith("d") else 2.0
        assert_within_naive_error(o, n, r, factor=factor, what=f"{what} {name}")


# ----------------------------------------------------------------------------- norms


def _norm_inputs(rows, hidden, dtype, *, weight=True, bias=True, residual=True, residual_dtype=None,
                 param_dtype=None, bias_dtype=None):
    g = torch.Generator(device="cuda").manual_seed(rows * 7919 + hidden)
    make = lambda *shape, dt: (torch.randn(*shape, generator=g, device="cuda") * 2 + 0.5).to(dt)
    return dict(
        x=make(rows, hidden, dt=dtype),
        weight=make(hidden, dt=param_dtype or dtype) if weight else None,
        bias=make(hidden, dt=bias_dtype or param_dtype or dtype) if bias else None,
        residual=make(rows, hidden, dt=residual_dtype or dtype) if residual else None,
    )


def _run_norm(op, inputs, backend, *, prenorm, residual_in_fp32, cast=None, seed=0):
    """(outputs, cotangents, grads) of op with prenorm outputs; cast converts inputs first."""
    names = ["x", "weight", "bias", "residual"] if op == "layer_norm" else ["x", "weight", "residual"]
    leaves = [None if inputs.get(n) is None else _leaf(inputs[n], cast) for n in names]
    kwargs = dict(zip(names, leaves))
    if op == "layer_norm":
        out = fastattn.layer_norm(kwargs["x"], kwargs["weight"], kwargs["bias"], 1e-5, residual=kwargs["residual"],
                                  prenorm=prenorm, residual_in_fp32=residual_in_fp32, backend=backend)
    else:
        out = fastattn.rms_norm(kwargs["x"], kwargs["weight"], 1e-6, residual=kwargs["residual"], prenorm=prenorm,
                                residual_in_fp32=residual_in_fp32, backend=backend)
    outputs = list(out) if prenorm else [out]
    g = torch.Generator(device="cuda").manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=g, device="cuda") for o in outputs]
    grads = _grads(outputs, cotangents, leaves)
    return outputs, grads, ["d" + n for n in names]


def _reference_norm(op, inputs, *, prenorm, residual_in_fp32):
    names = ["x", "weight", "bias", "residual"] if op == "layer_norm" else ["x", "weight", "residual"]
    leaves = [None if inputs.get(n) is None else _leaf(inputs[n], torch.float64) for n in names]
    kwargs = dict(zip(names, leaves))
    if op == "layer_norm":
        out = reference.layer_norm(kwargs["x"], kwargs["weight"], kwargs["bias"], 1e-5, residual=kwargs["residual"],
                                   prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    else:
        out = reference.rms_norm(kwargs["x"], kwargs["weight"], 1e-6, residual=kwargs["residual"], prenorm=prenorm,
                                 residual_in_fp32=residual_in_fp32)
    outputs = list(out) if prenorm else [out]
    g = torch.Generator(device="cuda").manual_seed(0)
    cotangents = [torch.randn(o.shape, generator=g, device="cuda") for o in outputs]
    return outputs, _grads(outputs, cotangents, leaves)


def _check_norm(op, inputs, *, prenorm=True, residual_in_fp32=False, what=""):
    ref_out, ref_grads = _reference_norm(op, inputs, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    naive_out, naive_grads, _ = _run_norm(op, inputs, "naive", prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    ours_out, ours_grads, names = _run_norm(op, inputs, "cuda", prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    for o, n in zip(ours_out, naive_out):
        assert o.dtype == n.dtype and o.shape == n.shape, f"{op}{what}: {o.dtype} {o.shape} vs {n.dtype} {n.shape}"
    for g, name in zip(ours_grads, names):
        t = inputs.get(name[1:])
        assert (g is None) == (t is None)
        assert t is None or g.dtype == t.dtype, f"{op}{what}: {name} dtype {g.dtype} != input dtype {t.dtype}"
    _assert_all(ours_out, naive_out, ref_out, ["y", "s"], f"{op}{what}")
    _assert_all(ours_grads, naive_grads, ref_grads, names, f"{op}{what}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 64, 255, 1000, 1024, 1025, 3000, 4096, 8200])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_matches_reference(op, hidden, dtype):
    inputs = _norm_inputs(37, hidden, dtype, bias=op == "layer_norm")
    _check_norm(op, inputs, what=f" hidden={hidden} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["path=warp", "path=block", "vec=0", "path=block,vec=0",
                                    "path=block,cache=0", "path=block,smem_acc=0",
                                    "path=block,cache=0,smem_acc=0,vec=0"])
@pytest.mark.parametrize("hidden", [40, 1024, 1536, 3000])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_launch_paths(monkeypatch, op, hidden, config):
    """Every layout the launchers can choose, pinned (path=warp only applies to hidden <= 1024)."""
    monkeypatch.setenv(NORM_CONFIG_ENV, config)
    for dtype in (torch.bfloat16, torch.float32):
        inputs = _norm_inputs(19, hidden, dtype, bias=op == "layer_norm")
        _check_norm(op, inputs, what=f" {config} hidden={hidden} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "weight_only", "fp32_stream", "residual_in_fp32", "fp32_params",
                                     "mixed_params", "fp16_residual", "no_prenorm"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_dtype_mixes(op, variant):
    """Residual streams and parameters in other dtypes than x (bfloat16 here)."""
    dtype = torch.bfloat16
    has_bias = op == "layer_norm"
    options = dict(
        plain=dict(residual=False, weight=False, bias=False),
        weight_only=dict(residual=False, bias=False),
        fp32_stream=dict(residual_dtype=torch.float32, bias=has_bias),
        residual_in_fp32=dict(bias=has_bias),
        fp32_params=dict(param_dtype=torch.float32, bias=has_bias),
        mixed_params=dict(bias_dtype=torch.float32, bias=has_bias),
        fp16_residual=dict(residual_dtype=torch.float16, bias=has_bias),
        no_prenorm=dict(bias=has_bias),
    )[variant]
    if variant == "mixed_params" and not has_bias:
        options = dict(param_dtype=torch.float16, bias=False)
    inputs = _norm_inputs(23, 1100 if variant == "fp32_stream" else 96, dtype, **options)
    _check_norm(op, inputs, prenorm=variant != "no_prenorm", residual_in_fp32=variant == "residual_in_fp32",
                what=f" {variant}")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [65536, 65536 + 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_widest_rows(hidden, dtype):
    """The widest rows: float32 rows of 64k elements do not fit the shared-memory cache."""
    for op in ("layer_norm", "rms_norm"):
        inputs = _norm_inputs(3, hidden, dtype, bias=op == "layer_norm")
        _check_norm(op, inputs, what=f" hidden={hidden} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [64, 2048])
def test_norm_strided_and_broadcast_inputs(hidden):
    """Non-contiguous x / residual views, and a stride-0 gradient (y.sum().backward() on
    float32 output reaches the backward as an expanded tensor)."""
    wide = torch.randn(17, 2 * hidden, device="cuda")
    x = wide[:, ::2].detach().requires_grad_()  # column stride 2
    residual = torch.randn(hidden, 17, device="cuda").t().detach().requires_grad_()  # (17, hidden), column stride 17
    weight = torch.randn(hidden, device="cuda", requires_grad=True)
    y = fastattn.layer_norm(x, weight, None, residual=residual, backend="cuda")
    y.sum().backward()
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    ref = reference.layer_norm(x64, w64, None, residual=r64)
    ref.sum().backward()
    naive_leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
    naive = fastattn.layer_norm(naive_leaves[0], naive_leaves[2], None, residual=naive_leaves[1], backend="naive")
    naive.sum().backward()
    assert_within_naive_error(y, naive, ref, what="strided y")
    for name, ours, nv, rf in zip(("dx", "dresidual", "dweight"), (x.grad, residual.grad, weight.grad),
                                  (t.grad for t in naive_leaves), (x64.grad, r64.grad, w64.grad)):
        assert_within_naive_error(ours, nv, rf, factor=GRAD_FACTOR, what=f"strided {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [96, 3000])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_parameter_grads_are_bitwise_reproducible(op, hidden):
    inputs = _norm_inputs(301, hidden, torch.bfloat16, bias=op == "layer_norm")
    first = _run_norm(op, inputs, "cuda", prenorm=True, residual_in_fp32=False)[1]
    second = _run_norm(op, inputs, "cuda", prenorm=True, residual_in_fp32=False)[1]
    for a, b in zip(first, second):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_norm_empty_rows():
    x = torch.randn(0, 64, device="cuda", requires_grad=True)
    weight = torch.randn(64, device="cuda", requires_grad=True)
    bias = torch.randn(64, device="cuda", requires_grad=True)
    y = fastattn.layer_norm(x, weight, bias, backend="cuda")
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.gpu
def test_norm_opcheck():
    x = torch.randn(9, 40, device="cuda")
    residual = torch.randn(9, 40, device="cuda")
    weight, bias = torch.randn(40, device="cuda"), torch.randn(40, device="cuda")
    torch.library.opcheck(layer_norm_op.layer_norm_fwd, (x, weight, bias, residual, 1e-5, False, "cuda"))
    y, s, mean, rstd = layer_norm_op.layer_norm_fwd(x, weight, bias, residual, 1e-5, False, "cuda")
    torch.library.opcheck(layer_norm_op.layer_norm_bwd,
                          (torch.randn_like(y), torch.randn_like(s), s, weight, bias, mean, rstd, 1e-5, "cuda"))
    torch.library.opcheck(rms_norm_op.rms_norm_fwd, (x, weight, residual, 1e-6, True, "cuda"))
    y, s, rstd = rms_norm_op.rms_norm_fwd(x, weight, residual, 1e-6, True, "cuda")
    torch.library.opcheck(rms_norm_op.rms_norm_bwd, (torch.randn_like(y), None, s, weight, rstd, 1e-6, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_compile_fullgraph(op):
    inputs = _norm_inputs(11, 200, torch.float32, bias=op == "layer_norm")
    eager_out, _, _ = _run_norm(op, inputs, "cuda", prenorm=True, residual_in_fp32=False)
    fn = fastattn.layer_norm if op == "layer_norm" else fastattn.rms_norm
    step = torch.compile(lambda *args: fn(*args[:-1], residual=args[-1], prenorm=True, backend="cuda"),
                         fullgraph=True)
    leaves = [_leaf(inputs[n]) for n in (["x", "weight", "bias", "residual"] if op == "layer_norm"
                                         else ["x", "weight", "residual"])]
    y, s = step(*leaves)
    torch.testing.assert_close(y, eager_out[0])
    torch.testing.assert_close(s, eager_out[1])
    (y.sum() + s.sum()).backward()
    assert all(t.grad is not None for t in leaves)


# ----------------------------------------------------------------------------- FFN


def _ffn_inputs(tokens, d_model, d_hidden, d_out, dtype, *, biases=True, gated=False):
    g = torch.Generator(device="cuda").manual_seed(tokens * 31 + d_model * 7 + d_hidden)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)
    if gated:
        return dict(x=make(tokens, d_model), w_gate=make(d_hidden, d_model, scale=d_model ** -0.5),
                    w_up=make(d_hidden, d_model, scale=d_model ** -0.5),
                    w_down=make(d_out, d_hidden, scale=d_hidden ** -0.5))
    return dict(x=make(tokens, d_model), w1=make(d_hidden, d_model, scale=d_model ** -0.5),
                b1=make(d_hidden) if biases else None, w2=make(d_out, d_hidden, scale=d_hidden ** -0.5),
                b2=make(d_out) if biases else None)


def _run_ffn(inputs, backend, activation, *, recompute=False, cast=None, reference_fn=False):
    gated = "w_gate" in inputs
    names = ["x", "w_gate", "w_up", "w_down"] if gated else ["x", "w1", "b1", "w2", "b2"]
    leaves = [None if inputs[n] is None else _leaf(inputs[n], cast) for n in names]
    if reference_fn:
        fn = reference.gated_ffn if gated else reference.ffn
        out = fn(*leaves, activation_name=activation)
    elif gated:
        out = fastattn.gated_ffn(*leaves, activation=activation, recompute=recompute, backend=backend)
    else:
        out = fastattn.ffn(*leaves, activation=activation, recompute=recompute, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    cotangent = torch.randn(out.shape, generator=g, device="cuda")
    return [out], _grads([out], [cotangent], leaves), ["d" + n for n in names]


def _check_ffn(inputs, activation, *, recompute=False, what=""):
    ref_out, ref_grads, _ = _run_ffn(inputs, None, activation, cast=torch.float64, reference_fn=True)
    naive_out, naive_grads, _ = _run_ffn(inputs, "naive", activation)
    ours_out, ours_grads, names = _run_ffn(inputs, "cuda", activation, recompute=recompute)
    assert ours_out[0].dtype == naive_out[0].dtype
    _assert_all(ours_out, naive_out, ref_out, ["y"], what)
    _assert_all(ours_grads, naive_grads, ref_grads, names, what)


FFN_SHAPES = [(37, 45, 67, 29), (1, 8, 16, 8), (64, 128, 256, 128), (130, 96, 200, 96), (257, 256, 688, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ffn_matches_reference(shape, dtype, activation):
    _check_ffn(_ffn_inputs(*shape, dtype), activation, what=f"ffn {shape} {dtype} {activation}")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_ffn_matches_reference(shape, dtype, activation):
    _check_ffn(_ffn_inputs(*shape, dtype, gated=True), activation, what=f"gated_ffn {shape} {dtype} {activation}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["", "lt_epilogue=0", "lt=0", "vec=0", "lt_epilogue=0,vec=0"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("shape", [(37, 45, 67, 29), (96, 64, 128, 64)], ids=lambda s: "x".join(map(str, s)))
def test_ffn_paths(monkeypatch, shape, biases, recompute, config):
    """cuBLASLt with and without its epilogues, ATen GEMMs, one-element accesses; saved or
    recomputed pre-activations; with and without biases."""
    monkeypatch.setenv(FFN_CONFIG_ENV, config)
    for activation in ("gelu_tanh", "silu"):
        inputs = _ffn_inputs(*shape, torch.bfloat16, biases=biases)
        _check_ffn(inputs, activation, recompute=recompute, what=f"ffn {config or 'default'} {activation}")
        gated = _ffn_inputs(*shape, torch.bfloat16, gated=True)
        _check_ffn(gated, activation, recompute=recompute, what=f"gated_ffn {config or 'default'} {activation}")


@pytest.mark.gpu
def test_ffn_strided_and_broadcast_inputs():
    """A transposed weight, a column-strided x, and a stride-0 gradient."""
    x = torch.randn(33, 96, device="cuda")[:, ::2].detach().requires_grad_()
    w1 = torch.randn(48, 40, device="cuda").t().div(7).detach().requires_grad_()  # (40, 48), stride (1, 40)
    w2 = torch.randn(24, 40, device="cuda").div(7).requires_grad_()
    y = fastattn.ffn(x, w1, None, w2, None, activation="gelu", backend="cuda")
    y.sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    ref = reference.ffn(leaves64[0], leaves64[1], None, leaves64[2], None, activation_name="gelu")
    ref.sum().backward()
    naive_leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    naive = fastattn.ffn(naive_leaves[0], naive_leaves[1], None, naive_leaves[2], None, backend="naive")
    naive.sum().backward()
    assert_within_naive_error(y, naive, ref, what="strided ffn y")
    for name, ours, nv, rf in zip(("dx", "dw1", "dw2"), (x.grad, w1.grad, w2.grad), (t.grad for t in naive_leaves),
                                  (t.grad for t in leaves64)):
        assert_within_naive_error(ours, nv, rf, factor=GRAD_FACTOR, what=f"strided ffn {name}")


def _at_offset(t, offset):
    """t's values in a leaf view starting `offset` elements into its storage: a pointer
    aligned to offset · element size bytes only (cuBLASLt assumes 256 unless told)."""
    storage = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view.requires_grad_(t.is_floating_point())


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["ffn", "gated_ffn"])
def test_ffn_operands_at_storage_offsets(gated, dtype, offset):
    """Every operand a view with a storage offset: the GEMMs get the pointers' real
    alignment, run with an algorithm that can load them (or ATen), and match the reference."""
    inputs = _ffn_inputs(37, 64, 96, 64, dtype, gated=gated)
    ref_out, ref_grads, names = _run_ffn(inputs, None, "gelu_tanh", cast=torch.float64, reference_fn=True)
    naive_out, naive_grads, _ = _run_ffn(inputs, "naive", "gelu_tanh")
    leaves = [None if inputs[n[1:]] is None else _at_offset(inputs[n[1:]], offset) for n in names]
    assert all(t is None or t.storage_offset() == offset for t in leaves)
    fn = fastattn.gated_ffn if gated else fastattn.ffn
    out = fn(*leaves, activation="gelu_tanh", backend="cuda")
    cotangent = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
    grads = _grads([out], [cotangent], leaves)
    what = f"{'gated_ffn' if gated else 'ffn'} offset {offset} {dtype}"
    _assert_all([out], naive_out, ref_out, ["y"], what)
    _assert_all(grads, naive_grads, ref_grads, names, what)


@pytest.mark.gpu
def test_ffn_bias_grads_are_bitwise_reproducible():
    inputs = _ffn_inputs(300, 64, 192, 64, torch.bfloat16)
    first = _run_ffn(inputs, "cuda", "gelu")[1]
    second = _run_ffn(inputs, "cuda", "gelu")[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_ffn_empty_tokens():
    inputs = _ffn_inputs(0, 16, 32, 16, torch.float32)
    out, grads, _ = _run_ffn(inputs, "cuda", "relu")
    assert out[0].shape == (0, 16)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))
    gated = _ffn_inputs(0, 16, 32, 16, torch.float32, gated=True)
    out, grads, _ = _run_ffn(gated, "cuda", "silu")
    assert out[0].shape == (0, 16)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.gpu
@pytest.mark.parametrize("save_hidden", [True, False])
def test_ffn_opcheck(save_hidden):
    i = _ffn_inputs(13, 24, 40, 24, torch.float32)
    torch.library.opcheck(ffn_op.ffn_fwd, (i["x"], i["w1"], i["b1"], i["w2"], i["b2"], "gelu", save_hidden, "cuda"))
    y, hidden = ffn_op.ffn_fwd(i["x"], i["w1"], i["b1"], i["w2"], i["b2"], "gelu", save_hidden, "cuda")
    torch.library.opcheck(ffn_op.ffn_bwd, (torch.randn_like(y), i["x"], i["w1"], i["b1"], i["w2"], i["b2"], hidden,
                                           "gelu", "cuda"))
    g = _ffn_inputs(13, 24, 40, 24, torch.float32, gated=True)
    args = (g["x"], g["w_gate"], g["w_up"], g["w_down"], "silu", save_hidden, "cuda")
    torch.library.opcheck(gated_ffn_op.gated_ffn_fwd, args)
    y, gate, up = gated_ffn_op.gated_ffn_fwd(*args)
    torch.library.opcheck(gated_ffn_op.gated_ffn_bwd, (torch.randn_like(y), g["x"], g["w_gate"], g["w_up"],
                                                       g["w_down"], gate, up, "silu", "cuda"))


@pytest.mark.gpu
def test_ffn_compile_fullgraph():
    i = _ffn_inputs(21, 32, 64, 32, torch.float32)
    leaves = [_leaf(i[n]) for n in ("x", "w1", "b1", "w2", "b2")]
    step = torch.compile(lambda *a: fastattn.ffn(*a, activation="silu", backend="cuda"), fullgraph=True)
    y = step(*leaves)
    torch.testing.assert_close(y, fastattn.ffn(*leaves, activation="silu", backend="cuda"))
    y.sum().backward()
    assert all(t.grad is not None for t in leaves)
    g = _ffn_inputs(21, 32, 64, 32, torch.float32, gated=True)
    leaves = [_leaf(g[n]) for n in ("x", "w_gate", "w_up", "w_down")]
    step = torch.compile(lambda *a: fastattn.gated_ffn(*a, backend="cuda"), fullgraph=True)
    step(*leaves).sum().backward()
    assert all(t.grad is not None for t in leaves)


# ----------------------------------------------------------------------------- memcheck

SANITIZER_SCRIPT = textwrap.dedent('''
    """A small case of every cuda-backend kernel and launch path, for compute-sanitizer."""
    import os
    import torch
    import fastattn

    torch.manual_seed(0)
    kw = dict(device="cuda", requires_grad=True)
    for config in ("", "path=block", "vec=0", "path=block,vec=0", "path=block,cache=0,smem_acc=0"):
        os.environ["FASTATTN_LAYER_NORM_CUDA_CONFIG"] = config
        for hidden in (40, 1024, 1030):
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(9, hidden, dtype=dtype, **kw)
                r = torch.randn(9, hidden, dtype=dtype, **kw)
                w = torch.randn(hidden, dtype=dtype, **kw)
                b = torch.randn(hidden, dtype=dtype, **kw)
                y, s = fastattn.layer_norm(x, w, b, residual=r, prenorm=True, backend="cuda")
                (y.float().sum() + s.float().sum()).backward()
                y, s = fastattn.rms_norm(x, w, residual=r, prenorm=True, residual_in_fp32=True, backend="cuda")
                (y.float().sum() + s.sum()).backward()
    for config in ("", "lt_epilogue=0", "vec=0", "lt=0"):
        os.environ["FASTATTN_FFN_CUDA_CONFIG"] = config
        for tokens, d, h in ((7, 24, 40), (9, 45, 67)):
            x = torch.randn(tokens, d, dtype=torch.bfloat16, **kw)
            w1 = torch.randn(h, d, dtype=torch.bfloat16, **kw)
            b1 = torch.randn(h, dtype=torch.bfloat16, **kw)
            w_up = torch.randn(h, d, dtype=torch.bfloat16, **kw)
            w2 = torch.randn(d, h, dtype=torch.bfloat16, **kw)
            b2 = torch.randn(d, dtype=torch.bfloat16, **kw)
            for activation in ("gelu", "gelu_tanh", "relu", "silu"):
                for recompute in (False, True):
                    y = fastattn.ffn(x, w1, b1, w2, b2, activation=activation, recompute=recompute, backend="cuda")
                    y.float().sum().backward()
                    y = fastattn.gated_ffn(x, w1, w_up, w2, activation=activation, recompute=recompute,
                                           backend="cuda")
                    y.float().sum().backward()
    torch.cuda.synchronize()
    print("sanitizer script finished")
''')


@pytest.mark.gpu
def test_compute_sanitizer_memcheck(tmp_path):
    """compute-sanitizer --tool memcheck over every kernel (PyTorch's caching allocator off, so
    that an access past a tensor's end leaves its own allocation)."""
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(sanitizer):
        missing_prerequisite("compute-sanitizer is not installed")
    script = tmp_path / "cuda_kernels_memcheck.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--leak-check", "no",
                             sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=1800)
    log = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, log
    assert "sanitizer script finished" in result.stdout, log
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr, log


# ----------------------------------------------------------------------------- anywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_backend_refused_with_a_reason_without_a_gpu():
    """Without a GPU the cuda backend is unavailable, never an import error: asking for it
    raises a ValueError that says why, and auto picks another backend."""
    x = torch.randn(3, 8)
    w, w_hidden, w_out = torch.randn(8), torch.randn(16, 8), torch.randn(8, 16)
    calls = {
        "layer_norm": lambda b: fastattn.layer_norm(x, w, w, backend=b),
        "rms_norm": lambda b: fastattn.rms_norm(x, w, backend=b),
        "ffn": lambda b: fastattn.ffn(x, w_hidden, None, w_out, None, backend=b),
        "gated_ffn": lambda b: fastattn.gated_ffn(x, w_hidden, w_hidden, w_out, backend=b),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"backend 'cuda' cannot serve this {op} call: .*CUDA"):
            call("cuda")
        assert call(None).shape == (3, 8)
    assert "cuda" not in fastattn.available_backends()


def test_cuda_limits_name_the_dtype():
    norm_call = layer_norm_op.NormCall(torch.float64, 8, False)
    for table in (layer_norm_op.BACKENDS, rms_norm_op.BACKENDS):
        assert "float16, bfloat16 or float32" in table.limits("cuda", norm_call)
        assert table.limits("cuda", layer_norm_op.NormCall(torch.bfloat16, 65536 + 5, True)) is None
    ffn_call = ffn_op.FfnCall(torch.float64, 8, 16, "gelu")
    for table in (ffn_op.BACKENDS, gated_ffn_op.BACKENDS):
        assert "float16, bfloat16 or float32" in table.limits("cuda", ffn_call)
        assert table.limits("cuda", ffn_op.FfnCall(torch.bfloat16, 8, 16, "silu")) is None
