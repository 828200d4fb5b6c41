"""fastattn.attention and scaled_dot_product_attention in depth, on every backend.

Each call is checked against the float64 reference (FlashAttention's rule, helpers.py):
output, lse and every gradient (q, k, v, a bias that requires grad, lse's own gradient
included), over odd lengths and head dims, causal in both alignments, GQA/MQA, windows,
bias/mask shapes, ALiBi, softcap and dropout (against the reference given the kernel's
own keep-mask). The Triton kernels also get: any strides without copies, bitwise
deterministic backward, pinned tile configs that move the full/masked tile boundaries,
opcheck and torch.compile with the whole option set, and their refusals.

CPU runs the Triton kernels in the interpreter (fp32 and fp16; bf16 tl.dot is broken
there); the `gpu` tests run fp16 and bf16 over the full head-dim and length sweep.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import pytest
import torch

import fastattn
from fastattn import backends, reference
from fastattn.ops import attention as attention_op
from fastattn.ops._common import draw_rng_seed
from helpers import (
    DEVICE, R, U, GRAD_FACTOR, all_residues, assert_within_naive_error, backends_of, every_residue_once,
    forward_is_reference, pin_config_on_gpu, require_module, requires_triton,
)
from triton_launches import record_launches, sparse_storage, variant_key

CONFIG_ENV = "FASTATTN_ATTENTION_CONFIG"
# The tests below run on the GPU where there is one (the Triton kernels compiled), else on
# CPU (the Triton kernels in the interpreter).
HERE_BACKENDS = backends_of(attention_op.BACKENDS, DEVICE)
# Tests of the Triton kernels: skipped where Triton is missing, failed instead under CI=true.
needs_triton = requires_triton
# On a GPU, tests that do not pin a config themselves use this one (no autotuning per case).
GPU_TEST_CONFIG = "BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1"


@pytest.fixture(autouse=True)
def _pinned_config_on_gpu(monkeypatch):
    pin_config_on_gpu(monkeypatch, CONFIG_ENV, GPU_TEST_CONFIG)


def _kernels():
    from fastattn.kernels import attention as kernels

    return kernels


def _serves(backend: str, dtype=torch.float32, head_dim=64, head_dim_v=64, softcap=0.0, dropout_p=0.0,
            return_lse=False, has_bias=False) -> bool:
    call = attention_op.AttentionCall(dtype, head_dim, head_dim_v, has_bias, softcap, dropout_p, return_lse)
    return attention_op.BACKENDS.reason(backend, call) is None


def _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v=None, device=DEVICE):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    return (torch.randn(batch, heads, seqlen_q, head_dim, device=device),
            torch.randn(batch, kv_heads, seqlen_k, head_dim, device=device),
            torch.randn(batch, kv_heads, seqlen_k, head_dim_v, device=device))


def _leaves(tensors, dtype):
    """Copies in `dtype` (floats; bool masks stay) that require grad where floating."""
    return [None if t is None else
            (t.to(dtype) if t.is_floating_point() else t).detach().requires_grad_(t.is_floating_point())
            for t in tensors]


def _finite(lse):
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _run(fn, tensors, dout, dlse, bias_grad):
    """fn(q, k, v, bias) -> (out, lse or None); returns out, lse and the gradients of
    <out, dout> + <lse, dlse> (finite part) wrt q, k, v (and bias if bias_grad); dout
    None: out is not used."""
    out, lse = fn(*tensors)
    loss = 0 if dout is None else (out * dout.to(out.dtype)).sum()
    if lse is not None and dlse is not None:
        loss = loss + (_finite(lse) * dlse).sum()
    wanted = list(tensors[:3]) + ([tensors[3]] if bias_grad else [])
    grads = torch.autograd.grad(loss, wanted, allow_unused=dout is None)  # lse does not depend on v
    return out, lse, tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads))


def check_attention(backend, q, k, v, *, attn_bias=None, dtype=torch.float32, with_lse=True,
                    dropout_mask=None, seed: Optional[int] = None, sdpa=False, lse_only_grad=False, **options):
    """One call of fastattn.attention (or scaled_dot_product_attention with sdpa=True)
    against the float64 reference, output, lse and all gradients (of lse alone, out
    unused, with lse_only_grad). With dropout, `seed`
    is given to torch.manual_seed right before our call (so that it draws the rng_seed
    `dropout_mask` was made from) and the reference uses `dropout_mask`."""
    bias_grad = attn_bias is not None and attn_bias.is_floating_point()
    with_lse = with_lse and not sdpa and _serves(backend, dtype, q.shape[-1], v.shape[-1],
                                                  options.get("softcap", 0.0), options.get("dropout_p", 0.0),
                                                  True)
    ref_options = dict(options, top_left=sdpa)
    if sdpa:
        ref_options["causal"] = ref_options.pop("is_causal", False)
        ref_options.pop("enable_gqa", None)
    if dropout_mask is not None:
        ref_options["dropout_mask"] = dropout_mask

    def reference_fn(q_, k_, v_, bias_):
        out, lse = reference.attention(q_, k_, v_, attn_bias=bias_, return_lse=True, **ref_options)
        return out, lse

    def ours(q_, k_, v_, bias_):
        if sdpa:
            with fastattn.use_backend(backend):
                return fastattn.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias_, **options), None
        result = fastattn.attention(q_, k_, v_, attn_bias=bias_, return_lse=with_lse, backend=backend,
                                    **options)
        return result if with_lse else (result, None)

    tensors = (q, k, v, attn_bias)
    dout = None if lse_only_grad else torch.randn(q.shape[:3] + (v.shape[-1],), device=q.device)
    dlse = torch.randn(q.shape[:3], device=q.device) if with_lse else None
    ref = _run(reference_fn, _leaves(tensors, torch.float64), dout, dlse, bias_grad)
    naive = _run(reference_fn, _leaves(tensors, dtype), dout, dlse, bias_grad)
    if seed is not None:
        torch.manual_seed(seed)
    got = _run(ours, _leaves(tensors, dtype), dout, dlse, bias_grad)
    assert got[0].dtype == dtype and got[0].shape == ref[0].shape
    if not forward_is_reference(backend):  # the naive forward is `naive` itself: only its backward is checked
        _check_forward(got[0], got[1] if with_lse else None, naive, ref)
    names = ("dq", "dk", "dv", "dbias")
    for name, ours_grad, naive_grad, ref_grad in zip(names, got[2], naive[2], ref[2]):
        assert torch.isfinite(ours_grad).all(), f"{name} is not finite"
        assert_within_naive_error(ours_grad, naive_grad, ref_grad, factor=GRAD_FACTOR, what=name)
    return got


def _check_forward(out, lse, naive, ref):
    """out (and lse unless None) within the naive error of the float64 reference;
    naive and ref: (out, lse, ...) of the reference in the call's dtype and in float64."""
    assert_within_naive_error(out, naive[0], ref[0], what="out")
    if lse is not None:
        assert lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[1])), "lse: -inf rows differ"
        assert_within_naive_error(_finite(lse), _finite(naive[1]), _finite(ref[1]), atol=1e-5, what="lse")


