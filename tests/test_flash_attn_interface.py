"""fastattn's flash-attn 2.x API (fastattn.flash_attn_func, flash_attn_varlen_func,
flash_attn_with_kvcache and the packed variants) against flash-attn's documented
semantics, written out below in float64 independently of fastattn: (batch, seqlen,
heads, headdim) layouts, bottom-right causal and windows with seqlen_q != seqlen_k,
softcap, ALiBi, GQA, softmax_lse, the KV cache (appended in place, cache_seqlens before
the append, cache_seqlens < seqlen_q, paged, cache_batch_idx, rotary). Also: the ops
receive views (data_ptr and strides), gradients, bad input named.

Most cases run in float64 (the naive and torch backends take it), so a mismatch is a
semantics error, not rounding; a few run on the Triton backend in fp32 against the
naive same-precision error (helpers.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn import flash_attn_interface as fai
from fastattn.ops import attention as attention_op
from fastattn.ops import decode_attention as decode_op
from helpers import ATOL, DEVICE, assert_within_naive_error, backends_of

HAS_TRITON = "triton" in backends_of(attention_op.BACKENDS, DEVICE)
F64 = dict(dtype=torch.float64, device=DEVICE)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


# ----------------------------------------------------------------------------- reference


def reference_one(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, slopes=None):
    """flash-attn's documented forward for ONE sequence, float64.

    q (seqlen_q, nheads, d), k/v (seqlen_k, nheads_k, d). Query i sits at key position
    i + seqlen_k - seqlen_q; it sees key j iff pos - left <= j <= pos + right (right = 0
    when causal, -1 = unbounded); scores softcap·tanh(scale·q·k/softcap) - slope·|pos - j|.
    Returns out (seqlen_q, nheads, dv) (0 for a query that sees nothing) and lse
    (nheads, seqlen_q) (-inf there)."""
    q, k, v = q.double(), k.double(), v.double()
    seqlen_q, heads, dim = q.shape
    seqlen_k, kv_heads, _ = k.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # q head h reads kv head h // (heads / kv_heads)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(seqlen_q, device=q.device)[:, None] + seqlen_k - seqlen_q  # (sq, 1)
    j = torch.arange(seqlen_k, device=q.device)[None, :]  # (1, sk)
    if slopes is not None:
        scores = scores - slopes.double()[:, None, None] * (pos - j).abs()
    left, right = window[0], 0 if causal else window[1]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if right >= 0:
        keep &= j <= pos + right
    if left >= 0:
        keep &= j >= pos - left
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (h, sq)
    probs = torch.where(keep, torch.exp(scores - lse[..., None]), torch.zeros((), dtype=scores.dtype,
                                                                                 device=q.device))
    return torch.einsum("hij,jhd->ihd", probs, v), lse


def reference_batch(q, k, v, **options):
    """reference_one per sequence of (batch, seqlen, heads, d) tensors; slopes may be (b, h)."""
    slopes = options.pop("slopes", None)
    outs, lses = [], []
    for b in range(q.shape[0]):
        s = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        out, lse = reference_one(q[b], k[b], v[b], slopes=s, **options)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def close(ours, expected, dtype=torch.float64):
    torch.testing.assert_close(ours.double(), expected.double(), atol=ATOL[dtype] * 100, rtol=1e-7)


# ----------------------------------------------------------------------------- flash_attn_func

DENSE_CASES = [
    # batch, seqlen_q, seqlen_k, heads, kv_heads, d, causal, window, softcap, alibi
    (2, 7, 7, 4, 4, 16, False, (-1, -1), 0.0, False),
    (2, 5, 11, 4, 2, 16, True, (-1, -1), 0.0, False),   # seqlen_q < seqlen_k: bottom-right
    (1, 9, 4, 3, 1, 8, True, (-1, -1), 0.0, False),     # seqlen_q > seqlen_k: first rows see nothing
    (2, 6, 13, 4, 2, 24, False, (3, 2), 0.0, False),    # sliding window both sides
    (2, 13, 6, 2, 2, 16, True, (2, -1), 30.0, True),    # causal + left window, softcap, ALiBi (heads,)
    (3, 8, 8, 4, 1, 32, False, (-1, 1), 5.0, "batch"),  # right window only, ALiBi (batch, heads)
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_func_forward_and_lse(case):
    batch, sq, sk, h, hk, d, causal, window, softcap, alibi = case
    q, k, v = rand(batch, sq, h, d), rand(batch, sk, hk, d), rand(batch, sk, hk, d + 3)
    slopes = None
    if alibi:
        slopes = torch.rand((batch, h) if alibi == "batch" else (h,), **F64)
    out, lse, probs = fastattn.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                               softcap=softcap, alibi_slopes=slopes, return_attn_probs=True)
    expected_out, expected_lse = reference_batch(q, k, v, scale=0.3, causal=causal, window=window,
                                                 softcap=softcap, slopes=slopes)
    assert out.shape == (batch, sq, h, d + 3) and lse.shape == (batch, h, sq) and probs is None
    close(out, expected_out)
    close(lse, expected_lse)
    if causal and sq > sk:  # the rows that see no key: 0 out (flash-attn's rule), lse -inf
        assert torch.all(out[:, : sq - sk] == 0) and torch.all(lse[..., : sq - sk] == float("-inf"))
    plain = fastattn.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                     softcap=softcap, alibi_slopes=slopes)
    close(plain, expected_out)


def test_flash_attn_func_defaults_and_gradients():
    """Default scale 1/sqrt(headdim), not causal; dq, dk, dv of the float64 reference."""
    q, k, v = (t.requires_grad_() for t in (rand(2, 6, 4, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)))
    out = fastattn.flash_attn_func(q, k, v, causal=True)
    expected, _ = reference_batch(q, k, v, causal=True)
    close(out, expected)
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), dout)
    theirs = torch.autograd.grad(expected, (q, k, v), dout)
    for name, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
    unscaled = fastattn.flash_attn_func(q, k, v)
    close(unscaled, reference_batch(q, k, v)[0])


def test_flash_attn_func_passes_views_to_the_op(monkeypatch):
    """q, k, v reach fastattn.attention as transposed views of the caller's memory, and
    out is a view of the op's result: nothing is copied."""
    seen = {}
    real = fai.attention

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v, kwargs=kwargs)
        seen["result"] = real(q, k, v, **kwargs)
        return seen["result"]

    monkeypatch.setattr(fai, "attention", spy)
    q, k, v = rand(2, 5, 4, 8), rand(2, 7, 2, 8), rand(2, 7, 2, 8)
    out = fastattn.flash_attn_func(q, k, v, dropout_p=0.0, causal=True)
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert seen[name].data_ptr() == t.data_ptr() and seen[name].stride() == t.transpose(1, 2).stride(), name
    assert seen["kwargs"]["causal"] is True and seen["kwargs"]["scale"] is None
    assert out.data_ptr() == seen["result"].data_ptr() and out.shape == (2, 5, 4, 8)


