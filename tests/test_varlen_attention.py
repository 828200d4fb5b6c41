"""fastattn.varlen_attention on the Triton backend (the dense kernels in packed mode).

Each call is checked against the float64 reference (FlashAttention's rule, helpers.py):
output, lse and the gradients of q, k, v (lse's own gradient included), over ragged
batches with empty sequences (no queries, no keys, neither), more queries than keys,
odd head dims, GQA 1:1, 2:1, 4:1, and every option (causal and windows bottom-right per
sequence, softcap, ALiBi per head or per sequence, scale, dropout against the reference
given the kernel's own keep-mask). Also: a sequence of the packed batch gives bitwise
what the dense kernel gives it alone, any strides without copies, pinned tile configs,
opcheck, torch.compile, and the Triton path's refusals. Bad input shared by every
backend is in test_api.py.

The tests run on the GPU where there is one (the kernels compiled, a pinned config unless
a test autotunes), else on CPU in the interpreter (fp32 and fp16; bf16 tl.dot is broken
there); the `gpu` tests add fp16/bf16 over long sequences with the autotuned kernels.
"""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops._common import draw_rng_seed
from helpers import (
    DEVICE, R, U, FACTOR, GRAD_FACTOR, all_residues, assert_within_naive_error, every_residue_once, pin_config_on_gpu,
    requires_triton,
)
from triton_launches import sparse_storage

CONFIG_ENV = "FASTATTN_ATTENTION_CONFIG"
# Every test here runs the Triton kernels: skipped where Triton is missing, failed under CI=true.
pytestmark = requires_triton
# On a GPU, tests that do not pin a config themselves use this one (no autotuning per case).
GPU_TEST_CONFIG = "BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1"


@pytest.fixture(autouse=True)
def _pinned_config_on_gpu(monkeypatch):
    pin_config_on_gpu(monkeypatch, CONFIG_ENV, GPU_TEST_CONFIG)


def _kernels():
    from fastattn.kernels import attention as kernels

    return kernels


def _cu(lengths, device=DEVICE):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v=None, device=DEVICE):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    return (torch.randn(sum(lengths_q), heads, head_dim, device=device),
            torch.randn(sum(lengths_k), kv_heads, head_dim, device=device),
            torch.randn(sum(lengths_k), kv_heads, head_dim_v, device=device))


def _finite(lse):
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _reference(q, k, v, lengths_q, lengths_k, keep: Optional[torch.Tensor], **options):
    """reference.varlen_attention (out, lse); with `keep` (batch, heads, max_sq, max_sk),
    sequence i drops by keep[i] cropped to its lengths (what the kernels draw)."""
    if keep is None:
        return reference.varlen_attention(q, k, v, _cu(lengths_q, q.device), _cu(lengths_k, q.device),
                                          return_lse=True, **options)
    slopes = options.pop("alibi_slopes", None)
    starts_q, starts_k = _cu(lengths_q).tolist(), _cu(lengths_k).tolist()
    outs, lses = [], []
    for i, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        rows_q, rows_k = slice(starts_q[i], starts_q[i] + sq), slice(starts_k[i], starts_k[i] + sk)
        slopes_i = slopes[i] if slopes is not None and slopes.dim() == 2 else slopes
        out_i, lse_i = reference.attention(
            q[rows_q].transpose(0, 1)[None], k[rows_k].transpose(0, 1)[None], v[rows_k].transpose(0, 1)[None],
            alibi_slopes=slopes_i, dropout_mask=keep[i : i + 1, :, :sq, :sk], return_lse=True, **options)
        outs.append(out_i[0].transpose(0, 1))  # (sq, h, dv)
        lses.append(lse_i[0])  # (h, sq)
    return torch.cat(outs), torch.cat(lses, dim=1)


