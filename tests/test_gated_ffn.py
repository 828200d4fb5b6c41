"""fastattn.gated_ffn (SwiGLU, GeGLU, ...) on every backend (triton included): output and
every gradient against the float64 reference over odd sizes and all activations,
recompute=True vs False, the saved pre-activations, strides, the registered ops
(opcheck), torch.compile and bad input.

CPU runs use the Triton interpreter, fp32 and fp16 only (tl.dot on bf16 is wrong there);
bf16 and large shapes are `gpu` tests.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import gated_ffn as gated_op
from ffn_cases import (
    ACTIVATIONS, EDGE_CONFIG, GATED_FFN, GPU, SHAPES, TRITON_DEVICE, as_leaves, check_against_reference,
    check_compiled_matches_eager, check_no_tokens, check_recompute_matches_saved, edge_failures, force_autotuning,
)
from helpers import ATOL, assert_within_naive_error, backends_of, forward_is_reference

OP = GATED_FFN
BACKENDS = backends_of(gated_op.BACKENDS)
EDGE_CONFIG_ENV = "FASTATTN_FFN_CONFIG"


def make_inputs(tokens, d_model, d_hidden, d_out, *, device="cpu", lead=(), exact_gate=False):
    """fp32 inputs: x (*lead, tokens, d_model) and nn.Linear weights.

    exact_gate: x and W_gate on grids that make G = x·W_gateᵀ exact in fp16 and never 0
    (x[..., 0] = 1 and W_gate[:, 0] off the grid by 1/64), so relu's derivative cannot
    flip between precisions.
    """
    x = torch.randn(*lead, tokens, d_model, device=device)
    w_gate = torch.randn(d_hidden, d_model, device=device) / d_model**0.5
    w_up = torch.randn(d_hidden, d_model, device=device) / d_model**0.5
    w_down = torch.randn(d_out, d_hidden, device=device) / d_hidden**0.5
    if exact_gate:
        x = torch.randint(-4, 5, x.shape, device=device) / 4
        x[..., 0] = 1.0
        w_gate = torch.randint(-4, 5, w_gate.shape, device=device) / 8
        w_gate[:, 0] = torch.randint(-16, 17, (d_hidden,), device=device) / 32 + 1 / 64
    return [x, w_gate, w_up, w_down]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_and_gradient(backend, dtype, activation):
    shape = SHAPES[1 + ACTIVATIONS.index(activation) % 3]
    check_against_reference(OP, make_inputs(*shape, exact_gate=activation == "relu"), dtype, backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:1] + [(5, 40, 40, 40), (100, 72, 96, 72)], ids=str)
def test_odd_sizes(backend, shape):
    check_against_reference(OP, make_inputs(*shape), torch.float32, backend, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_matches_saved_pre_activations(backend):
    """recompute=True keeps only x and recomputes G and U: same output, same gradients."""
    check_recompute_matches_saved(OP, make_inputs(33, 40, 96, 40), torch.randn(33, 40), "gelu", backend)
    check_against_reference(OP, make_inputs(33, 40, 96, 40), torch.float16, backend, "silu", recompute=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pre_activations_and_placeholders(backend):
    """gated_ffn_fwd returns G = x·W_gateᵀ and U = x·W_upᵀ only when saving them;
    gated_ffn_bwd recomputes them from placeholders."""
    x, w_gate, w_up, w_down = make_inputs(7, 24, 40, 24)
    y, gate, up = gated_op.gated_ffn_fwd(x, w_gate, w_up, w_down, "silu", True, backend)
    torch.testing.assert_close(gate, x @ w_gate.t())
    torch.testing.assert_close(up, x @ w_up.t())
    if not forward_is_reference(backend):
        torch.testing.assert_close(y, reference.gated_ffn(x, w_gate, w_up, w_down))
    y2, gate0, up0 = gated_op.gated_ffn_fwd(x, w_gate, w_up, w_down, "silu", False, backend)
    assert gate0.shape == (0,) and up0.shape == (0,) and torch.equal(y2, y)
    dy = torch.randn_like(y)
    with_saved = gated_op.gated_ffn_bwd(dy, x, w_gate, w_up, w_down, gate, up, "silu", backend)
    recomputed = gated_op.gated_ffn_bwd(dy, x, w_gate, w_up, w_down, gate0, up0, "silu", backend)
    # autograd through the float64 reference (the naive and torch backward ARE reference.gated_ffn_backward)
    leaves64 = as_leaves([x, w_gate, w_up, w_down], torch.float64)
    expected = torch.autograd.grad(reference.gated_ffn(*leaves64), leaves64, dy.double())
    for a, b, ref in zip(with_saved, recomputed, expected):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_stride_zero_gradient(backend):
    """Non-contiguous x and weights, extra leading dims, and y.sum().backward(), whose
    gradient reaches the backward expanded with stride 0."""
    x, w_gate, w_up, _ = make_inputs(9, 40, 72, 24, lead=(2,))
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # (2, 9, 40), non-contiguous
    w_gate_strided = w_gate.t().contiguous().t()  # (72, 40) column-major
    w_down_strided = torch.randn(48, 72)[::2] / 8  # (24, 72), row stride 144
    leaves = [t.requires_grad_() for t in (x_strided, w_gate_strided, w_up.clone(), w_down_strided)]
    y = fastattn.gated_ffn(*leaves, activation="gelu_tanh", backend=backend)
    assert y.shape == (2, 9, 24)
    y.sum().backward()
    ref_leaves = as_leaves(leaves, torch.float64)
    ref_out = reference.gated_ffn(*ref_leaves, activation_name="gelu_tanh")
    ref_out.sum().backward()
    if not forward_is_reference(backend):
        torch.testing.assert_close(y.double(), ref_out.detach(), rtol=1e-4, atol=1e-5)
    for name, ours, ref in zip(OP.grad_names, leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    check_no_tokens(OP, make_inputs, backend)


@pytest.mark.parametrize("save_hidden", [True, False], ids=["saved", "recompute"])
def test_opcheck_triton(save_hidden):
    x, w_gate, w_up, w_down = make_inputs(7, 24, 40, 40, device=TRITON_DEVICE)
    torch.library.opcheck(gated_op.gated_ffn_fwd, (x, w_gate, w_up, w_down, "gelu", save_hidden, "triton"))
    y, gate, up = gated_op.gated_ffn_fwd(x, w_gate, w_up, w_down, "gelu", save_hidden, "triton")
    torch.library.opcheck(gated_op.gated_ffn_bwd,
                          (torch.randn_like(y), x, w_gate, w_up, w_down, gate, up, "gelu", "triton"))
    check_against_reference(OP, [x, w_gate, w_up, w_down], torch.float32, "triton", "gelu",
                            recompute=not save_hidden)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_compile_fullgraph_forward_and_backward(recompute):
    torch._dynamo.reset()
    inputs = make_inputs(7, 24, 40, 24, lead=(2,), device=TRITON_DEVICE)
    cotangent = torch.randn(2, 7, 24, device=TRITON_DEVICE)

    def fn(*t):
        return fastattn.gated_ffn(*t, recompute=recompute, backend="triton")

    check_compiled_matches_eager(fn, inputs, cotangent, compile_options=dict(backend="aot_eager"))
    check_against_reference(OP, inputs, torch.float32, "triton", "silu", recompute=recompute)


def test_compile_with_inductor():
    torch._dynamo.reset()
    inputs = make_inputs(7, 24, 40, 24, device=TRITON_DEVICE)
    cotangent = torch.randn(7, 24, device=TRITON_DEVICE)

    def fn(*t):
        return fastattn.gated_ffn(*t, backend="triton") * 2

    check_compiled_matches_eager(fn, inputs, cotangent)
    check_against_reference(OP, inputs, torch.float32, "triton", "silu")


def test_triton_limits():
    x, w_gate, w_up, w_down = make_inputs(4, 24, 40, 24, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="triton.*float64"):
        fastattn.gated_ffn(x.double(), w_gate.double(), w_up.double(), w_down.double(), backend="triton")
    if fastattn.backends.triton_interpreter_on():
        with pytest.raises(ValueError, match="bfloat16.*interpreter"):
            fastattn.gated_ffn(*(t.bfloat16() for t in (x, w_gate, w_up, w_down)), backend="triton")


R = torch.randn
BAD_INPUTS = {
    "x not a tensor": (lambda: fastattn.gated_ffn(3.0, R(4, 2), R(4, 2), R(2, 4)), TypeError,
                       "x must be a torch.Tensor"),
    "w_gate shape": (lambda: fastattn.gated_ffn(R(3, 8), R(16, 7), R(16, 8), R(8, 16)), ValueError,
                     r"w_gate must have shape \(d_hidden, d_model\) .* d_model = 8"),
    "w_up 3-D": (lambda: fastattn.gated_ffn(R(3, 8), R(16, 8), R(1, 16, 8), R(8, 16)), ValueError, "w_up must be 2-D"),
    "w_down dtype": (lambda: fastattn.gated_ffn(R(3, 8), R(16, 8), R(16, 8), R(8, 16).half()), TypeError,
                     "w_down has dtype float16 but x has float32"),
    "w_up device": (lambda: fastattn.gated_ffn(R(3, 8), R(16, 8), torch.empty(16, 8, device="meta"), R(8, 16)),
                    ValueError, "w_up is on meta"),
    "recompute not bool": (lambda: fastattn.gated_ffn(R(3, 8), R(16, 8), R(16, 8), R(8, 16), recompute="yes"),
                           TypeError, "recompute must be a bool"),
    "activation unknown": (lambda: fastattn.gated_ffn(R(3, 8), R(16, 8), R(16, 8), R(8, 16), activation="swiglu"),
                           ValueError, "activation must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input(case):
    fn, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        fn()


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_matches_reference(dtype, activation):
    check_against_reference(OP, make_inputs(1000, 1024, 2731, 1000, device=GPU), dtype, "triton", activation)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4097, 768, 2048, 768), (1, 4096, 11008, 4096), (333, 1000, 1000, 200)], ids=str)
def test_gpu_large_and_odd_shapes_bf16(shape):
    check_against_reference(OP, make_inputs(*shape, device=GPU), torch.bfloat16, "triton", "silu", recompute=True)


@pytest.mark.gpu
def test_gpu_compiles():
    inputs = make_inputs(256, 512, 1365, 512, device=GPU)
    cotangent = torch.randn(256, 512, device=GPU)
    check_compiled_matches_eager(lambda *t: fastattn.gated_ffn(*t, backend="triton"), inputs, cotangent,
                                 dtype=torch.bfloat16, atol=ATOL[torch.bfloat16], rtol=1.6e-2)
    check_against_reference(OP, inputs, torch.bfloat16, "triton", "silu")


# ----------------------------------------------------------------------------- tile edges


def test_tile_edges_every_residue_forward(monkeypatch):
    """Every residue of M, N and K modulo pinned 16-wide tiles in the dual-accumulator
    forward GEMM (ffn_cases.edge_shapes). Forward only: the backward's GEMMs are the
    plain FFN's, which test_ffn.py sweeps forward and backward."""
    monkeypatch.setenv(EDGE_CONFIG_ENV, EDGE_CONFIG)

    def check(shape):
        inputs = make_inputs(*shape, device=TRITON_DEVICE)
        ref = OP.ref(*as_leaves(inputs, torch.float64), activation_name="silu")
        naive = OP.ref(*inputs, activation_name="silu")
        out = OP.public(*inputs, activation="silu", backend="triton")
        assert_within_naive_error(out, naive, ref, what="y")

    failures = edge_failures(check)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- autotuning with aliased buffers


def test_autotuned_backward_with_recomputed_pre_activations(monkeypatch):
    """With autotuning on, the backward that writes dG, dU over the recomputed G, U
    (recompute) is still right: the autotuner reruns the kernel on the same buffers while
    it times the configs, so it must restore G and U between runs."""
    if TRITON_DEVICE.type == "cuda":
        pytest.skip("forces the autotuner under the interpreter; on a GPU FASTATTN_AUTOTUNE=1 does it")
    benched = force_autotuning(monkeypatch)
    check_against_reference(OP, make_inputs(33, 40, 96, 40), torch.float32, "triton", "silu", recompute=True)
    assert "_gated_ffn_bwd_dgated_kernel" in benched