def test_packed_variants_equal_the_unpacked_call_and_share_gradients():
    qkv = rand(2, 6, 3, 4, 8).requires_grad_()
    out = fastattn.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(2, 0))
    q, k, v = qkv.unbind(2)
    close(out, reference_batch(q, k, v, causal=True, window=(2, 0))[0])
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    assert grad.shape == qkv.shape and grad.abs().sum() > 0
    q = rand(2, 5, 4, 8)
    kv = rand(2, 7, 2, 2, 8)
    out, lse, _ = fastattn.flash_attn_kvpacked_func(q, kv, softcap=3.0, return_attn_probs=True)
    expected, expected_lse = reference_batch(q, kv[:, :, 0], kv[:, :, 1], softcap=3.0)
    close(out, expected)
    close(lse, expected_lse)


def test_flash_attn_func_dropout_is_reproducible_and_unbiased():
    """Dropout follows torch's generator (not flash-attn's Philox stream): the same seed
    gives the same output; the expectation is the dropout-free output."""
    q, k, v = rand(1, 4, 2, 8), rand(1, 6, 2, 8), rand(1, 6, 2, 8)
    torch.manual_seed(3)
    a = fastattn.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = fastattn.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, fastattn.flash_attn_func(q, k, v))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed or TRITON_INTERPRET is off")
def test_flash_attn_func_on_triton():
    q, k, v = (torch.randn(2, s, h, 16, device=DEVICE) for s, h in ((19, 4), (23, 2), (23, 2)))
    options = dict(causal=True, window_size=(9, 0), softcap=20.0)
    out, lse, _ = fastattn.flash_attn_func(q, k, v, return_attn_probs=True, backend="triton", **options)
    naive_out, naive_lse, _ = fastattn.flash_attn_func(q, k, v, return_attn_probs=True, backend="naive", **options)
    expected, expected_lse = reference_batch(q, k, v, causal=True, window=(9, 0), softcap=20.0)
    assert_within_naive_error(out, naive_out, expected)
    assert_within_naive_error(lse, naive_lse, expected_lse, what="lse")


# ----------------------------------------------------------------------------- varlen


def _packed(lengths, heads, dim, dtype=torch.float64):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    return torch.randn(sum(lengths), heads, dim, dtype=dtype, device=DEVICE), cu


@pytest.mark.parametrize("causal,window,softcap,alibi", [(True, (-1, -1), 0.0, False), (False, (2, 3), 4.0, True)])
def test_flash_attn_varlen_func(causal, window, softcap, alibi):
    lengths_q, lengths_k = [5, 1, 9, 3], [8, 4, 3, 3]  # seqlen_q < seqlen_k, > , and ==
    q, cu_q = _packed(lengths_q, 4, 8)
    k, cu_k = _packed(lengths_k, 2, 8)
    v = rand(k.shape[0], 2, 8)
    slopes = torch.rand(4, 4, **F64) if alibi else None
    out, lse, probs = fastattn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), softmax_scale=0.5, causal=causal, window_size=window,
        softcap=softcap, alibi_slopes=slopes, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and probs is None
    for b in range(4):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        expected, expected_lse = reference_one(q[rows_q], k[rows_k], v[rows_k], scale=0.5, causal=causal,
                                               window=window, softcap=softcap,
                                               slopes=None if slopes is None else slopes[b])
        close(out[rows_q], expected)
        close(lse[:, rows_q], expected_lse)