# ----------------------------------------------------------------------------- lengths, head dims, GQA

# (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, causal)
SWEEP = [
    (1, 2, 2, 1, 7, 40, 40, False),
    (1, 2, 1, 7, 1, 64, 64, True),      # seqlen_q > seqlen_k, causal: rows with no key at all
    (2, 2, 1, 97, 130, 80, 80, True),
    (1, 2, 1, 130, 97, 96, 96, False),  # MQA
    (1, 2, 2, 130, 130, 64, 64, True),
    (1, 2, 1, 33, 47, 64, 40, True),    # head_dim_v != head_dim
]
FP16_SWEEP = [SWEEP[1], SWEEP[3], SWEEP[5]]


def _sweep_cases():
    cases = []
    for backend in HERE_BACKENDS:
        for dtype, sweep in ((torch.float32, SWEEP), (torch.float16, FP16_SWEEP)):
            for shape in sweep:
                if _serves(backend, dtype, shape[5], shape[6]):
                    cases.append(pytest.param(backend, dtype, shape,
                                              id=f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, shape[:7]))}"
                                                 f"{'-causal' if shape[7] else ''}"))
    return cases


@pytest.mark.parametrize("backend,dtype,shape", _sweep_cases())
def test_lengths_head_dims_gqa_causal(backend, dtype, shape):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, causal = shape
    q, k, v = _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v)
    check_attention(backend, q, k, v, dtype=dtype, causal=causal)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [128, 192, 256])
def test_large_head_dims_and_lengths_on_cpu(head_dim):
    """The GPU sweep's larger head dims and a 257-long causal case, in the interpreter."""
    q, k, v = _inputs(1, 2, 1, 257, 257, head_dim)
    check_attention("triton", q, k, v, causal=True)


# ----------------------------------------------------------------------------- options

SMALL = (1, 4, 2, 37, 45, 32)  # batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim: 2 x 2 tiles of 32


def _option_cases():
    b, h, _, sq, sk, _ = SMALL
    return {
        "scale": dict(scale=0.3, causal=True),
        "window": dict(window_size=(5, 3)),
        "window-left": dict(window_size=(6, -1)),
        "window-right-0": dict(window_size=(2, 0)),
        "softcap": dict(softcap=2.0, causal=True),
        "alibi-heads": dict(alibi_slopes=U(h), causal=True),
        "alibi-batch-heads": dict(alibi_slopes=U(b, h)),
        "bias-full": dict(attn_bias=R(b, h, sq, sk)),
        "bias-heads": dict(attn_bias=R(1, h, sq, sk), causal=True),
        "bias-key-row": dict(attn_bias=R(b, 1, 1, sk)),
        "bias-query-col": dict(attn_bias=R(sq, 1)),
        "bias-scalar": dict(attn_bias=R(1, 1, 1, 1)),
        "bias-neg-inf": dict(attn_bias=R(sq, sk).masked_fill(U(sq, sk) > 0.7, float("-inf"))),
        "mask": dict(attn_bias=U(b, 1, sq, sk) > 0.4),
        "mask-empty-rows": dict(attn_bias=U(sq, sk) > 0.97),
        "everything": dict(attn_bias=R(1, h, sq, sk), causal=True, softcap=5.0,
                           alibi_slopes=U(h), window_size=(10, -1), scale=0.2),
    }


def _options_cases():
    cases = []
    for backend in HERE_BACKENDS:
        for name, options in _option_cases().items():
            if _serves(backend, softcap=options.get("softcap", 0.0), head_dim=SMALL[5], head_dim_v=SMALL[5]):
                cases.append(pytest.param(backend, name, id=f"{backend}-{name}"))
    return cases


@pytest.mark.parametrize("backend,name", _options_cases())
def test_options(backend, name):
    options = _option_cases()[name]
    q, k, v = _inputs(*SMALL)
    got = check_attention(backend, q, k, v, **options)
    if name == "mask-empty-rows":
        empty = ~options["attn_bias"].any(-1)  # (sq,)
        assert empty.any()
        assert (got[0][:, :, empty] == 0).all(), "a fully masked row must give 0"
        assert (got[2][0][:, :, empty] == 0).all(), "a fully masked row must give dq 0"