def check_varlen(lengths_q, lengths_k, heads, kv_heads, head_dim, *, head_dim_v=None, dtype=torch.float32,
                 keep=None, seed=None, **options):
    """One fastattn.varlen_attention(backend='triton') call against the float64
    reference: out, lse and the gradients of <out, dout> + <lse, dlse> (finite part).
    With dropout, torch.manual_seed(seed) runs right before our call (so that it draws
    the rng_seed `keep` was made from). Returns (out, lse, dq, dk, dv)."""
    q, k, v = _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    dout = R(q.shape[0], heads, v.shape[-1])
    dlse = R(heads, q.shape[0])
    slopes = options.pop("alibi_slopes", None)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, dict(options, alibi_slopes=slopes))
        loss = (out * dout.to(out.dtype)).sum() + (_finite(lse) * dlse).sum()
        return (out, lse, *torch.autograd.grad(loss, leaves))

    def reference_fn(q_, k_, v_, opts):
        return _reference(q_, k_, v_, lengths_q, lengths_k, keep, **opts)

    def ours(q_, k_, v_, opts):
        if seed is not None:
            torch.manual_seed(seed)
        return fastattn.varlen_attention(q_, k_, v_, cu_q, cu_k, max(lengths_q, default=0),
                                         max(lengths_k, default=0), return_lse=True, backend="triton", **opts)

    ref, naive, got = run(reference_fn, torch.float64), run(reference_fn, dtype), run(ours, dtype)
    assert got[0].dtype == dtype and got[0].shape == ref[0].shape
    assert_within_naive_error(got[0], naive[0], ref[0], what="out")
    assert got[1].dtype == torch.float32 and got[1].shape == ref[1].shape
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1])), "lse: -inf rows differ"
    assert_within_naive_error(_finite(got[1]), _finite(naive[1]), _finite(ref[1]), atol=1e-5, what="lse")
    for name, ours_grad, naive_grad, ref_grad in zip(("dq", "dk", "dv"), got[2:], naive[2:], ref[2:]):
        assert torch.isfinite(ours_grad).all(), f"{name} is not finite"
        assert_within_naive_error(ours_grad, naive_grad, ref_grad, factor=GRAD_FACTOR, what=name)
    return got


# ----------------------------------------------------------------------------- ragged batches

# (lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v, causal)
RAGGED = {
    # no queries, no keys, neither; sq > sk (bottom-right causal: rows that see no key)
    "empty-seqs-causal-gqa2": ([5, 0, 30, 3, 0], [9, 4, 25, 0, 0], 2, 1, 24, 24, True),
    "mha-dv-differs": ([1, 40, 7], [6, 35, 7], 2, 2, 40, 16, False),
    "gqa4-single-rows": ([1, 1, 2], [1, 50, 3], 4, 1, 32, 32, True),
}


@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_batches(name):
    lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v, causal = RAGGED[name]
    got = check_varlen(lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v=head_dim_v, causal=causal)
    if name.startswith("empty-seqs"):
        no_keys = slice(sum(lengths_q[:3]), sum(lengths_q[:4]))  # sequence 3 has queries but no keys
        assert (got[0][no_keys] == 0).all() and torch.isneginf(got[1][:, no_keys]).all()
        assert (got[2][no_keys] == 0).all()


def test_fp16():
    check_varlen([3, 0, 30], [7, 2, 26], 4, 2, 32, dtype=torch.float16, causal=True)


# ----------------------------------------------------------------------------- options

LENGTHS = ([6, 0, 33], [11, 5, 30])


def _option_cases():
    return {
        "window": dict(window_size=(5, 3)),
        "window-left-causal-scale": dict(window_size=(8, -1), causal=True, scale=0.3),
        "softcap-alibi-per-sequence": dict(softcap=2.0, alibi_slopes=U(3, 2), causal=True),
        "alibi-heads-window-right": dict(alibi_slopes=U(2), window_size=(-1, 4)),
    }


@pytest.mark.parametrize("name", list(_option_cases()))
def test_options(name):
    check_varlen(*LENGTHS, 2, 1, 16, **_option_cases()[name])


def test_dropout_matches_reference_given_the_kernels_mask():
    """The kernels draw the keep-mask of sequence i at its own positions with head index
    i·heads + h: the dense mask of (batch, heads, max_sq, max_sk) cropped per sequence."""
    lengths_q, lengths_k = LENGTHS
    heads, p = 2, 0.3
    torch.manual_seed(7)
    seed = draw_rng_seed(DEVICE)  # what varlen_attention draws after the same manual_seed
    keep = _kernels().dropout_keep_mask(len(lengths_q), heads, max(lengths_q), max(lengths_k), p, seed,
                                        DEVICE)
    check_varlen(lengths_q, lengths_k, heads, 1, 16, dropout_p=p, keep=keep, seed=7, causal=True,
                 alibi_slopes=U(heads))


# ----------------------------------------------------------------------------- the kernels


