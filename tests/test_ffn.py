"""fastattn.ffn on every backend (triton included): output and every gradient against the
float64 reference over odd sizes and all activations, optional biases, recompute=True vs
False, the saved hidden pre-activation, strides, the registered ops (opcheck),
torch.compile, the tf32 policy, the pinned-config variable, and bad input.

CPU runs use the Triton interpreter, fp32 and fp16 only (tl.dot on bf16 is wrong there);
bf16 and large shapes are `gpu` tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import ffn as ffn_op
from ffn_cases import (
    ACTIVATIONS, EDGE_CONFIG, FFN, GPU, SHAPES, TRITON_DEVICE, as_leaves, check_against_reference,
    check_compiled_matches_eager, check_no_tokens, check_recompute_matches_saved, edge_failures, force_autotuning, run,
)
from helpers import ATOL, backends_of, forward_is_reference

OP = FFN
BACKENDS = backends_of(ffn_op.BACKENDS)
EDGE_CONFIG_ENV = "FASTATTN_FFN_CONFIG"


def make_inputs(tokens, d_model, d_hidden, d_out, *, bias=(True, True), device="cpu", lead=(), exact_hidden=False):
    """fp32 inputs with O(1) activations: x (*lead, tokens, d_model), nn.Linear weights.

    exact_hidden: x, W1, b1 on grids that make H = x·W1ᵀ + b1 exact in fp16 and never 0
    (multiples of 1/32, offset by 1/64), so relu's derivative cannot flip between
    precisions and the comparison stays meaningful.
    """
    x = torch.randn(*lead, tokens, d_model, device=device)
    w1 = torch.randn(d_hidden, d_model, device=device) / d_model**0.5
    w2 = torch.randn(d_out, d_hidden, device=device) / d_hidden**0.5
    b1 = torch.randn(d_hidden, device=device) if bias[0] else None
    if exact_hidden:
        x = torch.randint(-4, 5, x.shape, device=device) / 4
        w1 = torch.randint(-4, 5, w1.shape, device=device) / 8
        b1 = torch.randint(-16, 17, (d_hidden,), device=device) / 32 + 1 / 64
    b2 = torch.randn(d_out, device=device) if bias[1] else None
    return [x, w1, b1, w2, b2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_and_gradient(backend, dtype, activation):
    shape = SHAPES[1 + ACTIVATIONS.index(activation) % 3]
    check_against_reference(OP, make_inputs(*shape, exact_hidden=activation == "relu"), dtype, backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:1] + [(5, 40, 40, 40), (100, 72, 96, 72)], ids=str)
def test_odd_sizes(backend, shape):
    check_against_reference(OP, make_inputs(*shape), torch.float32, backend, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)], ids=["none", "b1", "b2"])
def test_optional_biases(backend, bias):
    check_against_reference(OP, make_inputs(33, 40, 96, 24, bias=bias), torch.float32, backend, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_matches_saved_hidden(backend):
    """recompute=True keeps only x and recomputes H: same output, same gradients."""
    check_recompute_matches_saved(OP, make_inputs(33, 40, 96, 40), torch.randn(33, 40), "gelu_tanh", backend)
    check_against_reference(OP, make_inputs(33, 40, 96, 40, exact_hidden=True), torch.float16, backend, "relu",
                            recompute=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_hidden_pre_and_placeholders(backend):
    """ffn_fwd returns H = x·W1ᵀ + b1 only when saving it; ffn_bwd recomputes H from a
    placeholder and gives placeholder gradients for absent biases."""
    x, w1, b1, w2, _ = make_inputs(7, 24, 40, 24)
    y, hidden = ffn_op.ffn_fwd(x, w1, b1, w2, None, "silu", True, backend)
    torch.testing.assert_close(hidden, torch.addmm(b1, x, w1.t()))
    if not forward_is_reference(backend):
        torch.testing.assert_close(y, reference.ffn(x, w1, b1, w2, None, activation_name="silu"))
    y2, placeholder = ffn_op.ffn_fwd(x, w1, b1, w2, None, "silu", False, backend)
    assert placeholder.shape == (0,) and torch.equal(y2, y)
    dy = torch.randn_like(y)
    with_hidden = ffn_op.ffn_bwd(dy, x, w1, b1, w2, None, hidden, "silu", backend)
    recomputed = ffn_op.ffn_bwd(dy, x, w1, b1, w2, None, placeholder, "silu", backend)
    assert with_hidden[4].shape == (0,) and recomputed[4].shape == (0,)
    for a, b in zip(with_hidden, recomputed):
        torch.testing.assert_close(a, b)
    # autograd through the float64 reference (the naive and torch backward ARE reference.ffn_backward)
    leaves64 = as_leaves([x, w1, b1, w2], torch.float64)
    y64 = reference.ffn(*leaves64[:3], leaves64[3], None, activation_name="silu")
    expected = torch.autograd.grad(y64, leaves64, dy.double())
    for ours, ref in zip(with_hidden[:4], expected):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_stride_zero_gradient(backend):
    """Non-contiguous x and weights, extra leading dims, and y.sum().backward(), whose
    gradient reaches the backward expanded with stride 0."""
    x, w1, b1, w2, b2 = make_inputs(9, 40, 72, 24, lead=(2,))
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # (2, 9, 40), non-contiguous
    w1_strided = w1.t().contiguous().t()  # (72, 40) column-major
    w2_strided = torch.randn(48, 72)[::2]  # (24, 72), row stride 144
    leaves = [t.requires_grad_() for t in (x_strided, w1_strided, b1.clone(), w2_strided, b2.clone())]
    assert not leaves[0].is_contiguous() and not leaves[1].is_contiguous() and not leaves[3].is_contiguous()
    y = fastattn.ffn(*leaves, activation="gelu", backend=backend)
    assert y.shape == (2, 9, 24)
    y.sum().backward()
    ref_leaves = as_leaves(leaves, torch.float64)
    reference.ffn(*ref_leaves, activation_name="gelu").sum().backward()
    if not forward_is_reference(backend):
        torch.testing.assert_close(y.double(), reference.ffn(*ref_leaves, activation_name="gelu").detach(),
                                   rtol=1e-4, atol=1e-5)
    for name, ours, ref in zip(OP.grad_names, leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    """An empty batch: empty output, zero weight and bias gradients."""
    check_no_tokens(OP, make_inputs, backend)


def test_bias_gradients_are_deterministic():
    inputs = make_inputs(40, 24, 96, 40, device=TRITON_DEVICE)
    cotangent = torch.randn(40, 40, device=TRITON_DEVICE)
    runs = [run(lambda *t: fastattn.ffn(*t, backend="triton"), as_leaves(inputs, torch.float32), cotangent)[1]
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_against_reference(OP, inputs, torch.float32, "triton", "gelu")


@pytest.mark.parametrize("save_hidden", [True, False], ids=["saved", "recompute"])
def test_opcheck_triton(save_hidden):
    x, w1, b1, w2, b2 = make_inputs(7, 24, 40, 40, device=TRITON_DEVICE)
    torch.library.opcheck(ffn_op.ffn_fwd, (x, w1, b1, w2, b2, "gelu", save_hidden, "triton"))
    y, hidden = ffn_op.ffn_fwd(x, w1, b1, w2, b2, "gelu", save_hidden, "triton")
    dy = torch.randn_like(y)
    torch.library.opcheck(ffn_op.ffn_bwd, (dy, x, w1, b1, w2, b2, hidden, "gelu", "triton"))
    torch.library.opcheck(ffn_op.ffn_bwd, (dy, x, w1, None, w2, None, hidden, "gelu", "triton"))
    check_against_reference(OP, [x, w1, b1, w2, b2], torch.float32, "triton", "gelu", recompute=not save_hidden)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_compile_fullgraph_forward_and_backward(recompute):
    torch._dynamo.reset()
    inputs = make_inputs(7, 24, 40, 24, lead=(2,), device=TRITON_DEVICE)
    cotangent = torch.randn(2, 7, 24, device=TRITON_DEVICE)

    def fn(*t):
        return fastattn.ffn(*t, activation="silu", recompute=recompute, backend="triton")

    check_compiled_matches_eager(fn, inputs, cotangent, compile_options=dict(backend="aot_eager"))
    check_against_reference(OP, inputs, torch.float32, "triton", "silu", recompute=recompute)


def test_tf32_only_when_torch_allows_it():
    from fastattn.kernels import ffn as kernels

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert not kernels.tf32_allowed() and kernels._dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "tf32"
        assert kernels.tf32_allowed() and kernels._dot_precision(torch.float32) == "tf32"
        assert kernels._dot_precision(torch.float16) == kernels._dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.fp32_precision = before


def test_pinned_config_variable(monkeypatch):
    """FASTATTN_FFN_CONFIG pins the tiles (here narrower ones); malformed values are refused."""
    from fastattn.kernels import _config

    monkeypatch.setenv(_config.FFN_CONFIG_ENV, "BLOCK_M=16,BLOCK_N=64,BLOCK_K=16,GROUP_M=1")
    pinned = _config.ffn_pinned_config()
    assert pinned == {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 1}
    base = (dict(_config.FFN_INTERPRETER_CONFIG) if _config.interpreted()
            else _config.ffn_default("fwd", _config.target_arch(TRITON_DEVICE), torch.float32, 33))
    assert _config.ffn_launch_config("fwd", TRITON_DEVICE, torch.float32, 33) == {**base, **pinned}
    check_against_reference(OP, make_inputs(33, 40, 96, 40, device=TRITON_DEVICE), torch.float32, "triton", "gelu")
    for bad in ("BLOCK_M=48", "BLOCK_M=8", "BLOCK_Q=16", "num_warps=0", "BLOCK_M"):
        monkeypatch.setenv(_config.FFN_CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=_config.FFN_CONFIG_ENV):
            _config.ffn_pinned_config()


def test_autotune_space():
    """FASTATTN_AUTOTUNE=1 tries at most 8 configs per kernel and GPU family, each within
    the register and shared-memory rules, fewer for a few tokens."""
    from fastattn.kernels import _config

    for family, arch in (("sm90", 90), ("sm80", 80)):
        for kernel in _config.FFN_KERNELS:
            accumulators = _config.ffn_accumulators(kernel)
            configs = _config.ffn_configs(kernel, family)
            assert 1 <= len(configs) <= 8
            for c in configs:
                m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
                assert _config.ffn_keep(m, n, k, c.num_warps, c.num_stages, accumulators, 2, arch)
    prune = _config.ffn_prune("fwd")
    small = prune(_config.ffn_configs("fwd", "sm90"), {}, A=torch.empty(1, dtype=torch.float32), M=8, N=8000, K=64)
    assert small and all(c.kwargs["BLOCK_M"] == 64 for c in small)
    assert all(_config.ffn_shared_memory(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                                         1, 4) <= _config.shared_memory_per_block(90) for c in small)


def test_triton_limits():
    x, w1, b1, w2, b2 = make_inputs(4, 24, 40, 24, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="triton.*float64"):
        fastattn.ffn(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), backend="triton")
    if fastattn.backends.triton_interpreter_on():
        with pytest.raises(ValueError, match="bfloat16.*interpreter"):
            fastattn.ffn(*(t.bfloat16() for t in (x, w1, b1, w2, b2)), backend="triton")
    assert ffn_op.BACKENDS.resolve(None, torch.device("cpu"), ffn_op.FfnCall(torch.float32, 24, 40, "gelu")) == "torch"


R = torch.randn
BAD_INPUTS = {
    "x not a tensor": (lambda: fastattn.ffn([1.0], R(4, 2), None, R(2, 4), None), TypeError,
                       "x must be a torch.Tensor"),
    "x 0-D": (lambda: fastattn.ffn(R(()), R(4, 1), None, R(1, 4), None), ValueError, "x must be at least 1-D"),
    "w1 1-D": (lambda: fastattn.ffn(R(3, 8), R(8), None, R(8, 8), None), ValueError, "w1 must be 2-D"),
    "w1 int": (lambda: fastattn.ffn(R(3, 8), torch.ones(4, 8, dtype=torch.int32), None, R(8, 4), None), TypeError,
               "w1 must have dtype"),
    "b2 shape": (lambda: fastattn.ffn(R(3, 8), R(16, 8), None, R(8, 16), R(16)), ValueError,
                 r"b2 must have shape \(d_out,\) = \(8,\)"),
    "b1 dtype": (lambda: fastattn.ffn(R(3, 8), R(16, 8), R(16).half(), R(8, 16), None), TypeError,
                 "b1 has dtype float16 but x has float32"),
    "w2 device": (lambda: fastattn.ffn(R(3, 8), R(16, 8), None, torch.empty(8, 16, device="meta"), None), ValueError,
                  "w2 is on meta"),
    "recompute not bool": (lambda: fastattn.ffn(R(3, 8), R(16, 8), None, R(8, 16), None, recompute=1), TypeError,
                           "recompute must be a bool"),
    "activation unknown": (lambda: fastattn.ffn(R(3, 8), R(16, 8), None, R(8, 16), None, activation="tanh"),
                           ValueError, "activation must be one of"),
    "backend unknown": (lambda: fastattn.ffn(R(3, 8), R(16, 8), None, R(8, 16), None, backend="cudnn"), ValueError,
                        "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input(case):
    fn, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        fn()


_COMPILE_FOR_GPU = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastattn.kernels import ffn as K

    POINTERS = {"A", "B", "BIAS", "OUT", "PRE", "X", "B_GATE", "B_UP", "GATE", "UP", "DY", "W", "DPRE", "ACT",
                "DGATE", "DUP", "PROD", "A1", "B1", "A2", "B2", "C", "ROW_SUM"}
    UNIT_STRIDES = {"stride_ak", "stride_bk", "stride_bias", "stride_outn", "stride_pren", "stride_xk", "stride_gk",
                    "stride_uk", "stride_gaten", "stride_upn", "stride_dyk", "stride_wn", "stride_dpren", "stride_actn",
                    "stride_dgaten", "stride_dupn", "stride_prodn", "stride_a1m", "stride_b1n", "stride_a2k",
                    "stride_b2n", "stride_cn"}  # as launched on contiguous tensors (Wᵀ and dHᵀ read in place)
    FLAGS = dict(ACTIVATION="gelu", HAS_BIAS=True, STORE_OUT=True, STORE_PRE=True, STORE_ACT=True,
                 STORE_PROD=True, DUAL=True, HAS_ROW_SUM=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    TARGETS = ((90, "bf16", "tf32"), (90, "fp32", "tf32"), (80, "fp16", "tf32"), (80, "fp32", "ieee"))
    for arch, dtype, precision in TARGETS:
        for fn in (K._ffn_fwd_kernel, K._gated_ffn_fwd_kernel, K._ffn_bwd_dact_kernel,
                   K._gated_ffn_bwd_dgated_kernel, K._ffn_bwd_dw_kernel, K._ffn_bwd_dx_kernel):
            signature, constants, attrs = {}, {}, {}
            for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
                if param.is_constexpr:
                    signature[name] = "constexpr"
                    constants[(i,)] = precision if name == "DOT_PRECISION" else FLAGS[name]
                elif name in POINTERS:
                    signature[name] = "*fp32" if name == "ROW_SUM" else "*" + dtype
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif name in UNIT_STRIDES:
                    signature[name] = "constexpr"  # Triton specializes a stride of 1 like this
                    constants[(i,)] = 1
                else:
                    signature[name] = "i32"
                    attrs[(i,)] = [["tt.divisibility", 16]]
            kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": 8, "num_stages": 3})
            ptx = kernel.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
            print(arch, dtype, fn.__name__, mma)
            expected = "fma" if precision == "ieee" else "wgmma" if arch == 90 else "mma.sync"
            if mma != expected:
                sys.exit(f"{fn.__name__} for sm_{arch} {dtype}: {mma} instead of {expected}")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80():
    """Without a GPU: Triton compiles every kernel to PTX for sm_90 and sm_80 (tensor-core
    MMA for fp16/bf16/tf32, FMA for ieee fp32), which the interpreter cannot check."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 24


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_matches_reference(dtype, activation):
    inputs = make_inputs(1000, 1024, 2816, 1000, device=GPU)
    check_against_reference(OP, inputs, dtype, "triton", activation)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4097, 768, 3072, 768), (1, 4096, 11008, 4096), (333, 1000, 1000, 200)], ids=str)