@pytest.mark.parametrize("backend", HERE_BACKENDS)
@pytest.mark.parametrize("seqlens", [(37, 45), (45, 37)], ids=["sq<sk", "sq>sk"])
def test_sdpa_top_left_causal_and_gqa(backend, seqlens):
    q, k, v = _inputs(1, 4, 2, seqlens[0], seqlens[1], 32)
    check_attention(backend, q, k, v, sdpa=True, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("backend", HERE_BACKENDS)
def test_sdpa_float_mask(backend):
    q, k, v = _inputs(1, 2, 2, 37, 45, 32)
    check_attention(backend, q, k, v, attn_bias=R(1, 1, 37, 45), sdpa=True)


@pytest.mark.parametrize("backend", [b for b in HERE_BACKENDS if _serves(b, return_lse=True)])
def test_gradient_through_lse_alone(backend):
    """Only lse is used, out is not: autograd hands the backward no dout (the op asks for
    unmaterialised gradients, so that a call without return_lse reads no zero dlse), and
    the gradients are lse's alone: dv is zero, dq and dk match the reference."""
    got = check_attention(backend, *_inputs(1, 2, 1, 37, 45, 64), causal=True, lse_only_grad=True)
    assert not got[2][2].any()


@pytest.mark.parametrize("backend", HERE_BACKENDS)
def test_fully_masked_rows_give_zero_and_neg_inf_lse(backend):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 9, 4, 16))
    wants_lse = _serves(backend, head_dim=16, head_dim_v=16, return_lse=True)
    result = fastattn.attention(q, k, v, causal=True, return_lse=wants_lse, backend=backend)
    out, lse = result if wants_lse else (result, None)
    masked = slice(0, 9 - 4)  # rows i < sq - sk see no key (bottom-right causal)
    assert (out[:, :, masked] == 0).all()
    if lse is not None:
        assert torch.isneginf(lse[:, :, masked]).all() and torch.isfinite(lse[:, :, 5:]).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, masked] == 0).all()


# ----------------------------------------------------------------------------- dropout


@needs_triton
def test_dropout_keep_mask_rate_and_reproducibility():
    kernels = _kernels()
    seed = torch.tensor([123456789012345, 7], dtype=torch.int64)
    p = 0.3
    keep = kernels.dropout_keep_mask(2, 2, 61, 67, p, seed, DEVICE)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(keep, kernels.dropout_keep_mask(2, 2, 61, 67, p, seed, DEVICE))
    other = kernels.dropout_keep_mask(2, 2, 61, 67, p, seed + 1, DEVICE)
    assert not torch.equal(other, keep)
    # rows, columns and heads get independent draws
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_given_the_kernels_mask(dtype):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = SMALL
    q, k, v = _inputs(*SMALL)
    p = 0.3
    torch.manual_seed(7)
    seed = draw_rng_seed(q.device)  # what fastattn.attention draws after the same manual_seed
    keep = _kernels().dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, p, seed, q.device)
    check_attention("triton", q, k, v, dtype=dtype, dropout_p=p, dropout_mask=keep, seed=7, causal=True,
                    attn_bias=R(1, heads, seqlen_q, seqlen_k), alibi_slopes=U(heads))


@needs_triton
def test_dropout_follows_torch_manual_seed():
    q, k, v = _inputs(1, 2, 2, 20, 24, 16)
    torch.manual_seed(3)
    first = fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(3)
    again = fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    different = fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(first, again)
    assert not torch.equal(first, different)
    # and at this shape, against the reference given the kernel's keep-mask
    torch.manual_seed(3)
    keep = _kernels().dropout_keep_mask(1, 2, 20, 24, 0.5, draw_rng_seed(), DEVICE)
    check_attention("triton", q, k, v, dropout_p=0.5, dropout_mask=keep, seed=3)


# ----------------------------------------------------------------------------- the Triton kernels


@needs_triton
def test_any_strides_without_copies():
    """Transposed (b, s, h, d) views, a sliced head_dim and an expanded (stride 0) output
    gradient give bitwise what contiguous inputs give; dq/dk/dv come back contiguous, as
    the registered op's fake promises (torch.compile checks it)."""
    b, h, hk, sq, sk, d = 2, 2, 1, 21, 23, 32
    q_bshd = R(b, sq, h, d)
    k_bshd = R(b, sk, hk, d)
    v_wide = R(b, hk, sk, 2 * d)
    q, k, v = q_bshd.transpose(1, 2), k_bshd.transpose(1, 2), v_wide[..., ::2]
    bias = R(b, h, sk, sq).transpose(-1, -2)
    options = dict(causal=True, attn_bias=bias, return_lse=True, backend="triton")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*leaves, **options)
    dout = R(1, 1, 1, d).expand(out.shape)  # stride-0 gradient
    grads = torch.autograd.grad(out, leaves, dout)
    contiguous = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out_c, lse_c = fastattn.attention(*contiguous, **dict(options, attn_bias=bias.contiguous()))
    grads_c = torch.autograd.grad(out_c, contiguous, dout.contiguous())
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for grad, grad_c in zip(grads, grads_c):
        assert torch.equal(grad, grad_c)
    assert all(grad.is_contiguous() for grad in grads)
    check_attention("triton", q, k, v, causal=True, attn_bias=bias)  # the strided views against the reference