def test_a_packed_sequence_equals_the_dense_kernel_alone():
    """Same kernels, same tiles relative to the sequence start: bitwise equal."""
    lengths_q, lengths_k = [4, 37, 0], [9, 30, 3]
    q, k, v = _packed(lengths_q, lengths_k, 2, 1, 24)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    options = dict(causal=True, window_size=(12, -1), softcap=3.0)
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 37, 30, return_lse=True, backend="triton", **options)
    for i in (0, 1):
        rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        dense_out, dense_lse = fastattn.attention(
            q[rows_q].transpose(0, 1)[None], k[rows_k].transpose(0, 1)[None], v[rows_k].transpose(0, 1)[None],
            return_lse=True, backend="triton", **options)
        assert torch.equal(out[rows_q], dense_out[0].transpose(0, 1))
        assert torch.equal(lse[:, rows_q], dense_lse[0])
    check_varlen(lengths_q, lengths_k, 2, 1, 24, **options)


def test_any_strides_without_copies():
    """q, k, v sliced out of one packed (total, 3, heads, d) qkv tensor and a stride-0
    output gradient give bitwise what contiguous tensors give."""
    lengths = [7, 0, 26]
    cu = _cu(lengths)
    qkv = R(sum(lengths), 3, 2, 16)
    leaves = [qkv[:, i].detach().requires_grad_() for i in range(3)]  # (total, heads, d) views
    out, lse = fastattn.varlen_attention(*leaves, cu, cu, 26, 26, causal=True, return_lse=True, backend="triton")
    dout = R(1, 1, 16).expand(out.shape)
    grads = torch.autograd.grad(out, leaves, dout)
    contiguous = [t.detach().contiguous().requires_grad_() for t in leaves]
    out_c, lse_c = fastattn.varlen_attention(*contiguous, cu, cu, 26, 26, causal=True, return_lse=True,
                                             backend="triton")
    grads_c = torch.autograd.grad(out_c, contiguous, dout.contiguous())
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for grad, grad_c in zip(grads, grads_c):
        assert torch.equal(grad, grad_c)
    check_varlen(lengths, lengths, 2, 2, 16, causal=True)


def test_strided_cu_seqlens_read_like_contiguous_ones():
    """cu_seqlens views with a stride give what contiguous ones give (the kernels read
    entry b at offset b, so the op hands them contiguous tensors; a strided view used to
    be read past its end)."""
    lengths = [7, 0, 26]
    cu = _cu(lengths)
    spread = torch.stack([cu, torch.full_like(cu, 1000)], 1).reshape(-1)[::2]  # stride 2
    assert spread.stride() == (2,) and torch.equal(spread, cu)
    q, k, v = _packed(lengths, lengths, 2, 1, 16)
    expected = fastattn.varlen_attention(q, k, v, cu, cu, 26, 26, causal=True, backend="triton")
    got = fastattn.varlen_attention(q, k, v, spread, spread, 26, 26, causal=True, backend="triton")
    assert torch.equal(got, expected)


def test_pinned_tile_config(monkeypatch):
    """16 x 16 tiles: several tiles per sequence, full and masked ones, windows both sides."""
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=16,BLOCK_N=16")
    check_varlen([3, 40], [21, 35], 2, 1, 16, window_size=(9, 2))


def test_no_keys_at_all_and_no_queries_at_all():
    q, k, v = (t.requires_grad_() for t in _packed([3, 4], [0, 0], 2, 1, 16))
    out, lse = fastattn.varlen_attention(q, k, v, _cu([3, 4]), _cu([0, 0]), 4, 0, return_lse=True,
                                         backend="triton")
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape
    q, k, v = (t.requires_grad_() for t in _packed([0, 0], [5, 2], 2, 1, 16))
    out = fastattn.varlen_attention(q, k, v, _cu([0, 0]), _cu([5, 2]), 0, 5, backend="triton")
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    assert (k.grad == 0).all() and (v.grad == 0).all()


