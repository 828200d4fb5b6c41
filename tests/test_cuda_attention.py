"""The CUDA attention kernels (csrc/attention): FlashAttention-2 on sm80+, the Hopper
forward on sm90.

On a machine without a GPU (CI) the kernel bodies run on the host emulator of the
instructions they use (csrc/attention/emulation.cuh, driven by
tests/cuda_emulation/attention_emulation.cpp): the sm80 forward or the Hopper forward
(TMA, mbarriers, wgmma, warp specialization), then the sm80 backward; output, lse and
the three gradients against the float64 reference with FlashAttention's rule
(helpers.py), over odd lengths, both causal alignments, sliding windows, GQA, strided
layouts, both timings of the asynchronous copies and both thread orders. The `gpu` tests run backend="cuda" through
fastattn.attention with the Triton tests' checks (test_attention.check_attention), plus
strides, determinism, opcheck, torch.compile, compute-sanitizer (memcheck, racecheck)
and the SASS of the Hopper kernel (HGMMA).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import attention as attention_op
from helpers import GRAD_FACTOR, assert_within_naive_error, missing_prerequisite
from test_attention import _finite, _inputs, check_attention

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HARNESS = ROOT / "tests" / "cuda_emulation" / "attention_emulation.cpp"
HOST_ONLY_HEADERS = ROOT / "tests" / "cuda_emulation" / "host_only"


# ----------------------------------------------------------------------------- on CPU: the emulator


def _pip_cuda_include_dirs():
    """Include dirs of CUDA headers that pip packages carry: Triton's wheel
    (triton/backends/nvidia/include) and NVIDIA's wheels that a CUDA torch depends on
    (nvidia/<cuda_runtime or cuXX>/include), found without importing them."""
    found = []
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        found.append(pathlib.Path(triton.origin).parent / "backends" / "nvidia" / "include")
    nvidia = importlib.util.find_spec("nvidia")
    if nvidia is not None:
        for location in nvidia.submodule_search_locations or ():
            found += sorted(pathlib.Path(location).glob("*/include"))
    return found


def _cuda_include_dir():
    """A directory holding cuda_fp16.h: the CUDA toolkit's include dir, else the headers of
    a pip package (a machine with only pip packages still builds the emulator); or None."""
    candidates = [pathlib.Path(os.environ[name]) / "include" for name in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(name)]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        toolkit = pathlib.Path(nvcc).resolve().parent.parent
        candidates += [toolkit / "include", toolkit / "targets" / "x86_64-linux" / "include"]
        try:  # nvcc may be a wrapper script: its dry run names the real include dir
            dry_run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                     capture_output=True, text=True, timeout=120)
            candidates += [pathlib.Path(m) for m in re.findall(r'-I"?([^"\s]+)', dry_run.stdout + dry_run.stderr)]
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [pathlib.Path("/usr/local/cuda/include"), *pathlib.Path("/usr/local").glob("cuda-*/targets/*/include")]
    candidates += _pip_cuda_include_dirs()
    return next((c for c in candidates if (c / "cuda_fp16.h").is_file()), None)


def emulator_include_dirs(include: pathlib.Path) -> list[pathlib.Path]:
    """The -I dirs for CUDA headers found in `include`: it, plus the host-only <nv/target>
    (tests/cuda_emulation/host_only) when it comes without CCCL (Triton's wheel)."""
    if (include / "nv" / "target").is_file():
        return [include]
    if (include / "cccl" / "nv" / "target").is_file():
        return [include, include / "cccl"]
    return [include, HOST_ONLY_HEADERS]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The host build of the emulation harness (g++, CUDA's headers only). Without g++ or
    cuda_fp16.h the emulator tests skip, and fail under CI=true."""
    compiler = shutil.which("g++")
    include = _cuda_include_dir()
    if compiler is None:
        missing_prerequisite("g++ is not on PATH (it builds the CUDA emulator)")
    if include is None:
        missing_prerequisite("no cuda_fp16.h found (CUDA toolkit, triton/backends/nvidia/include or NVIDIA's "
                             "pip wheels) to build the CUDA emulator")
    return build_emulator(compiler, emulator_include_dirs(include), tmp_path_factory.mktemp("cuda_emulation"))


def build_emulator(compiler: str, include_dirs, directory: pathlib.Path) -> pathlib.Path:
    binary = directory / "attention_emulation"
    command = [compiler, "-std=c++20", "-O1", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
               f"-I{CSRC}", *(f"-I{d}" for d in include_dirs), str(HARNESS), "-o", str(binary)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"building the emulator failed:\n{' '.join(command)}\n{build.stderr[-4000:]}"
    return binary


def _write(path, t):
    t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tofile(path)


def _read(path, shape, dtype):
    raw = np.fromfile(path, dtype=np.int16 if dtype in (torch.float16, torch.bfloat16) else np.float32)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def run_emulated(binary, workdir, *, batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype,
                 causal=False, window=(-1, -1), top_left=False, with_dlse=True, copy_mode="deferred",
                 reverse_warps=False, strided=False, forward="sm80"):
    """The forward (`forward`: "sm80" or "sm90") and the sm80 backward on the emulator,
    checked like every backend: out, lse, dq, dk, dv against float64 within the naive
    same-precision error rule."""
    window = (window[0], 0 if causal else window[1])
    scale = 1.0 / math.sqrt(head_dim)
    q, k, v = (t.to(dtype) for t in _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim))
    dout = torch.randn(batch, heads, seqlen_q, head_dim).to(dtype)
    dlse = torch.randn(batch, heads, seqlen_q) if with_dlse else None
    for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        _write(workdir / f"{name}.bin", t)
    if dlse is not None:
        _write(workdir / "dlse.bin", dlse)
    fields = (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, int(dtype == torch.bfloat16), repr(scale),
              window[0], window[1], int(top_left), int(with_dlse), int(copy_mode == "deferred"),
              int(reverse_warps), int(strided), int(forward == "sm90"))
    (workdir / "case.txt").write_text(" ".join(map(str, fields)) + "\n")
    result = subprocess.run([str(binary), str(workdir)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"emulated kernels failed ({result.returncode}): {result.stderr[-2000:]}"

    q_shape, k_shape = (batch, heads, seqlen_q, head_dim), (batch, kv_heads, seqlen_k, head_dim)
    out = _read(workdir / "out.bin", q_shape, dtype)
    lse = _read(workdir / "lse.bin", q_shape[:3], torch.float32)
    grads = [_read(workdir / f"{n}.bin", s, dtype) for n, s in (("dq", q_shape), ("dk", k_shape), ("dv", k_shape))]

    options = dict(scale=scale, window_size=window, top_left=top_left)

    def oracle(precision):
        q_, k_, v_, dout_ = (t.to(precision) for t in (q, k, v, dout))
        out_, lse_ = reference.attention(q_, k_, v_, return_lse=True, **options)
        dlse_ = None if dlse is None else dlse.to(precision)
        return out_, lse_, reference.attention_backward(dout_, q_, k_, v_, dlse=dlse_, **options)[:3]

    ref_out, ref_lse, ref_grads = oracle(torch.float64)
    naive_out, naive_lse, naive_grads = oracle(dtype)
    assert_within_naive_error(out, naive_out, ref_out, what="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ"
    assert_within_naive_error(_finite(lse), _finite(naive_lse.float()), _finite(ref_lse), atol=1e-5, what="lse")
    for name, ours, naive, ref in zip(("dq", "dk", "dv"), grads, naive_grads, ref_grads):
        assert torch.isfinite(ours).all(), f"{name} is not finite"
        assert_within_naive_error(ours, naive, ref, factor=GRAD_FACTOR, what=name)


# (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, options): each case crosses
# several tile boundaries of traits.cuh (sm80 forward 128 x 64, dQ 64 x 64, dK/dV 64 x 128;
# sm90 forward 128 x 128 with a 4-stage (d=64) or 2-stage (d=128) ring).
EMULATED_CASES = {
    "fp16-d64-causal-sq<sk-gqa": (1, 2, 1, 70, 133, 64, torch.float16, dict(causal=True)),
    "bf16-d64-causal-sq>sk-eager-reversed": (
        1, 2, 2, 133, 70, 64, torch.bfloat16, dict(causal=True, copy_mode="eager", reverse_warps=True)),
    "fp16-d128-full-strided": (1, 2, 1, 65, 129, 128, torch.float16, dict(strided=True)),
    "bf16-d128-window-top-left": (1, 1, 1, 37, 45, 128, torch.bfloat16, dict(window=(5, 3), top_left=True)),
    "fp16-d64-window-left-strided-eager": (
        1, 3, 1, 150, 150, 64, torch.float16, dict(window=(6, -1), strided=True, copy_mode="eager")),
    "fp16-d64-one-by-one-no-dlse": (2, 2, 2, 1, 1, 64, torch.float16, dict(with_dlse=False)),
    "sm90-fp16-d64-causal-ring-wraps": (1, 2, 1, 260, 700, 64, torch.float16, dict(causal=True, forward="sm90")),
    "sm90-bf16-d128-full-eager": (
        1, 2, 2, 130, 390, 128, torch.bfloat16, dict(copy_mode="eager", reverse_warps=True, forward="sm90")),
    "sm90-fp16-d128-window-top-left-strided": (
        1, 2, 1, 150, 77, 128, torch.float16, dict(window=(20, 5), top_left=True, strided=True, forward="sm90")),
    "sm90-bf16-d64-causal-blocks-without-keys": (1, 2, 1, 300, 77, 64, torch.bfloat16, dict(causal=True, forward="sm90")),
}


@pytest.mark.parametrize("case", list(EMULATED_CASES))
def test_kernels_on_the_emulator(emulator, tmp_path, case):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, options = EMULATED_CASES[case]
    run_emulated(emulator, tmp_path, batch=batch, heads=heads, kv_heads=kv_heads, seqlen_q=seqlen_q,
                 seqlen_k=seqlen_k, head_dim=head_dim, dtype=dtype, **options)


def test_generated_instantiations_are_up_to_date():
    script = CSRC / "attention" / "generate_instantiations.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, f"run `python {script.relative_to(ROOT)}`:\n{result.stdout}"


# Tile edges: a key tile whose last column lies exactly one past what the tile's first
# query row sees (sk - sq + window_right ≡ BLOCK_N - 2 mod BLOCK_N, full query tiles) must
# still be masked element by element (tile_needs_mask). At BLOCK_N = 64 (sm80 forward, dQ)
# and 128 (Hopper forward, dK/dV); each case runs the backward too.
TILE_EDGE_CASES = {
    "fp16-d64-causal-sk-sq=62": (1, 1, 1, 128, 190, 64, torch.float16, dict(causal=True)),
    "bf16-d64-window-right-3-sk-sq=59": (1, 2, 1, 128, 187, 64, torch.bfloat16, dict(window=(-1, 3))),
    "sm90-fp16-d128-causal-sk-sq=126": (1, 1, 1, 128, 254, 128, torch.float16, dict(causal=True, forward="sm90")),
    "sm90-fp16-d64-window-right-3-sk-sq=123": (
        1, 1, 1, 128, 251, 64, torch.float16, dict(window=(-1, 3), forward="sm90")),
}


@pytest.mark.parametrize("case", list(TILE_EDGE_CASES))
def test_kernels_on_the_emulator_at_tile_edges(emulator, tmp_path, case):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, options = TILE_EDGE_CASES[case]
    run_emulated(emulator, tmp_path, batch=batch, heads=heads, kv_heads=kv_heads, seqlen_q=seqlen_q,
                 seqlen_k=seqlen_k, head_dim=head_dim, dtype=dtype, **options)


@pytest.fixture(scope="module")
def dispatch_check(tmp_path_factory):
    """tests/cuda_emulation/dispatch_check.cpp built with g++ (csrc/attention/dispatch.h is
    plain C++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    binary = tmp_path_factory.mktemp("dispatch_check") / "dispatch_check"
    source = ROOT / "tests" / "cuda_emulation" / "dispatch_check.cpp"
    build = subprocess.run([compiler, "-std=c++20", "-Wall", f"-I{CSRC}", str(source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]

    def run(*commands):
        result = subprocess.run([str(binary)], input="\n".join(commands) + "\n", capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    return run


def test_forward_dispatch_picks_the_hopper_kernel_only_where_it_can_run(dispatch_check):
    answers = dispatch_check("choose 90 0 1", "choose 90 1 1", "choose 90 0 0", "choose 86 0 1", "choose 100 0 1",
                             "choose 80 1 0")
    assert answers[0] == "sm90"
    assert answers[1] == "sm80: pinned by FASTATTN_ATTENTION_CUDA_KERNEL=sm80"
    assert answers[2].startswith("sm80: fastattn._C has no sm_90a code") and "TORCH_CUDA_ARCH_LIST" in answers[2]
    assert answers[3:] == ["sm80: the device is not compute capability 9.0"] * 3


@pytest.mark.parametrize("layout,describable", [
    ((2, 4, 100, 64, 4 * 100 * 64, 100 * 64, 64), True),        # contiguous
    ((2, 4, 100, 64, 100 * 4 * 64, 64, 4 * 64), True),          # (b, s, h, d) transposed
    ((2, 4, 100, 64, 100 * 4 * 72, 72, 4 * 72), True),          # padded rows: 144-byte strides
    ((2, 4, 100, 64, 100 * 4 * 68, 68, 4 * 68), False),         # 136 bytes: not a multiple of 16
    ((2, 4, 100, 64, 0, 100 * 64, 64), False),                  # expanded over batch
    ((2, 4, 100, 64, 100 * 64, 0, 64), False),                  # expanded over heads
    ((2, 4, 100, 64, 4 * 100 * 64, 100 * 64, 0), False),        # expanded over rows
    ((2, 1, 100, 64, 100 * 64, 0, 64), True),                   # stride 0 over one head: never stepped
    ((1, 4, 1, 64, 3, 64, 0), True),                            # one batch, one row: only heads' stride matters
    ((1, 4, 1, 64, 3, 0, 0), False),                            # ... expanded over heads
], ids=["contiguous", "bshd", "padded-144B", "padded-136B", "expand-batch", "expand-heads", "expand-rows",
        "one-head", "one-row", "one-row-expand-heads"])
def test_tma_describes_what_the_hopper_forward_can_load(dispatch_check, layout, describable):
    assert dispatch_check("tma " + " ".join(map(str, layout))) == [str(int(describable))]


def test_cuda_backend_refuses_what_the_kernels_lack(monkeypatch):
    monkeypatch.setattr(attention_op, "cuda_head_dims", lambda: (64, 128))

    def reason(dtype=torch.float16, head_dim=64, head_dim_v=64, **flags):
        call = attention_op.AttentionCall(dtype, head_dim, head_dim_v, flags.get("bias", False),
                                          flags.get("softcap", 0.0), flags.get("dropout_p", 0.0), False,
                                          has_alibi=flags.get("alibi", False))
        return attention_op.limits("cuda", call)

    assert reason() is None and reason(torch.bfloat16, 128, 128) is None
    assert "float16 or bfloat16, got float32" in reason(torch.float32)
    assert "head_dim in (64, 128)" in reason(head_dim=80, head_dim_v=80)
    assert "got 64 (q, k) and 128 (v)" in reason(head_dim_v=128)
    assert "attn_bias" in reason(bias=True)
    assert "alibi_slopes" in reason(alibi=True)
    assert "softcap" in reason(softcap=1.0)
    assert "dropout" in reason(dropout_p=0.1)


# ----------------------------------------------------------------------------- on the GPU

gpu = pytest.mark.gpu
GPU_LENGTHS = ((1, 1), (1, 257), (7, 97), (97, 7), (257, 257), (1025, 1025), (257, 1025), (1025, 257))


def _cuda_head_dims():
    """The built head dims; (64, 128) where unknown, so that a missing build fails, not vanishes."""
    return (attention_op.cuda_head_dims() if torch.cuda.is_available() else ()) or (64, 128)


@pytest.fixture
def cuda_backend():
    reason = fastattn.backends.backend_unavailable_reason("cuda", torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"the cuda backend is unavailable on this GPU machine: {reason}")


SM80_PINNED = "sm80: pinned by FASTATTN_ATTENTION_CUDA_KERNEL=sm80"
SM80_NOT_SM90 = "sm80: the device is not compute capability 9.0"


def forward_counts():
    """{outcome: forwards of this process} (fastattn_cuda::attention_forward_counts)."""
    outcomes, counts = torch.ops.fastattn_cuda.attention_forward_counts()
    return dict(zip(outcomes, counts))


@pytest.fixture(params=["default", "sm80"], ids=["fwd-default", "fwd-sm80"])
def forward_kernel(request, cuda_backend, monkeypatch):
    """The device's own forward (the Hopper kernel on sm90), then the sm80 forward pinned
    by FASTATTN_ATTENTION_CUDA_KERNEL (the same kernel twice elsewhere: skipped). Yields the
    outcome every forward of the test must have ("sm90" for the Hopper kernel): the test
    fails if any ran another kernel (a silent fallback) or, run in this process, none ran."""
    on_hopper = torch.cuda.get_device_capability() == (9, 0)
    if request.param == "sm80":
        if not on_hopper:
            pytest.skip("the sm80 forward is the default on this device")
        monkeypatch.setenv("FASTATTN_ATTENTION_CUDA_KERNEL", "sm80")
        expected = SM80_PINNED
    else:
        expected = "sm90" if on_hopper else SM80_NOT_SM90
    before = forward_counts()
    yield expected
    ran = {outcome: n - before[outcome] for outcome, n in forward_counts().items() if n != before[outcome]}
    assert set(ran) <= {expected}, f"meant to run {expected!r} only, ran {ran}"
    if not getattr(request.function, "forwards_in_subprocess", False):
        assert ran, f"meant to run {expected!r}, no forward ran"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", _cuda_head_dims())
@pytest.mark.parametrize("lengths", GPU_LENGTHS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_sweep(forward_kernel, dtype, head_dim, lengths, causal):
    q, k, v = _inputs(2, 4, 2, lengths[0], lengths[1], head_dim, device="cuda")
    check_attention("cuda", q, k, v, dtype=dtype, causal=causal)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("options", [
    dict(scale=0.3, causal=True), dict(window_size=(5, 3)), dict(window_size=(6, -1)), dict(window_size=(2, 0)),
    dict(window_size=(200, 0)), dict(window_size=(0, 0)),
], ids=["scale", "window", "window-left", "window-right-0", "window-wide-causal", "diagonal-only"])
def test_gpu_windows(forward_kernel, dtype, options):
    q, k, v = _inputs(1, 4, 2, 300, 257, 64, device="cuda")
    check_attention("cuda", q, k, v, dtype=dtype, **options)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seqlens", [(300, 257), (257, 300)], ids=["sq>sk", "sq<sk"])
def test_gpu_sdpa_top_left_causal_and_mqa(forward_kernel, dtype, seqlens):
    q, k, v = _inputs(2, 8, 1, seqlens[0], seqlens[1], 128, device="cuda")
    check_attention("cuda", q, k, v, dtype=dtype, sdpa=True, is_causal=True, enable_gqa=True)


@gpu
def test_gpu_large(forward_kernel):
    """Many tiles per block and every stage of the cp.async ring reused."""
    for head_dim in _cuda_head_dims():
        for causal in (False, True):
            q, k, v = _inputs(2, 16, 4, 2048, 2048, head_dim, device="cuda")
            check_attention("cuda", q, k, v, dtype=torch.bfloat16, causal=causal)


@gpu
def test_gpu_any_strides(forward_kernel):
    """(b, s, h, d) views read in place, a misaligned base and a strided head_dim copied,
    a stride-0 output gradient: all give bitwise what contiguous inputs give; gradients
    come back contiguous, as the fake implementation allocates them."""
    b, h, hk, sq, sk, d = 2, 4, 2, 77, 150, 64
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    k = torch.randn(b, sk, hk, d + 1, device="cuda", dtype=torch.float16)[..., 1:].transpose(1, 2)
    v = torch.randn(b, hk, sk, 2 * d, device="cuda", dtype=torch.float16)[..., ::2]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*leaves, causal=True, return_lse=True, backend="cuda")
    dout = torch.randn(1, 1, 1, d, device="cuda", dtype=torch.float16).expand(out.shape)
    grads = torch.autograd.grad(out, leaves, dout)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out_c, lse_c = fastattn.attention(*dense, causal=True, return_lse=True, backend="cuda")
    grads_c = torch.autograd.grad(out_c, dense, dout.contiguous())
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for grad, grad_c in zip(grads, grads_c):
        assert torch.equal(grad, grad_c)
    assert all(grad.is_contiguous() for grad in grads)  # as the fake implementation allocates them


@gpu
def test_gpu_backward_is_bitwise_deterministic(cuda_backend):
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, device="cuda")

    def grads():
        leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = fastattn.attention(*leaves, causal=True, backend="cuda")
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    for a, b_ in zip(grads(), grads()):
        assert torch.equal(a, b_)


@gpu
def test_gpu_opcheck(cuda_backend):
    q, k, v = (t.half() for t in _inputs(1, 4, 2, 37, 45, 64, device="cuda"))
    fwd_args = (q, k, v, None, None, None, 0.125, -1, 0, False, 0.0, 0.0, "cuda")
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastattn.attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, None, None, None, 0.125, -1, 0,
                False, 0.0, 0.0, False, "cuda")
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, bwd_args)


@gpu
def test_gpu_compile_fullgraph(cuda_backend):
    torch._dynamo.reset()
    q, k, v = (t.bfloat16() for t in _inputs(1, 4, 2, 100, 130, 128, device="cuda"))

    def f(q_, k_, v_):
        out, lse = fastattn.attention(q_, k_, v_, causal=True, return_lse=True, backend="cuda")
        return out.float().sum() + _finite(lse).sum()

    eager = [t.detach().requires_grad_() for t in (q, k, v)]
    compiled_in = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = f(*eager)
    expected.backward()
    got = torch.compile(f, fullgraph=True)(*compiled_in)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, e in zip(compiled_in, eager):
        torch.testing.assert_close(a.grad, e.grad)


@gpu
def test_gpu_refusals(cuda_backend):
    q, k, v = (t.half() for t in _inputs(1, 2, 2, 5, 5, 80, device="cuda"))
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot serve .*head_dim in"):
        fastattn.attention(q, k, v, backend="cuda")
    q, k, v = (t.half() for t in _inputs(1, 2, 2, 5, 5, 64, device="cuda"))
    with pytest.raises(ValueError, match="no attn_bias"):
        fastattn.attention(q, k, v, attn_bias=torch.zeros(5, 5, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="no alibi_slopes"):
        fastattn.attention(q, k, v, alibi_slopes=torch.ones(2, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16, got float32"):
        fastattn.attention(q.float(), k.float(), v.float(), backend="cuda")
    with pytest.raises(ValueError, match=r"fastattn_cuda::attention_fwd: k and v must have q's head_dim"):
        torch.ops.fastattn_cuda.attention_fwd(q, k[..., :32].contiguous(), v, 0.1, -1, -1, False)
    assert fastattn.attention(q, k, v, softcap=2.0).shape == q.shape  # auto falls back


TMA_FALLBACK_SCRIPT = textwrap.dedent("""
    import warnings
    import torch
    import fastattn._C  # noqa: F401  (the fastattn_cuda ops)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 130, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 1, 150, 64, device="cuda", dtype=torch.float16).expand(1, 2, 150, 64)  # stride 0 over heads
    v = torch.randn(1, 2, 150, 64, device="cuda", dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.ops.fastattn_cuda.attention_fwd(q, k, v, 0.125, -1, -1, False)
        torch.cuda.synchronize()
    print(torch.ops.fastattn_cuda.attention_last_forward())
    print(sum("Hopper forward cannot take these tensors" in str(w.message) for w in caught))
""")


@gpu
def test_gpu_hopper_forward_falls_back_where_tma_cannot_load_and_says_so_once(cuda_backend, tmp_path):
    """k expanded over heads (stride 0): TMA cannot describe it, the sm80 forward runs,
    attention_last_forward says why, one warning per process says so (a fresh process:
    TORCH_WARN_ONCE), and the output is the Hopper forward's on the same values."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper forward runs on sm90 only")
    script = tmp_path / "fallback.py"
    script.write_text(TMA_FALLBACK_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    last, warnings_seen = result.stdout.splitlines()[-2:]
    assert last.startswith("sm80: TMA cannot describe k"), last
    assert warnings_seen == "1", result.stdout

    q, k, v = (t.half() for t in _inputs(1, 4, 1, 130, 150, 64, device="cuda"))
    k_expanded, v_expanded = k.expand(1, 2, 150, 64), v.expand(1, 2, 150, 64)
    fallback = torch.ops.fastattn_cuda.attention_fwd(q, k_expanded, v_expanded, 0.125, -1, -1, False)
    assert torch.ops.fastattn_cuda.attention_last_forward().startswith("sm80: TMA cannot describe k")
    hopper = torch.ops.fastattn_cuda.attention_fwd(q, k_expanded.contiguous(), v_expanded.contiguous(), 0.125, -1,
                                                   -1, False)
    assert torch.ops.fastattn_cuda.attention_last_forward() == "sm90"
    ref_out, ref_lse = reference.attention(q.double(), k_expanded.double(), v_expanded.double(), scale=0.125,
                                           return_lse=True)
    naive_out, naive_lse = reference.attention(q, k_expanded, v_expanded, scale=0.125, return_lse=True)
    for out, lse in (fallback, hopper):
        assert_within_naive_error(out, naive_out, ref_out, what="out")
        assert_within_naive_error(lse, naive_lse.float(), ref_lse, atol=1e-5, what="lse")


@gpu
def test_gpu_last_forward_names_the_kernel_of_this_thread(cuda_backend, monkeypatch):
    q, k, v = (t.half() for t in _inputs(1, 2, 2, 70, 70, 64, device="cuda"))
    torch.ops.fastattn_cuda.attention_fwd(q, k, v, 0.125, -1, -1, False)
    expected = "sm90" if torch.cuda.get_device_capability() == (9, 0) else SM80_NOT_SM90
    assert torch.ops.fastattn_cuda.attention_last_forward() == expected
    if torch.cuda.get_device_capability() == (9, 0):
        monkeypatch.setenv("FASTATTN_ATTENTION_CUDA_KERNEL", "sm80")
        torch.ops.fastattn_cuda.attention_fwd(q, k, v, 0.125, -1, -1, False)
        assert torch.ops.fastattn_cuda.attention_last_forward() == SM80_PINNED


# ----------------------------------------------------------------------------- GPU tools

SANITIZER_SCRIPT = textwrap.dedent("""
    import sys
    import torch, fastattn
    torch.manual_seed(0)
    for dtype, head_dim, causal, (sq, sk) in [(torch.float16, 64, True, (77, 150)),
                                              (torch.bfloat16, 128, False, (150, 77))]:
        q = torch.randn(1, 4, sq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, sk, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, sk, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        out, lse = fastattn.attention(q, k, v, causal=causal, return_lse=True, backend="cuda")
        (out.float().sum() + lse[lse.isfinite()].sum()).backward()
    torch.cuda.synchronize()
    outcomes, counts = torch.ops.fastattn_cuda.attention_forward_counts()
    ran = {o: n for o, n in zip(outcomes, counts) if n}
    assert set(ran) == {sys.argv[1]}, f"meant to run {sys.argv[1]!r}, ran {ran}"
    print("ran")
""")


@gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_compute_sanitizer(forward_kernel, tool, tmp_path):
    """Small odd-sized cases (partial tiles, GQA, causal) forward and backward under
    compute-sanitizer; the forward is the device's own and, on sm90, the sm80 one too."""
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        missing_prerequisite("compute-sanitizer is not on PATH")
    script = tmp_path / "run.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=99", sys.executable, str(script),
                             forward_kernel],
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0 and "ran" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr, result.stdout[-4000:]


test_gpu_compute_sanitizer.forwards_in_subprocess = True  # the script checks which forward ran


def _sass(function_pattern, arch):
    """{kernel name: its SASS} of fastattn._C's kernels built for `arch` (e.g. "sm_90a")
    whose mangled name matches."""
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        missing_prerequisite("cuobjdump is not on PATH")
    import fastattn._C as extension

    dump = subprocess.run([cuobjdump, "--dump-sass", extension.__file__], capture_output=True, text=True,
                          check=True).stdout
    kernels = {}
    sections = re.split(r"\n\s*code for (sm_\w+)", dump)
    for section_arch, section in zip(sections[1::2], sections[2::2]):
        if section_arch.rstrip("a") != arch.rstrip("a"):  # cuobjdump's SASS dump names sm_90a code "sm_90"
            continue
        for block in re.split(r"\n\s*Function : ", section)[1:]:
            name, _, body = block.partition("\n")
            if re.search(function_pattern, name):
                kernels[name.strip()] = body
    return kernels


@gpu
def test_gpu_sass_of_the_hopper_kernel_has_hgmma(cuda_backend):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel is built and run for sm_90 only")
    kernels = _sass(r"attention_fwd_kernel_sm90", "sm_90a")
    assert kernels, "no sm_90a build of the Hopper kernel in fastattn._C (is 9.0a in TORCH_CUDA_ARCH_LIST?)"
    for name, body in kernels.items():
        assert "HGMMA" in body, f"{name}: no HGMMA instruction"
        assert "UTMALDG" in body or "UBLKCP" in body, f"{name}: no TMA load"


@gpu
def test_gpu_sass_of_the_sm80_kernels_has_hmma_and_ldsm(cuda_backend):
    arch = "sm_90a" if torch.cuda.get_device_capability() == (9, 0) else "sm_80"  # the cubin this device runs
    kernels = _sass(r"attention_(fwd|bwd_dq|bwd_dkdv)_kernel_sm80", arch)
    assert kernels, f"no {arch} build of the sm80 attention kernels in fastattn._C"
    for name, body in kernels.items():
        assert "HMMA" in body and "LDSM" in body and "LDGSTS" in body, f"{name}: no mma.sync/ldmatrix/cp.async"