def test_flash_attn_varlen_passes_the_tensors_through(monkeypatch):
    """varlen_attention takes flash-attn's packed layout: the very tensors go through."""
    seen = {}
    real = fai.varlen_attention

    def spy(*args, **kwargs):
        seen["args"] = args
        seen["result"] = real(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(fai, "varlen_attention", spy)
    q, cu = _packed([3, 4], 4, 8)
    k, v = rand(7, 2, 8), rand(7, 2, 8)
    out = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)
    assert all(a is b for a, b in zip(seen["args"], (q, k, v, cu, cu, 4, 4)))
    assert out is seen["result"]


def test_flash_attn_varlen_packed_and_paged():
    lengths = [6, 2, 9]
    qkv, cu = _packed(lengths, 3 * 4, 8)
    qkv = qkv.reshape(-1, 3, 4, 8)
    out = fastattn.flash_attn_varlen_qkvpacked_func(qkv, cu, 9, causal=True)
    for b in range(3):
        rows = slice(cu[b], cu[b + 1])
        close(out[rows], reference_one(qkv[rows, 0], qkv[rows, 1], qkv[rows, 2], causal=True)[0])
    q, cu_q = _packed([3, 1, 4], 4, 8)
    kv, cu_k = _packed(lengths, 2 * 2, 8)
    kv = kv.reshape(-1, 2, 2, 8)
    out = fastattn.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 4, 9, causal=True)
    unpacked = fastattn.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_q, cu_k, 4, 9, causal=True)
    close(out, unpacked)
    # The same keys in a paged k/v: blocks of 4 positions in shuffled order, plus spares.
    page, blocks_per_seq = 4, 3
    table = torch.randperm(3 * blocks_per_seq + 2, device=DEVICE)[: 3 * blocks_per_seq].reshape(3, -1).int()
    k_paged, v_paged = rand(3 * blocks_per_seq + 2, page, 2, 8), rand(3 * blocks_per_seq + 2, page, 2, 8)
    for b, length in enumerate(lengths):
        for p in range(length):
            k_paged[table[b, p // page], p % page] = kv[cu_k[b] + p, 0]
            v_paged[table[b, p // page], p % page] = kv[cu_k[b] + p, 1]
    paged = fastattn.flash_attn_varlen_func(q, k_paged, v_paged, cu_q, cu_k, 4, 9, causal=True, block_table=table)
    close(paged, unpacked)


# ----------------------------------------------------------------------------- KV cache


def _kvcache_reference(q, k_cache, v_cache, seqlens, k_new=None, v_new=None, batch_idx=None, **options):
    """flash_attn_with_kvcache's documented result, computed from copies of the caches
    BEFORE the call: sequence b's keys are cache row batch_idx[b] up to seqlens[b], then
    the new k; the queries align to the end of those keys."""
    outs, lses = [], []
    slopes = options.pop("slopes", None)
    for b in range(q.shape[0]):
        row = b if batch_idx is None else int(batch_idx[b])
        length = int(seqlens[b])
        keys, values = k_cache[row, :length], v_cache[row, :length]
        if k_new is not None:
            keys, values = torch.cat((keys, k_new[b])), torch.cat((values, v_new[b]))
        s = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        out, lse = reference_one(q[b], keys, values, slopes=s, **options)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _spy_paths(monkeypatch):
    """Records which op each flash_attn_with_kvcache call reached."""
    calls = []
    real_decode, real_attention = fai.decode_attention, fai.attention

    def decode_spy(q, k_cache, v_cache, *args, **kwargs):
        calls.append(("decode", q, k_cache, v_cache, kwargs))
        return real_decode(q, k_cache, v_cache, *args, **kwargs)

    def attention_spy(q, k, v, **kwargs):
        calls.append(("attention", q, k, v, kwargs))
        return real_attention(q, k, v, **kwargs)

    monkeypatch.setattr(fai, "decode_attention", decode_spy)
    monkeypatch.setattr(fai, "attention", attention_spy)
    return calls


KVCACHE_CASES = [
    # seqlen_q, seqlen_new, cache_seqlens, causal, window, softcap, alibi, path
    (1, 1, [3, 0, 7], False, (-1, -1), 0.0, False, "decode"),   # one token: causal does not matter
    (3, 3, [4, 9, 2], True, (-1, -1), 0.0, False, "decode"),    # speculative decoding: causal among new
    (4, 0, [6, 2, 9], True, (-1, -1), 0.0, False, "attention"),  # cache_seqlens < seqlen_q: empty rows
    (3, 3, [4, 9, 2], False, (-1, -1), 0.0, False, "attention"),  # non-causal new tokens see each other
    (2, 2, [5, 1, 8], True, (3, -1), 10.0, True, "decode"),      # window, softcap, ALiBi
    (2, 4, [5, 1, 4], False, (2, 1), 0.0, "batch", "attention"),  # seqlen_new != seqlen_q, both windows
    (20, 20, [0, 3, 1], True, (-1, -1), 0.0, False, "attention"),  # a prefill longer than the decode path
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", KVCACHE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_with_kvcache(monkeypatch, case, paged):
    sq, new, lengths, causal, window, softcap, alibi, path = case
    batch, h, hk, d, capacity, page = 3, 4, 2, 8, 24, 8
    q = rand(batch, sq, h, d)
    k_cache, v_cache = rand(batch, capacity, hk, d), rand(batch, capacity, hk, d)
    k_new, v_new = (rand(batch, new, hk, d), rand(batch, new, hk, d)) if new else (None, None)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    slopes = torch.rand((batch, h) if alibi == "batch" else (h,), **F64) if alibi else None
    expected_out, expected_lse = _kvcache_reference(q, k_cache.clone(), v_cache.clone(), seqlens, k_new, v_new,
                                                    scale=0.4, causal=causal, window=window, softcap=softcap,
                                                    slopes=slopes)
    expected_k = k_cache.clone()
    for b in range(batch):
        if new:
            expected_k[b, lengths[b] : lengths[b] + new] = k_new[b]
    table = None
    if paged:  # the same cache in pages of `page` positions, in shuffled order
        num_blocks = batch * capacity // page + 2
        table = torch.randperm(num_blocks, device=DEVICE)[: batch * capacity // page].reshape(batch, -1).int()
        k_blocks, v_blocks = rand(num_blocks, page, hk, d), rand(num_blocks, page, hk, d)
        k_blocks[table.long()] = k_cache.reshape(batch, -1, page, hk, d)
        v_blocks[table.long()] = v_cache.reshape(batch, -1, page, hk, d)
        k_cache, v_cache = k_blocks, v_blocks
    calls = _spy_paths(monkeypatch)
    out, lse = fastattn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table, softmax_scale=0.4,
        causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_softmax_lse=True)
    assert [c[0] for c in calls] == [path]
    close(out, expected_out)
    close(lse, expected_lse)
    if sq > min(lengths) + new and causal:
        b = lengths.index(min(lengths))
        empty = sq - lengths[b] - new
        assert torch.all(out[b, :empty] == 0) and torch.all(lse[b, :, :empty] == float("-inf"))
    written = k_cache if not paged else k_cache[table.long()].reshape(batch, capacity, hk, d)
    torch.testing.assert_close(written, expected_k, atol=0, rtol=0)


def test_kvcache_decode_path_uses_views_of_the_caches(monkeypatch):
    """The caches, q and the new k/v reach decode_attention as transposed views; the
    append happens in place (same storage), and out is a view of the op's result."""
    calls = _spy_paths(monkeypatch)
    q, k_cache, v_cache = rand(2, 1, 4, 8), rand(2, 16, 2, 8), rand(2, 16, 2, 8)
    k, v = rand(2, 1, 2, 8), rand(2, 1, 2, 8)
    pointers = (k_cache.data_ptr(), v_cache.data_ptr())
    out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5)
    (kind, q_arg, k_arg, v_arg, kwargs), = calls
    assert kind == "decode"
    assert q_arg.data_ptr() == q.data_ptr() and q_arg.stride() == q.transpose(1, 2).stride()
    for arg, cache in ((k_arg, k_cache), (v_arg, v_cache)):
        assert arg.data_ptr() == cache.data_ptr() and arg.stride() == cache.transpose(1, 2).stride()
    assert kwargs["k_new"].data_ptr() == k.data_ptr() and kwargs["k_new"].stride() == k.transpose(1, 2).stride()
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == pointers
    assert torch.equal(k_cache[:, 5], k[:, 0]) and torch.equal(v_cache[:, 5], v[:, 0])
    assert out.shape == (2, 1, 4, 8) and out.transpose(1, 2).is_contiguous()  # a view of the op's out


def test_kvcache_seqlens_int_none_and_cache_batch_idx():
    q, k_cache, v_cache = rand(2, 2, 2, 8), rand(4, 10, 2, 8), rand(4, 10, 2, 8)
    # int cache_seqlens = the same length for every sequence; a cache longer than the batch.
    out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True)
    close(out, _kvcache_reference(q, k_cache, v_cache, [6, 6], causal=True)[0])
    # None = the whole cache.
    out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache)
    close(out, _kvcache_reference(q, k_cache, v_cache, [10, 10])[0])
    # cache_batch_idx: sequence b uses cache row idx[b]; the new k/v are written there.
    idx = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    k, v = rand(2, 2, 2, 8), rand(2, 2, 2, 8)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    for causal in (True, False):  # the decode path, then the masked-attention path
        k_cache.copy_(before_k)
        v_cache.copy_(before_v)
        out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor(
            [4, 7], dtype=torch.int32, device=DEVICE), cache_batch_idx=idx, causal=causal)
        close(out, _kvcache_reference(q, before_k, before_v, [4, 7], k, v, batch_idx=idx, causal=causal)[0])
        assert torch.equal(k_cache[3, 4:6], k[0]) and torch.equal(v_cache[1, 7:9], v[1])
        assert torch.equal(k_cache[0], before_k[0]) and torch.equal(k_cache[2], before_k[2])


def reference_rotary(x, angles, positions, interleaved):
    """Rotate x (b, s, h, d) by angles[positions] (angles (seqlen_ro, rotary_dim/2)) as
    complex numbers: pair n is (x[2n], x[2n+1]) when interleaved, else (x[n], x[n + half])."""
    half = angles.shape[1]
    x = x.double()
    turn = torch.polar(torch.ones_like(angles), angles)[positions][:, :, None, :]  # (b, s, 1, half)
    if interleaved:
        pairs = torch.view_as_complex(x[..., : 2 * half].reshape(*x.shape[:-1], half, 2).contiguous())
        turned = torch.view_as_real(pairs * turn).flatten(-2)
    else:
        turned_c = torch.complex(x[..., :half], x[..., half : 2 * half]) * turn
        turned = torch.cat((turned_c.real, turned_c.imag), dim=-1)
    return torch.cat((turned, x[..., 2 * half :]), dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(interleaved, causal):
    """k is rotated at cache_seqlens + t and written so; q at cache_seqlens + t when
    causal or windowed, else every query at cache_seqlens (flash-attn's rule)."""
    batch, sq, h, hk, d, rotary_dim, capacity = 2, 3, 4, 2, 12, 8, 16
    q, k, v = rand(batch, sq, h, d), rand(batch, sq, hk, d), rand(batch, sq, hk, d)
    k_cache, v_cache = rand(batch, capacity, hk, d), rand(batch, capacity, hk, d)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    lengths = [2, 9]
    freqs = 1.0 / 100 ** (torch.arange(rotary_dim // 2, **F64) / (rotary_dim // 2))
    angles = torch.arange(capacity, **F64)[:, None] * freqs  # (seqlen_ro, rotary_dim / 2)
    out = fastattn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=DEVICE), causal=causal,
        rotary_interleaved=interleaved)
    start = torch.tensor(lengths, device=DEVICE)[:, None]
    steps = torch.arange(sq, device=DEVICE)
    k_rot = reference_rotary(k, angles, start + steps, interleaved)
    q_rot = reference_rotary(q, angles, start + (steps if causal else 0 * steps), interleaved)
    for b in range(batch):
        close(k_cache[b, lengths[b] : lengths[b] + sq], k_rot[b])
        close(k_cache[b, : lengths[b]], before_k[b, : lengths[b]])
    close(out, _kvcache_reference(q_rot, before_k, before_v, lengths, k_rot, v, causal=causal)[0])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed or TRITON_INTERPRET is off")
@pytest.mark.parametrize("causal", [True, False], ids=["decode-path", "attention-path"])
def test_kvcache_on_triton(causal):
    batch, sq, h, hk, d, page = 2, 2, 4, 2, 16, 8
    q = torch.randn(batch, sq, h, d, device=DEVICE)
    k_blocks, v_blocks = torch.randn(7, page, hk, d, device=DEVICE), torch.randn(7, page, hk, d, device=DEVICE)
    table = torch.tensor([[4, 0, 6], [2, 5, 1]], dtype=torch.int32, device=DEVICE)
    k, v = torch.randn(batch, sq, hk, d, device=DEVICE), torch.randn(batch, sq, hk, d, device=DEVICE)
    seqlens = torch.tensor([11, 3], dtype=torch.int32, device=DEVICE)
    dense_k = k_blocks[table.long()].reshape(batch, -1, hk, d)
    dense_v = v_blocks[table.long()].reshape(batch, -1, hk, d)
    expected, _ = _kvcache_reference(q, dense_k, dense_v, seqlens, k, v, causal=causal)
    naive = fastattn.flash_attn_with_kvcache(q, k_blocks.clone(), v_blocks.clone(), k, v, cache_seqlens=seqlens,
                                             block_table=table, causal=causal, backend="naive")
    out = fastattn.flash_attn_with_kvcache(q, k_blocks, v_blocks, k, v, cache_seqlens=seqlens, block_table=table,
                                           causal=causal, backend="triton")
    assert_within_naive_error(out, naive, expected)
    assert torch.equal(k_blocks[0, 3:5], k[0]) and torch.equal(v_blocks[2, 3:5], v[1])


# ----------------------------------------------------------------------------- bad input


def _dense():
    return rand(2, 5, 4, 8), rand(2, 7, 2, 8), rand(2, 7, 2, 8)


def _cache():
    return rand(2, 1, 4, 8), rand(2, 16, 2, 8), rand(2, 16, 2, 8)


BAD_DENSE = [
    (lambda q, k, v: dict(q=q.transpose(1, 2)[:, :, :3]), ValueError, "nheads of q"),
    (lambda q, k, v: dict(q=q[0]), ValueError, "q must be 4-D"),
    (lambda q, k, v: dict(k=k.float()), TypeError, "k has dtype float32"),
    (lambda q, k, v: dict(k=k[..., :4]), ValueError, "headdim"),
    (lambda q, k, v: dict(v=v[:, :3]), ValueError, "k and v must agree"),
    (lambda q, k, v: dict(k=k[:1], v=v[:1]), ValueError, "same batch"),
    (lambda q, k, v: dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda q, k, v: dict(causal=1), TypeError, "causal"),
    (lambda q, k, v: dict(window_size=(-2, 0)), ValueError, "window_size"),
    (lambda q, k, v: dict(softcap=-1.0), ValueError, "softcap"),
    (lambda q, k, v: dict(dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q, k, v: dict(alibi_slopes=torch.ones(3, **F64)), ValueError, "alibi_slopes"),
    (lambda q, k, v: dict(deterministic="yes"), TypeError, "deterministic"),
    (lambda q, k, v: dict(return_attn_probs=None), TypeError, "return_attn_probs"),
]


@pytest.mark.parametrize("change,error,match", BAD_DENSE, ids=[c[2] for c in BAD_DENSE])
def test_flash_attn_func_bad_input(change, error, match):
    q, k, v = _dense()
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(change(q, k, v))
    with pytest.raises(error, match=match):
        fastattn.flash_attn_func(**kwargs)


def test_varlen_and_packed_bad_input():
    q, cu = _packed([3, 4], 4, 8)
    k, v = rand(7, 2, 8), rand(7, 2, 8)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 3, 4)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        fastattn.flash_attn_varlen_func(q, k, v, cu, cu.long(), 4, 4)
    with pytest.raises(ValueError, match="qkv must have shape"):
        fastattn.flash_attn_qkvpacked_func(rand(2, 5, 2, 4, 8))
    with pytest.raises(ValueError, match="kv must be 4-D"):
        fastattn.flash_attn_varlen_kvpacked_func(q, rand(7, 2, 2, 2, 8), cu, cu, 4, 4)
    with pytest.raises(ValueError, match="block_table entries"):
        fastattn.flash_attn_varlen_func(q, rand(3, 4, 2, 8), rand(3, 4, 2, 8), cu, cu, 4, 4,
                                        block_table=torch.tensor([[0], [5]], dtype=torch.int32, device=DEVICE))


def _int32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


BAD_CACHE = [
    (dict(k_cache=lambda c: c[:, :, :, :4]), ValueError, "headdim"),
    (dict(k_cache=lambda c: c[:1], v_cache=lambda c: c[:1]), ValueError, "cache_batch_idx"),
    (dict(k=rand(2, 1, 2, 8)), ValueError, "k and v must be given together"),
    (dict(k=rand(2, 1, 3, 8), v=rand(2, 1, 3, 8), cache_seqlens=1), ValueError, "k must have shape"),
    (dict(k=rand(2, 1, 2, 8), v=rand(2, 1, 2, 8)), ValueError, "cache_seqlens is required"),
    (dict(cache_seqlens=_int32(1, 2).long()), TypeError, "cache_seqlens must have dtype int32"),
    (dict(cache_seqlens=2.0), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=17), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=-1), ValueError, "cache_seqlens must be >= 0"),
    (dict(k=rand(2, 2, 2, 8), v=rand(2, 2, 2, 8), cache_seqlens=15), ValueError, "seqlen_new 2"),
    (dict(cache_leftpad=_int32(0, 0)), ValueError, "cache_leftpad is not supported"),
    (dict(cache_batch_idx=_int32(0, 2)), ValueError, "cache_batch_idx entries"),
    (dict(cache_batch_idx=_int32(0)), ValueError, "cache_batch_idx must have shape"),
    (dict(block_table=_int32(0, 1)), ValueError, "block_table must be 2-D"),
    (dict(block_table=_int32(0, 1).reshape(2, 1), cache_batch_idx=_int32(0, 1)), ValueError,
     "cannot be combined"),
    (dict(rotary_cos=torch.ones(16, 4, **F64)), ValueError, "rotary_cos and rotary_sin"),
    (dict(rotary_cos=torch.ones(16, 4, **F64), rotary_sin=torch.ones(16, 4, **F64)), ValueError, "pass k and v"),
    (dict(k=rand(2, 1, 2, 8), v=rand(2, 1, 2, 8), cache_seqlens=3, rotary_cos=torch.ones(16, 5, **F64),
          rotary_sin=torch.ones(16, 5, **F64)), ValueError, "rotary_dim"),
    (dict(k=rand(2, 1, 2, 8), v=rand(2, 1, 2, 8), cache_seqlens=3, rotary_cos=torch.ones(3, 4, **F64),
          rotary_sin=torch.ones(3, 4, **F64)), ValueError, "seqlen_ro"),
    (dict(rotary_interleaved=0), TypeError, "rotary_interleaved"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(return_softmax_lse=1), TypeError, "return_softmax_lse"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
]


@pytest.mark.parametrize("change,error,match", BAD_CACHE, ids=[c[2] for c in BAD_CACHE])
def test_flash_attn_with_kvcache_bad_input(change, error, match):
    q, k_cache, v_cache = _cache()
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache)
    for name, value in change.items():
        kwargs[name] = value(kwargs[name]) if callable(value) else value
    before = k_cache.clone()
    with pytest.raises(error, match=match):
        fastattn.flash_attn_with_kvcache(**kwargs)
    assert torch.equal(k_cache, before)  # refused before anything was written