def test_opcheck_with_every_option():
    lengths_q, lengths_k = [0, 9], [2, 7]
    q, k, v = _packed(lengths_q, lengths_k, 1, 1, 16)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    slopes, seed = U(2, 1), torch.tensor([42, 3], dtype=torch.int64, device=DEVICE)
    options = (0.3, 4, 2, 3.0, 0.25, "triton")  # scale, window_left, window_right, softcap, dropout_p, backend
    fwd_args = (q, k, v, cu_q, cu_k, 9, 7, slopes, seed, *options)
    torch.library.opcheck(torch.ops.fastattn.varlen_attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastattn.varlen_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, cu_q, cu_k, 9, 7, slopes, seed,
                *options)
    torch.library.opcheck(torch.ops.fastattn.varlen_attention_bwd.default, bwd_args)
    # the same call against the reference (the keep-mask of the seed varlen_attention draws)
    torch.manual_seed(5)
    keep = _kernels().dropout_keep_mask(2, 1, 9, 7, 0.25, draw_rng_seed(), DEVICE)
    check_varlen(lengths_q, lengths_k, 1, 1, 16, scale=0.3, window_size=(4, 2), softcap=3.0, dropout_p=0.25,
                 alibi_slopes=slopes, keep=keep, seed=5)


def test_compile_fullgraph_forward_and_backward_with_options():
    torch._dynamo.reset()
    lengths_q, lengths_k = [0, 12], [2, 10]
    q, k, v = _packed(lengths_q, lengths_k, 1, 1, 16)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    slopes = U(1)

    def f(q_, k_, v_):
        out, lse = fastattn.varlen_attention(q_, k_, v_, cu_q, cu_k, 12, 10, causal=True, softcap=4.0,
                                             alibi_slopes=slopes, window_size=(7, -1), return_lse=True,
                                             backend="triton")
        return out.sum() + _finite(lse).sum()

    eager = [t.detach().requires_grad_() for t in (q, k, v)]
    compiled_in = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = f(*eager)
    expected.backward()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_in)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, e in zip(compiled_in, eager):
        torch.testing.assert_close(a.grad, e.grad)
    check_varlen(lengths_q, lengths_k, 1, 1, 16, causal=True, softcap=4.0, alibi_slopes=slopes, window_size=(7, -1))


def test_triton_refuses_what_it_cannot_serve():
    q, k, v = _packed([3], [4], 2, 1, 264)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot serve .*head_dim up to 256, got head_dim 264"):
        fastattn.varlen_attention(q, k, v, _cu([3]), _cu([4]), 3, 4, backend="triton")
    q, k, v = (t.double() for t in _packed([3], [4], 2, 1, 16))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got float64"):
        fastattn.varlen_attention(q, k, v, _cu([3]), _cu([4]), 3, 4, backend="triton")
    assert fastattn.varlen_attention(q, k, v, _cu([3]), _cu([4]), 3, 4).dtype == torch.float64  # auto serves it


# ----------------------------------------------------------------------------- GPU


def _gpu_check(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, **options):
    """check_varlen's comparison on CUDA tensors."""
    device = "cuda"
    q, k, v = _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, device=device)
    cu_q, cu_k = _cu(lengths_q, device), _cu(lengths_k, device)
    dout = torch.randn(q.shape[0], heads, head_dim, device=device)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))

    ref = run(lambda *t: reference.varlen_attention(*t, cu_q, cu_k, **options), torch.float64)
    naive = run(lambda *t: reference.varlen_attention(*t, cu_q, cu_k, **options), dtype)
    got = run(lambda *t: fastattn.varlen_attention(*t, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                   backend="triton", **options), dtype)
    for name, ours, naive_value, ref_value in zip(("out", "dq", "dk", "dv"), got, naive, ref):
        assert_within_naive_error(ours, naive_value, ref_value, factor=FACTOR if name == "out" else GRAD_FACTOR,
                                  what=name)