@needs_triton
def test_backward_is_bitwise_deterministic():
    b, h, hk, sq, sk, d = 1, 2, 1, 37, 33, 40
    q, k, v = _inputs(b, h, hk, sq, sk, d)
    bias = R(1, h, 1, sk)

    def grads():
        torch.manual_seed(11)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        out = fastattn.attention(*leaves[:3], attn_bias=leaves[3], causal=True, dropout_p=0.2,
                                 alibi_slopes=torch.full((h,), 0.1, device=DEVICE), backend="triton")
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    first, second = grads(), grads()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)
    torch.manual_seed(11)
    keep = _kernels().dropout_keep_mask(b, h, sq, sk, 0.2, draw_rng_seed(), DEVICE)
    check_attention("triton", q, k, v, attn_bias=bias, causal=True, dropout_p=0.2, dropout_mask=keep, seed=11,
                    alibi_slopes=torch.full((h,), 0.1, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("config", ["BLOCK_M=16,BLOCK_N=16", "BLOCK_M=16,BLOCK_N=64", "BLOCK_M=64,BLOCK_N=16"])
def test_pinned_tile_configs(config, monkeypatch):
    """Other tile shapes move which tiles are skipped, full or masked (window both sides,
    bottom-right causal with seqlen_q > seqlen_k)."""
    monkeypatch.setenv(CONFIG_ENV, config)
    q, k, v = _inputs(1, 2, 1, 53, 41, 24)
    check_attention("triton", q, k, v, window_size=(9, 0), attn_bias=R(53, 1))


@needs_triton
def test_bad_pinned_config_is_refused(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 5, 5, 16)
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=24")
    with pytest.raises(ValueError, match="FASTATTN_ATTENTION_CONFIG: BLOCK_M must be a power of 2"):
        fastattn.attention(q, k, v, backend="triton")
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_Q=32")
    with pytest.raises(ValueError, match="FASTATTN_ATTENTION_CONFIG must be comma-separated"):
        fastattn.attention(q, k, v, backend="triton")


def test_autotune_space_is_pruned_per_head_dim_and_dtype():
    require_module("triton")
    from fastattn.kernels import _config

    for kind in ("fwd", "dkdv", "dq"):
        space = _config.attention_configs(kind)
        prune = _config.attention_prune(kind)
        for head_dim, dtype in ((64, torch.float16), (256, torch.bfloat16), (128, torch.float32),
                                (256, torch.float32)):
            args = dict(Q=torch.empty(0, dtype=dtype), BLOCK_D=head_dim, BLOCK_DV=head_dim,
                        seqlen_q=4096, seqlen_k=4096)
            kept = prune(space, {}, **args)
            assert 1 <= len(kept) <= len(space)
            assert all(_config.attention_keep(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                              c.num_stages, head_dim, head_dim, dtype.itemsize)
                       for c in kept)
        wide = prune(space, {}, Q=torch.empty(0, dtype=torch.float32), BLOCK_D=256, BLOCK_DV=256,
                     seqlen_q=4096, seqlen_k=4096)
        narrow = prune(space, {}, Q=torch.empty(0, dtype=torch.float16), BLOCK_D=64, BLOCK_DV=64,
                       seqlen_q=4096, seqlen_k=4096)
        assert max(len(wide), len(narrow)) <= _config.ATTENTION_MAX_TUNE_CONFIGS
        assert [str(c) for c in wide] != [str(c) for c in narrow]  # a space per dtype and head dim
        short = prune(space, {}, Q=torch.empty(0, dtype=torch.float16), BLOCK_D=64, BLOCK_DV=64,
                      seqlen_q=1, seqlen_k=4096)
        assert len(short) >= 1
    assert _config.attention_seqlen_bucket(1, 7) == 128
    assert _config.attention_seqlen_bucket(1025, 7) == 2048
    assert _config.attention_seqlen_bucket(10**6, 7) == 16384


@needs_triton
def test_opcheck_with_every_option():
    b, h, hk, sq, sk, d = 1, 4, 2, 9, 13, 16
    q, k, v = _inputs(b, h, hk, sq, sk, d)
    bias = R(1, h, sq, 1)
    slopes = U(b, h)
    seed = torch.tensor([42, 3], dtype=torch.int64, device=DEVICE)
    fwd_args = (q, k, v, bias, slopes, seed, 0.3, 4, 2, False, 3.0, 0.25, "triton")
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastattn.attention_fwd(*fwd_args)
    dout = torch.randn_like(out)
    bwd_args = (dout, torch.randn_like(lse), q, k, v, out, lse, bias, slopes, seed, 0.3, 4, 2, False, 3.0,
                0.25, True, "triton")
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, bwd_args)
    # the same call against the reference (the keep-mask of the seed fastattn.attention draws)
    torch.manual_seed(5)
    keep = _kernels().dropout_keep_mask(b, h, sq, sk, 0.25, draw_rng_seed(), DEVICE)
    check_attention("triton", q, k, v, attn_bias=bias, alibi_slopes=slopes, scale=0.3, window_size=(4, 2),
                    softcap=3.0, dropout_p=0.25, dropout_mask=keep, seed=5)


@needs_triton
def test_compile_fullgraph_forward_and_backward_with_options():
    torch._dynamo.reset()
    b, h, hk, sq, sk, d = 1, 4, 2, 21, 17, 16
    q, k, v = _inputs(b, h, hk, sq, sk, d)
    bias = R(1, h, sq, sk)
    slopes = U(h)

    def f(q_, k_, v_, bias_):
        out, lse = fastattn.attention(q_, k_, v_, attn_bias=bias_, causal=True, softcap=4.0, alibi_slopes=slopes,
                                      window_size=(7, -1), return_lse=True, backend="triton")
        return out.sum() + _finite(lse).sum()

    eager = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    compiled_in = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    expected = f(*eager)
    expected.backward()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_in)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, e in zip(compiled_in, eager):
        torch.testing.assert_close(a.grad, e.grad)
    check_attention("triton", q, k, v, attn_bias=bias, causal=True, softcap=4.0, alibi_slopes=slopes,
                    window_size=(7, -1))