# ----------------------------------------------------------------------------- paged caches: entries, host reads


@pytest.mark.parametrize("backend", backends_of(decode_op.BACKENDS, DEVICE))
@pytest.mark.parametrize("entry", [9, -1], ids=["past-the-end", "negative"])
def test_kvcache_paged_entries_in_use_are_checked_without_new_kv(backend, entry):
    """A paged cache read with no new k/v (the decode path): a block_table entry in use
    outside 0..num_blocks - 1 is refused before any op runs (9 of 4 blocks would index
    past k_cache, -1 would wrap to the last block)."""
    q = torch.randn(2, 1, 4, 8, device=DEVICE)
    k_cache, v_cache = torch.randn(4, 4, 2, 8, device=DEVICE), torch.randn(4, 4, 2, 8, device=DEVICE)
    seqlens = _int32(3, 6)  # sequence 0 uses one block of 4 positions, sequence 1 two
    with pytest.raises(ValueError, match=rf"block_table entries in use must index blocks 0\.\.3 of k_cache, got "
                                         rf"block_table\[1, 1\] = {entry}"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                         block_table=_int32(0, 1, 2, entry).reshape(2, 2), backend=backend)


UNUSED_ENTRY_CASES = [pytest.param(entry, backend, id=f"{name}-{backend}")
                      for entry, name in ((9, "past-the-end"), (-1, "negative"))
                      for backend in backends_of(decode_op.BACKENDS, DEVICE)]