GPU_LENGTHS = {
    "ragged": ([1, 1000, 0, 257, 64, 3000], [1, 1000, 5, 300, 0, 3000]),
    "long": ([4096, 2048], [4096, 2048]),
    "decode-like": ([1] * 16, list(range(100, 1700, 100))),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("lengths", list(GPU_LENGTHS))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_autotuned(dtype, lengths, head_dim, causal, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    _gpu_check(*GPU_LENGTHS[lengths], 8, 2, head_dim, dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_options(dtype):
    lengths_q, lengths_k = [300, 0, 129], [257, 40, 500]
    _gpu_check(lengths_q, lengths_k, 8, 1, 96, dtype, window_size=(64, 16), softcap=20.0,
               alibi_slopes=torch.rand(3, 8, device="cuda"))


# ----------------------------------------------------------------------------- tile edges

# test_attention.py's tile-edge sweep in packed form: one sequence per value of
# seqlen_k - seqlen_q (16 queries each, pinned 16×16 tiles), so that one call takes the
# per-sequence tile bounds through every residue modulo the tile, forward and backward.
EDGE_BLOCK = 16
EDGE_CASES = {  # name: (window_size, values of seqlen_k - seqlen_q)
    "causal": ((-1, 0), all_residues(EDGE_BLOCK)),
    "left-30-right-3": ((30, 3), every_residue_once(EDGE_BLOCK)),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_tile_edges_every_residue(case, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, f"BLOCK_M={EDGE_BLOCK},BLOCK_N={EDGE_BLOCK}")
    window, offsets = EDGE_CASES[case]
    check_varlen([16] * len(offsets), [16 + offset for offset in offsets], 1, 1, 16, window_size=window)


# ----------------------------------------------------------------------------- offsets, host syncs


def test_row_offsets_past_int32_are_computed_in_int64(tmp_path):
    """Packed q, k, v, dout whose row stride times the row index inside a sequence passes
    2**31 elements (long packed sequences): forward and backward give bitwise what
    contiguous copies give."""
    lengths_q, lengths_k, h, hk, d = [40, 3], [36, 5], 2, 1, 16
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    row = 2**26 + 16  # elements from one row to the next: rows 32 and on lie past 2**31
    storage = sparse_storage(tmp_path, max(total_q, total_k) * row, DEVICE)
    q = storage.as_strided((total_q, h, d), (row, d, 1), 0)
    k = storage.as_strided((total_k, hk, d), (row, d, 1), h * d)
    v = storage.as_strided((total_k, hk, d), (row, d, 1), (h + hk) * d)
    dout = storage.as_strided((total_q, h, d), (row, d, 1), (h + 2 * hk) * d)
    for t in (q, k, v, dout):
        t.copy_(torch.randn(t.shape))
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)

    def run(q_, k_, v_, dout_):
        leaves = [t.detach().requires_grad_() for t in (q_, k_, v_)]
        out, lse = fastattn.varlen_attention(*leaves, cu_q, cu_k, 40, 36, causal=True, return_lse=True,
                                             backend="triton")
        return (out, lse, *torch.autograd.grad(out, leaves, dout_))

    got = run(q, k, v, dout)
    expected = run(*(t.contiguous() for t in (q, k, v, dout)))
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert torch.equal(a, e), name


@pytest.fixture
def no_host_reads(monkeypatch):
    """Tensor.item, tolist, __int__, __bool__, __float__ and __index__ raise: any read of a
    tensor's data back to the host (a device sync on a GPU) fails the test."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_triton_path_reads_nothing_back_from_the_device(no_host_reads):
    """The registered varlen ops on the Triton backend, forward and backward through
    autograd with dropout, softcap, ALiBi and a window, never read a tensor back."""
    lengths_q, lengths_k = [5, 0, 21], [9, 4, 17]
    q, k, v = (t.requires_grad_() for t in _packed(lengths_q, lengths_k, 2, 1, 16))
    state = torch.zeros(2, dtype=torch.int64, device=DEVICE)  # a dropout draw: (Philox key, counter offset)
    out, lse = torch.ops.fastattn.varlen_attention_fwd(q, k, v, _cu(lengths_q), _cu(lengths_k), 21, 17, U(2),
                                                       state, 0.3, 6, 0, 4.0, 0.2, "triton")
    (out.sum() + _finite(lse).sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.gpu
def test_gpu_varlen_attention_reads_nothing_back_unless_debugging(no_host_reads, monkeypatch):
    """fastattn.varlen_attention on CUDA tensors reads nothing back, forward and backward
    (the values of cu_seqlens go unchecked); with FASTATTN_DEBUG=1 it checks them."""
    lengths_q, lengths_k = [5, 0, 21], [9, 4, 17]
    q, k, v = (t.requires_grad_() for t in _packed(lengths_q, lengths_k, 2, 1, 64, device="cuda"))
    out = fastattn.varlen_attention(q, k, v, _cu(lengths_q, "cuda"), _cu(lengths_k, "cuda"), 21, 17, causal=True,
                                    dropout_p=0.1, backend="triton")
    out.backward(torch.ones_like(out))
    monkeypatch.undo()
    monkeypatch.setenv("FASTATTN_DEBUG", "1")
    with pytest.raises(ValueError, match="non-decreasing"):
        fastattn.varlen_attention(q, k, v, torch.tensor([0, 9, 5, 26], dtype=torch.int32, device="cuda"),
                                  _cu(lengths_k, "cuda"), 21, 17, backend="triton")