@needs_triton
def test_triton_refuses_what_it_cannot_serve():
    q, k, v = _inputs(1, 2, 2, 5, 5, 264)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot serve .*head_dim up to 256, got head_dim 264"):
        fastattn.attention(q, k, v, backend="triton")
    q, k, v = _inputs(1, 2, 2, 5, 5, 64, head_dim_v=320)
    with pytest.raises(ValueError, match=r"head_dim up to 256, .* and 320 \(v\)"):
        fastattn.attention(q, k, v, backend="triton")
    q, k, v = (t.double() for t in _inputs(1, 2, 2, 5, 5, 16))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got float64"):
        fastattn.attention(q, k, v, backend="triton")
    # auto still serves what triton refuses
    assert fastattn.attention(q, k, v).dtype == torch.float64
    if backends.triton_interpreter_on():
        q, k, v = (t.bfloat16() for t in _inputs(1, 2, 2, 5, 5, 16))
        with pytest.raises(ValueError, match="interpreter .* bfloat16"):
            fastattn.attention(q, k, v, backend="triton")


@pytest.mark.parametrize("backend", HERE_BACKENDS)
@pytest.mark.parametrize("bad,error,match", [
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "same head_dim"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "k and v must agree"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, r"heads of q \(3\) must be a multiple of kv_heads"),
    (lambda q, k, v: (q[:1], k, v), ValueError, "same batch"),
], ids=["head_dim", "kv_length", "gqa", "batch"])
def test_mismatched_shapes_are_refused(backend, bad, error, match):
    q, k, v = _inputs(2, 4, 2, 5, 6, 16)
    with pytest.raises(error, match=match):
        fastattn.attention(*bad(q, k, v), backend=backend)


# ----------------------------------------------------------------------------- GPU

GPU_HEAD_DIMS = (40, 64, 80, 96, 128, 192, 256)
GPU_LENGTHS = ((1, 1), (1, 257), (7, 97), (97, 7), (257, 257), (1025, 1025), (257, 1025), (1025, 257))


def _gpu_config(head_dim):
    """A pinned config that fits every head dim (so the sweep does not autotune per case)."""
    return "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2" if head_dim > 128 else \
        "BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=2"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