def test_gpu_large_and_odd_shapes_bf16(shape):
    check_against_reference(OP, make_inputs(*shape, device=GPU), torch.bfloat16, "triton", "gelu", recompute=True)


@pytest.mark.gpu
def test_gpu_tf32_follows_torch():
    """fp32 with tf32 allowed stays within the error of cuBLAS under the same setting."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        for precision in ("ieee", "tf32"):
            matmul.fp32_precision = precision
            inputs = make_inputs(512, 1024, 4096, 1024, device=GPU)
            check_against_reference(OP, inputs, torch.float32, "triton", "gelu")
    finally:
        matmul.fp32_precision = before


@pytest.mark.gpu
def test_gpu_auto_prefers_triton_and_compiles():
    inputs = make_inputs(256, 512, 2048, 512, device=GPU)
    assert ffn_op.BACKENDS.resolve(None, GPU, ffn_op.FfnCall(torch.bfloat16, 512, 2048, "gelu")) in ("cuda", "triton")
    cotangent = torch.randn(256, 512, device=GPU)
    check_compiled_matches_eager(lambda *t: fastattn.ffn(*t, backend="triton"), inputs, cotangent,
                                 dtype=torch.bfloat16, atol=ATOL[torch.bfloat16], rtol=1.6e-2)
    check_against_reference(OP, inputs, torch.bfloat16, "triton", "gelu")


# ----------------------------------------------------------------------------- tile edges


def test_tile_edges_every_residue(monkeypatch):
    """Every residue of M, N and K modulo pinned 16-wide tiles, forward and backward
    (ffn_cases.edge_shapes)."""
    monkeypatch.setenv(EDGE_CONFIG_ENV, EDGE_CONFIG)
    failures = edge_failures(lambda shape: check_against_reference(
        OP, make_inputs(*shape, device=TRITON_DEVICE), torch.float32, "triton", "gelu"))
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- default configs, autotuning, offsets


def test_autotuned_backward_with_recomputed_hidden(monkeypatch):
    """With autotuning on, the backward that writes dH over the recomputed H (recompute)
    is still right: the autotuner reruns the kernel on the same buffers while it times
    the configs, so it must restore H between runs."""
    if TRITON_DEVICE.type == "cuda":
        pytest.skip("forces the autotuner under the interpreter; on a GPU FASTATTN_AUTOTUNE=1 does it")
    benched = force_autotuning(monkeypatch)
    check_against_reference(OP, make_inputs(33, 40, 96, 40), torch.float32, "triton", "gelu", recompute=True)
    assert "_ffn_bwd_dact_kernel" in benched


def test_weight_gradient_steps_past_2_to_the_31():
    """x rows 2²⁶ + 64 elements apart: the weight-gradient GEMM (K = tokens) steps
    through x BLOCK_K rows at a time, more than 2³¹ elements per step, and its first tile
    spans nearly 2³¹; int64 offsets keep both exact. The storage is a few GB of address
    space, barely touched."""
    from helpers import huge_strided

    tokens, d_model, row_stride = 33, 24, (1 << 26) + 64
    x = huge_strided((tokens, d_model), (row_stride, 1))
    _, w1, b1, w2, b2 = make_inputs(tokens, d_model, 40, 24, device=TRITON_DEVICE)
    assert x.stride(0) * 32 >= 2**31
    check_against_reference(OP, [x, w1, b1, w2, b2], torch.float16, "triton", "gelu")


def test_default_configs_one_per_key(monkeypatch):
    """Without FASTATTN_AUTOTUNE every launch gets the one default of its (GPU family,
    kernel class, operand dtype, size) key, within its GPU's shared memory (sm_86's 99 KB
    too, by fewer stages); FASTATTN_AUTOTUNE=1 hands the launch to the autotuner; pinned
    keys override the default."""
    from fastattn.kernels import _config

    monkeypatch.delenv(_config.FFN_CONFIG_ENV, raising=False)
    monkeypatch.setattr(_config, "interpreted", lambda: False)
    device = torch.device("cpu")  # a stand-in: FASTATTN_TRITON_ARCH names the GPU
    for arch in (80, 86, 90):
        monkeypatch.setenv(_config.TARGET_ARCH_ENV, str(arch))
        for kernel in _config.FFN_KERNELS:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for tokens in (1, 64, 65, 4096):
                    config = _config.ffn_launch_config(kernel, device, dtype, tokens)
                    assert config == _config.ffn_default(kernel, arch, dtype, tokens)
                    assert set(config) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
                    staged = _config.ffn_shared_memory(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"],
                                                       config["num_stages"], _config.ffn_accumulators(kernel),
                                                       dtype.itemsize)
                    assert staged <= _config.shared_memory_per_block(arch)
                    assert config["num_stages"] >= _config.FFN_MIN_STAGES
    assert _config.ffn_default("out", 90, torch.bfloat16, 4096)["BLOCK_N"] == 256  # Triton's Hopper matmul tile
    monkeypatch.setenv(_config.AUTOTUNE_ENV, "1")
    assert _config.ffn_launch_config("fwd", device, torch.bfloat16, 4096) is None
    monkeypatch.setenv(_config.FFN_CONFIG_ENV, "num_warps=4")
    assert _config.ffn_launch_config("fwd", device, torch.bfloat16, 4096) == dict(
        _config.ffn_default("fwd", 90, torch.bfloat16, 4096), num_warps=4)