@pytest.mark.parametrize("entry,backend", UNUSED_ENTRY_CASES)
def test_kvcache_paged_entries_past_the_length_may_hold_anything(entry, backend):
    """A block_table entry past a sequence's length is not in use (flash-attn never reads
    it): any value there is accepted and changes nothing."""
    q = torch.randn(2, 1, 4, 8, device=DEVICE)
    k_cache, v_cache = torch.randn(4, 4, 2, 8, device=DEVICE), torch.randn(4, 4, 2, 8, device=DEVICE)
    out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=_int32(3, 6),
                                           block_table=_int32(3, entry, 0, 2).reshape(2, 2), backend=backend)
    dense_k = torch.stack((torch.cat((k_cache[3], k_cache[3])), torch.cat((k_cache[0], k_cache[2]))))
    dense_v = torch.stack((torch.cat((v_cache[3], v_cache[3])), torch.cat((v_cache[0], v_cache[2]))))
    close(out, _kvcache_reference(q, dense_k, dense_v, [3, 6])[0], dtype=torch.float32)


def test_varlen_paged_checks_cu_seqlens_k_before_reading_it():
    """cu_seqlens_k on another device (here meta, which cannot be read) is refused by
    name before the paged path reads it to the host."""
    q, cu = _packed([3, 4], 4, 8)
    with pytest.raises(ValueError, match="cu_seqlens_k is on meta"):
        fastattn.flash_attn_varlen_func(q, rand(4, 4, 2, 8), rand(4, 4, 2, 8), cu, cu.to("meta"), 4, 4,
                                        block_table=_int32(0, 1, 2, 3).reshape(2, 2))