@pytest.mark.parametrize("lengths", GPU_LENGTHS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_sweep(dtype, head_dim, lengths, causal, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, _gpu_config(head_dim))
    q, k, v = _inputs(2, 4, 2, lengths[0], lengths[1], head_dim, device="cuda")
    check_attention("triton", q, k, v, dtype=dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(_option_cases()))
def test_gpu_options(dtype, name, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, _gpu_config(64))
    options = {key: value.cuda() if isinstance(value, torch.Tensor) else value
               for key, value in _option_cases()[name].items()}
    q, k, v = _inputs(*SMALL, device="cuda")
    check_attention("triton", q, k, v, dtype=dtype, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_dropout_and_sdpa(dtype, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, _gpu_config(64))
    batch, heads, _, seqlen_q, seqlen_k, _ = SMALL
    q, k, v = _inputs(*SMALL, device="cuda")
    torch.manual_seed(7)
    seed = draw_rng_seed(q.device)
    keep = _kernels().dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, 0.3, seed, q.device)
    check_attention("triton", q, k, v, dtype=dtype, dropout_p=0.3, dropout_mask=keep, seed=7, causal=True)
    q, k, v = _inputs(2, 8, 2, 300, 257, 128, device="cuda")
    check_attention("triton", q, k, v, dtype=dtype, sdpa=True, is_causal=True, enable_gqa=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_autotuned_large(head_dim, causal, monkeypatch):
    """No pinned config: the autotuner picks per kernel; bf16, lengths past one bucket."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    q, k, v = _inputs(2, 16, 4, 2048, 2048, head_dim, device="cuda")
    check_attention("triton", q, k, v, dtype=torch.bfloat16, causal=causal)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, device="cuda")
    bias = torch.randn(1, 8, 1000, 1000, device="cuda")

    def grads():
        leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v, bias)]
        out = fastattn.attention(*leaves[:3], attn_bias=leaves[3], causal=True, backend="triton")
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    first, second = grads(), grads()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)
    check_attention("triton", q, k, v, dtype=torch.bfloat16, attn_bias=bias, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp32_uses_ieee_dots(head_dim, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1")
    q, k, v = _inputs(2, 4, 2, 257, 300, head_dim, device="cuda")
    check_attention("triton", q, k, v, dtype=torch.float32, causal=True)


def test_backends_listed_here_are_the_ones_that_run():
    assert set(HERE_BACKENDS) <= set(backends.CONCRETE_BACKENDS)
    assert "naive" in HERE_BACKENDS and "torch" in HERE_BACKENDS


# ----------------------------------------------------------------------------- tile edges
#
# The kernels sort each (query tile, key tile) pair into skipped, whole (run without the
# visibility mask) and masked from bounds like ⌊(m0 + seqlen_k - seqlen_q + window_right
# + 1) / BLOCK_N⌋·BLOCK_N (kernels/attention.py, _key_ranges and _query_ranges). An
# off-by-one there shows only when seqlen_k - seqlen_q + window_right falls on one residue
# modulo the tile, so these sweeps take seqlen_k - seqlen_q through every residue of pinned
# 16×16 tiles. Forward: 0 .. 2·BLOCK_N (both periods: the clamps at 0 and at seqlen_k act
# in the first), causal and window_right 3. Backward (three kernels, three times the
# forward's cost): causal, every residue once, the even ones from the first period and the
# odd ones from the second (test_varlen_attention.py sweeps a window on both sides, packed
# into one call). One head, head_dim 16, 16 queries: the tile sort depends on the offset
# only (m0 is a multiple of the tile), and every call costs interpreter time.

EDGE_BLOCK = 16
EDGE_CONFIG = f"BLOCK_M={EDGE_BLOCK},BLOCK_N={EDGE_BLOCK}"
EDGE_SEQLEN_Q = 16
EDGE_CASES = {  # name: (direction, window_size, values of seqlen_k - seqlen_q)
    "forward-causal": ("forward", (-1, 0), all_residues(EDGE_BLOCK)),
    "forward-right-3": ("forward", (-1, 3), all_residues(EDGE_BLOCK)),
    "backward-causal": ("backward", (-1, 0), every_residue_once(EDGE_BLOCK)),
}


def check_attention_forward(backend, q, k, v, **options):
    """fastattn.attention's out and lse against the float64 reference (no backward)."""
    ref = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **options)
    naive = reference.attention(q, k, v, return_lse=True, **options)
    out, lse = fastattn.attention(q, k, v, return_lse=True, backend=backend, **options)
    _check_forward(out, lse, naive, ref)


def tile_edge_failures(check, offsets, window) -> list[str]:
    """check(q, k, v, window_size=window) for each seqlen_k - seqlen_q in `offsets`; the
    offsets that fail, each with its error."""
    failures = []
    for offset in offsets:
        q, k, v = _inputs(1, 1, 1, EDGE_SEQLEN_Q, EDGE_SEQLEN_Q + offset, 16)
        try:
            check(q, k, v, window_size=window)
        except AssertionError as error:
            residue = (offset + window[1]) % EDGE_BLOCK
            failures.append(f"seqlen_k - seqlen_q = {offset} (+ window_right ≡ {residue} mod {EDGE_BLOCK}): "
                            f"{str(error).splitlines()[0]}")
    return failures


@needs_triton
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_tile_edges_every_residue(case, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, EDGE_CONFIG)
    direction, window, offsets = EDGE_CASES[case]
    if direction == "forward":
        def check(q, k, v, **options):
            check_attention_forward("triton", q, k, v, **options)
    else:
        def check(q, k, v, **options):
            check_attention("triton", q, k, v, **options)
    failures = tile_edge_failures(check, offsets, window)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- launches, offsets, dropout RNG

_KERNEL_NAMES = {
    "fwd": "_attention_fwd_kernel", "bwd_preprocess": "_attention_bwd_preprocess_kernel",
    "dkdv": "_attention_bwd_dkdv_kernel", "dq": "_attention_bwd_dq_kernel", "dbias": "_attention_bwd_dbias_kernel",
    "dropout_mask": "_attention_dropout_mask_kernel",
}


def _record_all(monkeypatch, run=True):
    """kind -> LaunchRecorder standing in for every attention kernel."""
    kernels = _kernels()
    return {kind: record_launches(monkeypatch, kernels, name, run) for kind, name in _KERNEL_NAMES.items()}


@needs_triton
def test_row_offsets_past_int32_are_computed_in_int64(tmp_path):
    """q, k, v, dout and a bias whose row stride times the row index passes 2**31 elements
    (as a (b, s, h, d) view with s·h·d >= 2**31, or a bias with seqlen_q·seqlen_k >=
    2**31, has): forward and backward give bitwise what contiguous copies give."""
    b, h, hk, sq, sk, d = 1, 2, 1, 40, 36, 16
    row = 2**26 + 16  # elements from one row to the next: rows 32 and on lie past 2**31
    storage = sparse_storage(tmp_path, max(sq, sk) * row, DEVICE)
    q = storage.as_strided((b, h, sq, d), (0, d, row, 1), 0)
    k = storage.as_strided((b, hk, sk, d), (0, d, row, 1), h * d)
    v = storage.as_strided((b, hk, sk, d), (0, d, row, 1), (h + hk) * d)
    dout = storage.as_strided((b, h, sq, d), (0, d, row, 1), (h + 2 * hk) * d)
    bias = storage.as_strided((b, 1, sq, sk), (0, 0, row, 1), (2 * h + 2 * hk) * d)
    for t in (q, k, v, dout, bias):
        t.copy_(torch.randn(t.shape))

    def run(q_, k_, v_, bias_, dout_):
        leaves = [t.detach().requires_grad_() for t in (q_, k_, v_, bias_)]
        out, lse = fastattn.attention(*leaves[:3], attn_bias=leaves[3], causal=True, return_lse=True,
                                      backend="triton")
        return (out, lse, *torch.autograd.grad(out, leaves, dout_))

    got = run(q, k, v, bias, dout)
    expected = run(*(t.contiguous() for t in (q, k, v, bias, dout)))
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, expected):
        assert torch.equal(a, e), name


@needs_triton
def test_dropout_mask_grid_stays_within_cuda_limits(monkeypatch):
    """batch·heads above 65535 (the most programs of grid axes 1 and 2) runs on axis 0."""
    kernels = _kernels()
    recorder = record_launches(monkeypatch, kernels, "_attention_dropout_mask_kernel", run=False)
    kernels.dropout_keep_mask(2, 40000, 1, 1, 0.5, torch.tensor([1, 2], device=DEVICE), DEVICE)
    (grid, _), = recorder.launches
    assert grid[0] == 80000 and grid[0] <= 2**31 - 1 and all(n <= 65535 for n in grid[1:])


