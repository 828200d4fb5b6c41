"""The naive reference ops against PyTorch's built-ins, in float64.

reference.py is the oracle of every other test, so it is checked here against
independent implementations: F.scaled_dot_product_attention (masks, is_causal,
enable_gqa), F.layer_norm, F.rms_norm, nn.Linear, and explicit formulas.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastattn import reference

F64 = torch.float64


def qkv(batch=2, heads=4, kv_heads=4, seqlen_q=9, seqlen_k=13, head_dim=16, dtype=F64):
    q = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype)
    return q, k, v


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 13), (13, 9), (1, 7), (16, 16)])
def test_attention_plain_and_top_left_causal_match_sdpa(seqlen_q, seqlen_k):
    q, k, v = qkv(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    close(reference.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    close(
        reference.attention(q, k, v, causal=True, top_left=True),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 12), (12, 5), (8, 8)])
def test_attention_bottom_right_causal_matches_explicit_mask(seqlen_q, seqlen_k):
    q, k, v = qkv(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    mask = j <= i + seqlen_k - seqlen_q
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = torch.nan_to_num(expected)  # rows with no visible key: 0 by our contract
    out = reference.attention(q, k, v, causal=True)
    close(out, expected)
    if seqlen_q > seqlen_k:
        assert out[:, :, : seqlen_q - seqlen_k].abs().max() == 0


def test_attention_gqa_matches_sdpa_enable_gqa():
    q, k, v = qkv(heads=8, kv_heads=2)
    close(reference.attention(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    q, k, v = qkv(heads=6, kv_heads=1)  # MQA
    close(reference.attention(q, k, v, causal=True, top_left=True),
          F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("shape", [(1, 13), (9, 13), (2, 1, 9, 13), (1, 4, 1, 13)])
def test_attention_float_bias_and_bool_mask_match_sdpa(shape):
    q, k, v = qkv()
    bias = torch.randn(shape, dtype=F64)
    close(reference.attention(q, k, v, attn_bias=bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    mask = torch.rand(shape) > 0.3
    expected = torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    close(reference.attention(q, k, v, attn_bias=mask), expected)


def test_attention_scale_and_value_head_dim():
    q, k, _ = qkv()
    v = torch.randn(2, 4, 13, 24, dtype=F64)
    close(reference.attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_attention_window_softcap_alibi_match_explicit_scores():
    q, k, v = qkv(seqlen_q=11, seqlen_k=17)
    scale, cap, left, right = 0.2, 5.0, 3, 2
    slopes = torch.rand(2, 4, dtype=F64)
    offset = 17 - 11
    i = torch.arange(11)[:, None] + offset
    j = torch.arange(17)[None, :]
    scores = cap * torch.tanh(q @ k.transpose(-1, -2) * scale / cap)
    scores = scores - slopes[:, :, None, None] * (i - j).abs()
    visible = (j >= i - left) & (j <= i + right)
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    out, lse = reference.attention(q, k, v, scale=scale, softcap=cap, alibi_slopes=slopes,
                                   window_size=(left, right), return_lse=True)
    close(out, probs @ v)
    close(lse.double(), torch.logsumexp(scores.masked_fill(~visible, -math.inf), dim=-1), tol=1e-6)


def test_attention_alibi_per_head_slopes_broadcast_over_batch():
    q, k, v = qkv()
    slopes = torch.rand(4, dtype=F64)
    close(reference.attention(q, k, v, alibi_slopes=slopes),
          reference.attention(q, k, v, alibi_slopes=slopes.expand(2, 4)))


def test_attention_lse_and_fully_masked_rows():
    q, k, v = qkv(seqlen_q=6, seqlen_k=6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    out, lse = reference.attention(q, k, v, attn_bias=mask, return_lse=True)
    assert torch.isfinite(out).all() and out[:, :, 2].abs().max() == 0
    assert torch.isneginf(lse[:, :, 2]).all()
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    close(lse[:, :, 3].double(), torch.logsumexp(scores, dim=-1)[:, :, 3], tol=1e-6)
    assert lse.dtype == torch.float32
    empty_out, empty_lse = reference.attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert empty_out.abs().max() == 0 and torch.isneginf(empty_lse).all()


def test_attention_dropout_given_mask_and_generator():
    q, k, v = qkv()
    p = 0.25
    keep = torch.rand(2, 4, 9, 13) >= p
    probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    close(reference.attention(q, k, v, dropout_p=p, dropout_mask=keep), (probs * keep / (1 - p)) @ v)
    first = reference.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(3))
    second = reference.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(3))
    close(first, second)
    rate = 1 - reference.dropout_keep_mask((200_000,), p, torch.device("cpu"), None).double().mean()
    assert abs(float(rate) - p) < 0.01


def test_varlen_attention_equals_dense_per_sequence():
    lengths_q, lengths_k = [3, 0, 7, 1], [5, 2, 7, 4]
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, 8, dtype=F64)
    k = torch.randn(sum(lengths_k), 2, 8, dtype=F64)
    v = torch.randn(sum(lengths_k), 2, 8, dtype=F64)
    out, lse = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert out.shape == (11, 4, 8) and lse.shape == (4, 11)
    for i in range(4):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        dense, dense_lse = reference.attention(
            q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None], v[ks].transpose(0, 1)[None],
            causal=True, return_lse=True,
        )
        close(out[qs], dense[0].transpose(0, 1))
        close(lse[:, qs], dense_lse[0])


@pytest.mark.parametrize("page_size", [16, 5])
def test_decode_attention_paged_equals_contiguous_equals_dense(page_size):
    batch, heads, kv_heads, q_len, head_dim, max_len = 3, 8, 2, 2, 16, 40
    q = torch.randn(batch, heads, q_len, head_dim, dtype=F64)
    k_cache = torch.randn(batch, kv_heads, max_len, head_dim, dtype=F64)
    v_cache = torch.randn(batch, kv_heads, max_len, head_dim, dtype=F64)
    seqlens = torch.tensor([2, 17, 40], dtype=torch.int32)
    out = reference.decode_attention(q, k_cache, v_cache, seqlens)
    for b, length in enumerate(seqlens.tolist()):
        dense = reference.attention(q[b : b + 1], k_cache[b : b + 1, :, :length],
                                    v_cache[b : b + 1, :, :length], causal=True)
        close(out[b : b + 1], dense)
    pages_per_seq = -(-max_len // page_size)
    order = torch.randperm(batch * pages_per_seq)  # pages scattered in the pool
    block_table = order.reshape(batch, pages_per_seq).to(torch.int32)
    k_pages = torch.zeros(batch * pages_per_seq, kv_heads, page_size, head_dim, dtype=F64)
    v_pages = torch.zeros_like(k_pages)
    for b in range(batch):
        for p in range(pages_per_seq):
            chunk = slice(p * page_size, min((p + 1) * page_size, max_len))
            width = chunk.stop - chunk.start
            k_pages[block_table[b, p], :, :width] = k_cache[b, :, chunk]
            v_pages[block_table[b, p], :, :width] = v_cache[b, :, chunk]
    close(reference.decode_attention(q, k_pages, v_pages, seqlens, block_table=block_table), out)


@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_f_layer_norm(with_residual):
    x = torch.randn(7, 33, dtype=F64)
    w, b = torch.randn(33, dtype=F64), torch.randn(33, dtype=F64)
    residual = torch.randn(7, 33, dtype=F64) if with_residual else None
    s = x + residual if with_residual else x
    y, summed, mean, rstd = reference.layer_norm(x, w, b, 1e-5, residual=residual, prenorm=True,
                                                 return_stats=True)
    close(y, F.layer_norm(s, (33,), w, b, 1e-5))
    close(summed, s)
    close(mean.double(), s.mean(-1), tol=1e-6)
    close(rstd.double(), torch.rsqrt(s.var(-1, unbiased=False) + 1e-5), tol=1e-6)
    close(reference.layer_norm(x, None, None), F.layer_norm(x, (33,)))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_f_rms_norm(with_residual):
    x = torch.randn(5, 40, dtype=F64)
    w = torch.randn(40, dtype=F64)
    residual = torch.randn(5, 40, dtype=F64) if with_residual else None
    s = x + residual if with_residual else x
    y, summed = reference.rms_norm(x, w, 1e-6, residual=residual, prenorm=True)
    close(y, F.rms_norm(s, (40,), w, 1e-6))
    close(summed, s)
    close(reference.rms_norm(x, None), F.rms_norm(x, (40,), None, 1e-6))


def test_residual_in_fp32_keeps_the_sum_in_fp32():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    residual = torch.randn(4, 16, dtype=torch.bfloat16)
    y, summed = reference.rms_norm(x, None, residual=residual, prenorm=True, residual_in_fp32=True)
    assert summed.dtype == torch.float32 and y.dtype == torch.bfloat16
    close(summed, x.float() + residual.float())


@pytest.mark.parametrize("name", reference.ACTIVATIONS)
def test_ffn_matches_nn_linear(name):
    lin1, lin2 = torch.nn.Linear(24, 40, dtype=F64), torch.nn.Linear(40, 24, dtype=F64)
    x = torch.randn(3, 5, 24, dtype=F64)
    expected = lin2(reference.torch_activation(lin1(x), name))
    close(reference.ffn(x, lin1.weight, lin1.bias, lin2.weight, lin2.bias, activation_name=name), expected)
    close(reference.activation(x, name), reference.torch_activation(x, name))


def test_gated_ffn_is_swiglu_and_geglu():
    gate, up, down = (torch.nn.Linear(a, b, bias=False, dtype=F64) for a, b in ((24, 40), (24, 40), (40, 24)))
    x = torch.randn(6, 24, dtype=F64)
    close(reference.gated_ffn(x, gate.weight, up.weight, down.weight), down(F.silu(gate(x)) * up(x)))
    close(reference.gated_ffn(x, gate.weight, up.weight, down.weight, activation_name="gelu"),
          down(F.gelu(gate(x)) * up(x)))


# ----------------------------------------------------------------------------- backward formulas
# The explicit backward of each op (the naive backend's, and the formulas the kernels
# implement) against autograd through the forward, in float64.


def autograd_of(forward, inputs, cotangents):
    leaves_ = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    outputs = forward(*leaves_)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    present = [t for t in leaves_ if t is not None]
    found = iter(torch.autograd.grad(outputs, present, cotangents))
    return [next(found) if t is not None else None for t in leaves_]


@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=True, softcap=3.0),
    dict(window_size=(4, 1), attn_bias="float", bias_needs_grad=True),
    dict(attn_bias="bool", alibi_slopes=True),
    dict(dropout_p=0.3, causal=True),
    dict(causal=True, top_left=True, with_dlse=True),
], ids=["plain", "causal-softcap", "window-bias", "mask-alibi", "dropout", "top-left-dlse"])
def test_attention_backward_matches_autograd(options):
    options = dict(options)
    q, k, v = qkv(heads=4, kv_heads=2, seqlen_q=9, seqlen_k=12)
    if options.get("attn_bias") == "float":
        options["attn_bias"] = torch.randn(1, 4, 9, 1, dtype=F64)
    elif options.get("attn_bias") == "bool":
        options["attn_bias"] = torch.rand(9, 12) > 0.5
    if options.get("alibi_slopes"):
        options["alibi_slopes"] = torch.rand(4, dtype=F64)
    if options.get("dropout_p"):
        options["dropout_mask"] = torch.rand(2, 4, 9, 12) >= options["dropout_p"]
    with_dlse = options.pop("with_dlse", False)
    bias_needs_grad = options.pop("bias_needs_grad", False)
    bias = options.pop("attn_bias", None)
    dout = torch.randn(2, 4, 9, 16, dtype=F64)
    dlse = torch.randn(2, 4, 9, dtype=torch.float32) if with_dlse else None
    forward = lambda q_, k_, v_, b_: reference.attention(q_, k_, v_, attn_bias=b_, return_lse=True, **options)
    cot = (dout, dlse if dlse is not None else torch.zeros(2, 4, 9))
    grad_bias = bias if bias_needs_grad else None
    expected = autograd_of(lambda q_, k_, v_, b_: forward(q_, k_, v_, b_ if b_ is not None else bias),
                           (q, k, v, grad_bias), cot)
    got = reference.attention_backward(dout, q, k, v, dlse=dlse, attn_bias=bias,
                                       bias_needs_grad=bias_needs_grad, **options)
    for name, e, g in zip(("dq", "dk", "dv", "dbias"), expected, got):
        if e is None:
            assert g is None, name
        else:
            close(g, e, tol=1e-6)


def test_varlen_attention_backward_matches_autograd():
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    q, k, v = (torch.randn(n, h, 8, dtype=F64) for n, h in ((8, 4), (12, 2), (12, 2)))
    dout, dlse = torch.randn(8, 4, 8, dtype=F64), torch.randn(4, 8)
    expected = autograd_of(
        lambda *t: reference.varlen_attention(*t, cu_q, cu_k, causal=True, return_lse=True), (q, k, v), (dout, dlse)
    )
    got = reference.varlen_attention_backward(dout, q, k, v, cu_q, cu_k, dlse=dlse, causal=True)
    for e, g in zip(expected, got):
        close(g, e, tol=1e-6)


def test_norm_backwards_match_autograd():
    s, dy = torch.randn(6, 37, dtype=F64), torch.randn(6, 37, dtype=F64)
    w, b = torch.randn(37, dtype=F64), torch.randn(37, dtype=F64)
    for weight, bias in ((w, b), (None, None)):
        expected = autograd_of(lambda *t: reference.layer_norm(*t, 1e-5), (s, weight, bias), (dy,))
        for e, g in zip(expected, reference.layer_norm_backward(dy, s, weight, bias, 1e-5)):
            assert (e is None) == (g is None)
            if e is not None:
                close(g, e)
        expected = autograd_of(lambda *t: reference.rms_norm(*t, 1e-6), (s, weight), (dy,))
        for e, g in zip(expected, reference.rms_norm_backward(dy, s, weight, 1e-6)):
            assert (e is None) == (g is None)
            if e is not None:
                close(g, e)


@pytest.mark.parametrize("name", reference.ACTIVATIONS)
def test_ffn_backwards_match_autograd(name):
    x, dy = torch.randn(7, 12, dtype=F64), torch.randn(7, 10, dtype=F64)
    w1, b1, w2, b2 = (torch.randn(*shape, dtype=F64) for shape in ((20, 12), (20,), (10, 20), (10,)))
    expected = autograd_of(lambda *t: reference.ffn(*t, activation_name=name), (x, w1, b1, w2, b2), (dy,))
    for e, g in zip(expected, reference.ffn_backward(dy, x, w1, b1, w2, b2, activation_name=name)):
        close(g, e)
    assert reference.ffn_backward(dy, x, w1, None, w2, None, activation_name=name)[2] is None
    wg, wu, wd = (torch.randn(*shape, dtype=F64) for shape in ((20, 12), (20, 12), (10, 20)))
    expected = autograd_of(lambda *t: reference.gated_ffn(*t, activation_name=name), (x, wg, wu, wd), (dy,))
    for e, g in zip(expected, reference.gated_ffn_backward(dy, x, wg, wu, wd, activation_name=name)):
        close(g, e)