class _CountedReads(torch.Tensor):
    """A tensor that records each read of its values (or of a tensor made from it) to
    the host."""

    reads: list = []
    READS = (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__index__,
             torch.Tensor.__bool__, torch.Tensor.__float__)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            cls.reads.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_varlen_paged_reads_cu_seqlens_k_once(monkeypatch):
    """The paged path reads cu_seqlens_k to the host once (one tolist) and gathers
    sequence b's position p from row p % page_block_size of block block_table[b, p //
    page_block_size]."""
    seen = {}

    def stub(q, k, v, *args, **kwargs):
        seen.update(k=k, v=v)
        return q

    monkeypatch.setattr(fai, "varlen_attention", stub)
    monkeypatch.setattr(_CountedReads, "reads", [])
    lengths, page = [5, 0, 3], 2
    q, cu = _packed([1, 1, 1], 4, 8)
    k, v = rand(6, page, 2, 8), rand(6, page, 2, 8)
    table = _int32(4, 0, 2, -1, 7, 9, 5, 1, 3).reshape(3, 3)  # unused entries: -1, 7, 9 (past 5 blocks)
    cu_k = torch.tensor([0, 5, 5, 8], dtype=torch.int32, device=DEVICE).as_subclass(_CountedReads)
    fastattn.flash_attn_varlen_func(q, k, v, cu, cu_k, 1, 5, block_table=table)
    assert _CountedReads.reads == ["tolist"]
    rows = [(int(table[b, p // page]), p % page) for b, n in enumerate(lengths) for p in range(n)]
    for name, paged in (("k", k), ("v", v)):
        expected = torch.stack([paged[block, row] for block, row in rows])
        assert torch.equal(seen[name].as_subclass(torch.Tensor), expected), name


def _varlen_paged_call(**change):
    q, cu = _packed([3, 4], 4, 8)
    kwargs = dict(q=q, k=rand(4, 4, 2, 8), v=rand(4, 4, 2, 8), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                  max_seqlen_k=4, block_table=_int32(0, 1, 2, 3).reshape(2, 2))
    kwargs.update(change)
    return fastattn.flash_attn_varlen_func(**kwargs)


def _kvcache_paged_call(**change):
    q, k_cache, v_cache = _cache()  # k_cache, v_cache: 2 blocks of 16 positions
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=_int32(3, 4),
                  block_table=_int32(1, 0).reshape(2, 1))
    kwargs.update(change)
    before = kwargs["k_cache"].clone(), kwargs["v_cache"].clone()
    try:
        return fastattn.flash_attn_with_kvcache(**kwargs)
    finally:  # refused before anything was written
        assert torch.equal(kwargs["k_cache"], before[0]) and torch.equal(kwargs["v_cache"], before[1])


PAGED_REFUSALS = [
    (_varlen_paged_call, lambda: dict(block_table=_int32(0, 1).reshape(1, 2)),
     r"block_table must have shape \(batch, max_num_blocks_per_seq\) with batch 2 .* got \(1, 2\)"),
    (_varlen_paged_call, lambda: dict(k=rand(4, 2, 2, 8), v=rand(4, 2, 2, 8), block_table=_int32(0, 1).reshape(2, 1)),
     r"the longest sequence of cu_seqlens_k \(4\) exceeds block_table's 1 blocks × page_block_size 2"),
    (_varlen_paged_call, lambda: dict(cu_seqlens_k=_int32()), r"cu_seqlens_k must have batch \+ 1 >= 1 entries"),
    (_varlen_paged_call, lambda: dict(cu_seqlens_k=_int32(1, 3, 7)), r"cu_seqlens_k\[0\] must be 0, got 1"),
    (_varlen_paged_call, lambda: dict(cu_seqlens_k=_int32(0, 4, 3)), r"cu_seqlens_k must be non-decreasing"),
    (_varlen_paged_call, lambda: dict(block_table=_int32(0, 1, 7, 3).reshape(2, 2)),
     r"block_table entries in use must index blocks 0\.\.3 of k, got block_table\[1, 0\] = 7"),
    (_varlen_paged_call, lambda: dict(k=rand(4, 0, 2, 8), v=rand(4, 0, 2, 8)),
     r"k must have page_block_size .* > 0, got shape \(4, 0, 2, 8\)"),
    (_kvcache_paged_call, lambda: dict(block_table=_int32(0, 1).reshape(1, 2)),
     r"block_table must have shape \(batch, max_num_blocks_per_seq\) with batch 2, got \(1, 2\)"),
    (_kvcache_paged_call, lambda: dict(block_table=_int32(1, 5).reshape(2, 1)),
     r"block_table entries in use must index blocks 0\.\.1 of k_cache, got block_table\[1, 0\] = 5"),
    (_kvcache_paged_call, lambda: dict(k=rand(2, 1, 2, 8), v=rand(2, 1, 2, 8), block_table=_int32(-1, 0).reshape(2, 1)),
     r"block_table entries in use must index blocks 0\.\.1 of k_cache, got block_table\[0, 0\] = -1"),
    (_kvcache_paged_call, lambda: dict(k_cache=rand(2, 0, 2, 8), v_cache=rand(2, 0, 2, 8), cache_seqlens=0),
     r"k_cache must have page_block_size .* > 0 with a block_table, got shape \(2, 0, 2, 8\)"),
    (_kvcache_paged_call, lambda: dict(k=rand(2, 1, 2, 8), v=rand(2, 1, 2, 8), rotary_cos=torch.ones(16, 4, **F64),
                                       rotary_sin=torch.ones(16, 3, **F64)),
     r"rotary_cos and rotary_sin must have one shape \(seqlen_ro, rotary_dim / 2\); got \(16, 4\) and \(16, 3\)"),
    (_kvcache_paged_call, lambda: dict(k=rand(2, 1, 2, 8), v=rand(2, 1, 2, 8), window_size=(-2, 0)),
     r"window_size sides must be -1"),
]


@pytest.mark.parametrize("call,change,match", PAGED_REFUSALS, ids=[f"{i}-{c[0].__name__[1:-5]}"
                                                                  for i, c in enumerate(PAGED_REFUSALS)])
def test_paged_refusals(call, change, match):
    with pytest.raises(ValueError, match=match):
        call(**change())


VARLEN_OP_REFUSALS = [  # checked by varlen_attention alone, under flash-attn's argument names
    (lambda q, k, v: dict(q=q[None]), ValueError, r"q must be 3-D"),
    (lambda q, k, v: dict(k=k[..., :4]), ValueError, r"q and k must have the same head_dim"),
    (lambda q, k, v: dict(v=v[:5]), ValueError, r"k and v must agree"),
    (lambda q, k, v: dict(q=q[:, :3]), ValueError, r"heads of q \(3\) must be a multiple of kv_heads of k/v \(2\)"),
    (lambda q, k, v: dict(v=v.float()), TypeError, r"v has dtype float32 but q has float64"),
    (lambda q, k, v: dict(causal=1), TypeError, r"causal must be a bool"),
    (lambda q, k, v: dict(window_size=(0, -3)), ValueError, r"window_size sides"),
    (lambda q, k, v: dict(softcap=-1.0), ValueError, r"softcap must be >= 0"),
]


@pytest.mark.parametrize("change,error,match", VARLEN_OP_REFUSALS, ids=[c[2][:20] for c in VARLEN_OP_REFUSALS])
def test_flash_attn_varlen_bad_input_named_by_the_op(change, error, match):
    q, cu = _packed([3, 4], 4, 8)
    kwargs = dict(q=q, k=rand(7, 2, 8), v=rand(7, 2, 8), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                  max_seqlen_k=4)
    kwargs.update(change(kwargs["q"], kwargs["k"], kwargs["v"]))
    with pytest.raises(error, match=match):
        fastattn.flash_attn_varlen_func(**kwargs)


@pytest.mark.parametrize("change,error,match", [
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(k_cache=rand(2, 16, 2, 8).float(), v_cache=rand(2, 16, 2, 8).float()), TypeError,
     "k_cache has dtype float32 but q has float64"),
], ids=["causal", "softcap", "dtype"])
def test_kvcache_options_checked_before_the_append(change, error, match):
    """flash_attn_with_kvcache uses causal and window_size and appends the new k, v
    before any op checks them: it checks them itself, before anything is written."""
    q, k_cache, v_cache = _cache()
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=rand(2, 2, 2, 8), v=rand(2, 2, 2, 8), cache_seqlens=3)
    kwargs.update(change)
    before = kwargs["k_cache"].clone()
    with pytest.raises(error, match=match):
        fastattn.flash_attn_with_kvcache(**kwargs)
    assert torch.equal(kwargs["k_cache"], before)