@needs_triton
def test_launch_variants_do_not_depend_on_lengths_windows_causal_or_dropout_draws(monkeypatch):
    """Two calls that differ in sequence lengths (1, multiples of 16 and not), window,
    causal and the dropout draw launch every kernel with the same compile key: what
    changes per call is either do_not_specialize or read from a tensor."""
    recorders = _record_all(monkeypatch)
    keys = []
    for seqlen_q, seqlen_k, causal, window in ((32, 48, True, (16, -1)), (1, 37, False, (5, 1))):
        before = {kind: len(r.launches) for kind, r in recorders.items()}
        q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 2, seqlen_q, seqlen_k, 32))
        out = fastattn.attention(q, k, v, causal=causal, window_size=window, dropout_p=0.3, softcap=5.0,
                                 alibi_slopes=U(4), backend="triton")
        out.backward(torch.ones_like(out))
        keys.append({kind: [variant_key(r.kernel, kwargs) for _, kwargs in r.launches[before[kind]:]]
                     for kind, r in recorders.items()})
    assert all(keys[0][kind] for kind in ("fwd", "bwd_preprocess", "dkdv", "dq"))
    for kind in recorders:
        assert keys[0][kind] == keys[1][kind], kind


@needs_triton
def test_dropout_state_is_a_device_tensor_read_by_the_kernels(monkeypatch):
    """fastattn.attention draws a (2,) int64 (Philox key, counter offset) tensor on q's
    device and the kernels read it there: the same tensor gives the same output, and new
    contents (what a CUDA graph replay of the draw writes) give a new mask."""
    q, k, v = _inputs(1, 2, 1, 20, 24, 16)
    state = torch.tensor([5, 9], dtype=torch.int64, device=DEVICE)

    def forward():
        return torch.ops.fastattn.attention_fwd(q, k, v, None, None, state, 0.25, -1, -1, False, 0.0, 0.5,
                                                "triton")[0]

    first, again = forward(), forward()
    state[1] += 1
    other_offset = forward()
    state[0] += 1
    other_key = forward()
    assert torch.equal(first, again)
    assert not torch.equal(first, other_offset) and not torch.equal(other_offset, other_key)

    recorder = record_launches(monkeypatch, _kernels(), "_attention_fwd_kernel")
    fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    (_, kwargs), = recorder.launches
    assert kwargs["RngState"].shape == (2,) and kwargs["RngState"].dtype == torch.int64
    assert kwargs["RngState"].device == q.device


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11; the rounds of triton.language.philox) on
    numpy uint64 arrays holding 32-bit values; returns the four output words."""
    low = 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & low, (p0 >> 32) ^ c3 ^ k1, p0 & low
        k0, k1 = (k0 + 0x9E3779B9) & low, (k1 + 0xBB67AE85) & low
    return c0, c1, c2, c3


def _reference_keep_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, offset):
    """The documented mask: byte j % 16 (word (j % 16) // 4, low byte first) of
    Philox(key seed; counter (j // 16, i, b·heads + h, offset)) >= ceil(256·p)."""
    import numpy as np

    bh, i, j = np.ix_(np.arange(batch * heads, dtype=np.uint64), np.arange(seqlen_q, dtype=np.uint64),
                      np.arange(seqlen_k, dtype=np.uint64))
    words = _philox4x32_10(j // 16 + 0 * i, i + 0 * j, bh + 0 * i, np.uint64(offset & 0xFFFFFFFF) + 0 * i * j,
                           np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32))
    word = np.choose(((j % 16) // 4 + 0 * i * bh).astype(np.int64), words)
    keep_byte = (word >> (8 * (j % 4))) & 0xFF
    threshold = np.ceil(np.float32(dropout_p) * np.float32(256.0))
    return torch.from_numpy(keep_byte >= threshold).reshape(batch, heads, seqlen_q, seqlen_k)


@needs_triton
@pytest.mark.parametrize("config", [None, "BLOCK_M=64,BLOCK_N=16", "BLOCK_M=16,BLOCK_N=64"])
def test_dropout_mask_is_16_philox_bytes_per_call_whatever_the_tiles(config, monkeypatch):
    if config is not None:
        monkeypatch.setenv(CONFIG_ENV, config)
    seed, offset, p = 2**61 + 12345, 2**33 + 77, 0.3
    keep = _kernels().dropout_keep_mask(2, 3, 37, 70, p, torch.tensor([seed, offset], device=DEVICE), DEVICE)
    assert torch.equal(keep.cpu(), _reference_keep_mask(2, 3, 37, 70, p, seed, offset))


@needs_triton
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_overall_and_per_byte_of_a_philox_call(dropout_p):
    """Keep rate 1 - ceil(256 p)/256, overall and in each of the 16 byte lanes of a Philox
    call (keys j mod 16), within 5 binomial standard deviations of its sample size."""
    keep = _kernels().dropout_keep_mask(2, 4, 64, 256, dropout_p, torch.tensor([12345, 678], device=DEVICE), DEVICE)
    expected = 1 - math.ceil(256 * dropout_p) / 256
    spread = math.sqrt(expected * (1 - expected))
    rate = keep.double().mean().item()
    assert abs(rate - expected) <= 5 * spread / math.sqrt(keep.numel())
    lanes = keep.reshape(-1, 16).double().mean(0)
    assert (lanes - expected).abs().max().item() <= 5 * spread / math.sqrt(keep.numel() / 16)


@needs_triton
@pytest.mark.parametrize("config", ["BLOCK_M=16,BLOCK_N=64", "BLOCK_M=64,BLOCK_N=16"])
def test_dropout_forward_and_backward_use_the_mask_of_the_helper_with_other_tiles(config, monkeypatch):
    """The transposed dK/dV tiles and the dQ tiles replay the forward's mask whatever the
    tile shapes: every gradient matches the reference given the helper's mask."""
    monkeypatch.setenv(CONFIG_ENV, config)
    q, k, v = _inputs(1, 2, 1, 45, 37, 24)
    torch.manual_seed(5)
    seed = draw_rng_seed(q.device)
    keep = _kernels().dropout_keep_mask(1, 2, 45, 37, 0.4, seed, q.device)
    check_attention("triton", q, k, v, dropout_p=0.4, dropout_mask=keep, seed=5, attn_bias=R(1, 2, 45, 37))


@needs_triton
@pytest.mark.parametrize("arch", [80, 86, 90])
def test_launches_take_the_default_table_config(arch, monkeypatch):
    """Outside the interpreter, with nothing pinned and no FASTATTN_AUTOTUNE, every
    kernel launches with its entry of the default table for the GPU's arch (the
    interpreter is switched off for the launcher only: nothing runs)."""
    from fastattn.kernels import _config

    monkeypatch.setattr(_config, "interpreted", lambda: False)
    monkeypatch.setenv("FASTATTN_TRITON_ARCH", str(arch))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv("FASTATTN_AUTOTUNE", raising=False)
    recorders = _record_all(monkeypatch, run=False)
    kernels = _kernels()
    q, k, v = (t.half() for t in _inputs(1, 4, 2, 37, 45, 80))
    bias = R(1, 4, 37, 45).half()
    state = torch.tensor([1, 2], device=DEVICE)
    out, lse = kernels.attention_forward(q, k, v, bias, None, state, 0.1, -1, 0, False, 5.0, 0.2)
    kernels.attention_backward(out, None, q, k, v, out, lse, bias, None, state, 0.1, -1, 0, False, 5.0, 0.2, True)
    kernels.dropout_keep_mask(1, 4, 37, 45, 0.2, state, DEVICE)
    for kind, recorder in recorders.items():
        (_, kwargs), = recorder.launches
        expected = _config.attention_default_config(arch, kind, None if kind == "dropout_mask" else torch.float16,
                                                    80, True, bias_and_dropout=True)  # a bias and p = 0.2
        assert {key: kwargs[key] for key in expected} == expected, kind
        if kind == "dkdv" and arch >= 90:  # the entry that keeps bias + dropout from spilling
            assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"]) == (16, 32)
        if kind in ("fwd", "dkdv", "dq", "dbias"):
            assert kwargs["FAST_TANH"], "16-bit softcap on a GPU takes tanh.approx.f32"


def test_default_table_covers_every_key_and_autotuning_is_opt_in(monkeypatch):
    """Every (arch, kernel, dtype, head-dim bucket, causal) key has one config with tiles
    that are powers of 2 >= 16 (that they compile without spills within the arch's shared
    memory is the ahead-of-time compile check's job); with FASTATTN_AUTOTUNE=1 the tuned
    kernels autotune over at most 8 configs, the default first, while a pinned config
    still wins and the other kernels never autotune."""
    pytest.importorskip("triton")
    from fastattn.kernels import _config

    for arch, kind, dtype, head_dim, causal in itertools.product(
            (80, 86, 89, 90), _config.ATTENTION_KINDS, (torch.float16, torch.bfloat16, torch.float32),
            (16, 40, 64, 96, 128, 192, 256), (False, True)):
        config = _config.attention_default_config(arch, kind, dtype, head_dim, causal)
        assert all(config[key] >= 16 and config[key] & (config[key] - 1) == 0
                   for key in ("BLOCK_M", "BLOCK_N") if key in config)
        if kind in _config.ATTENTION_TUNED_KINDS:
            block_d = max(16, 1 << (head_dim - 1).bit_length())
            tuned = _config.attention_autotune_configs(arch, kind, dtype, block_d, block_d, causal, 4096, 4096)
            assert 1 <= len(tuned) <= _config.ATTENTION_MAX_TUNE_CONFIGS
            assert {**tuned[0].kwargs, "num_warps": tuned[0].num_warps, "num_stages": tuned[0].num_stages} == config
    monkeypatch.setattr(_config, "interpreted", lambda: False)
    monkeypatch.setenv("FASTATTN_TRITON_ARCH", "90")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "1")
    assert _config.attention_launch_config("fwd", DEVICE, torch.float16, 128) is None
    assert _config.attention_launch_config("dbias", DEVICE, torch.float16, 128) == \
        _config.attention_default_config(90, "dbias", torch.float16, 128)
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_N=16")
    assert _config.attention_launch_config("dq", DEVICE, torch.float16, 128) == \
        dict(_config.attention_default_config(90, "dq", torch.float16, 128), BLOCK_N=16)
    assert "BLOCK_N" not in _config.attention_launch_config("bwd_preprocess", DEVICE, torch.float16, 128)


@needs_triton
def test_softcap_takes_tanh_approx_only_for_16_bit_on_a_gpu(monkeypatch):
    """fp32 keeps the fp32-exact tanh everywhere; 16-bit inputs too in the interpreter."""
    recorder = record_launches(monkeypatch, _kernels(), "_attention_fwd_kernel")
    q, k, v = _inputs(1, 2, 1, 9, 9, 16)
    fastattn.attention(q, k, v, softcap=3.0, backend="triton")
    fastattn.attention(q.half(), k.half(), v.half(), softcap=3.0, backend="triton")
    assert [kwargs["FAST_TANH"] for _, kwargs in recorder.launches] == [False, not backends.triton_interpreter_on()]
