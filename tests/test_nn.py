"""fastattn.nn modules: the same parameters and results as their torch.nn counterparts
on every backend, the fused residual path, rotary embeddings, and the KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn.nn as fnn
import fastattn.ops.attention as attention_op
import fastattn.ops.decode_attention as decode_op
import fastattn.ops.ffn as ffn_op
import fastattn.ops.gated_ffn as gated_ffn_op
import fastattn.ops.layer_norm as layer_norm_op
import fastattn.ops.rms_norm as rms_norm_op
from helpers import backends_of


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads cost more than they save (far more on
    a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


F32 = torch.float32


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("backend", backends_of(layer_norm_op.BACKENDS))
@pytest.mark.parametrize("shape,bias", [(37, True), (37, False), ((3, 5), True)])
def test_layer_norm_matches_torch_module(backend, shape, bias):
    ref = nn.LayerNorm(shape, eps=1e-4, bias=bias)
    with torch.no_grad():
        ref.weight.normal_()
        if bias:
            ref.bias.normal_()
    ours = fnn.LayerNorm(shape, eps=1e-4, bias=bias, backend=backend)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    trailing = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(2, 7, *trailing, requires_grad=True)
    y_ref, y = ref(x), ours(x)
    close(y, y_ref)
    dy = torch.randn_like(y)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight], dy)
    grads = torch.autograd.grad(y, [x, ours.weight], dy)
    for g, g_ref in zip(grads, grads_ref):
        close(g, g_ref, 1e-4)


@pytest.mark.parametrize("backend", backends_of(rms_norm_op.BACKENDS))
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch_module(backend, eps):
    ref = nn.RMSNorm(29, eps=eps)
    with torch.no_grad():
        ref.weight.normal_()
    ours = fnn.RMSNorm(29, eps=eps, backend=backend)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 29, requires_grad=True)
    close(ours(x), ref(x))
    dx, = torch.autograd.grad(ours(x).sum(), x)
    dx_ref, = torch.autograd.grad(ref(x).sum(), x)
    close(dx, dx_ref, 1e-4)


@pytest.mark.parametrize("norm_cls", [fnn.LayerNorm, fnn.RMSNorm])
def test_norm_residual_and_prenorm(norm_cls):
    norm = norm_cls(16)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    close(norm(x, residual=residual), norm(x + residual))
    y, summed = norm(x, residual=residual, prenorm=True)
    close(summed, x + residual)
    close(y, norm(x + residual))
    y, summed = norm(x, prenorm=True)
    assert torch.equal(summed, x)


def test_norm_without_affine_and_bad_input():
    ln = fnn.LayerNorm(8, elementwise_affine=False)
    assert ln.weight is None and ln.bias is None and len(ln.state_dict()) == 0
    x = torch.randn(4, 8)
    close(ln(x), F.layer_norm(x, (8,)))
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.LayerNorm((2, 4))(torch.randn(3, 8))
    with pytest.raises(ValueError, match="backend"):
        fnn.RMSNorm(8, backend="fast")


# ----------------------------------------------------------------------------- FFN


@pytest.mark.parametrize("backend", backends_of(ffn_op.BACKENDS))
@pytest.mark.parametrize("activation,torch_act", [("gelu", nn.GELU()), ("gelu_tanh", nn.GELU("tanh")),
                                                  ("relu", nn.ReLU())])
def test_feed_forward_matches_linear_stack(backend, activation, torch_act):
    ours = fnn.FeedForward(24, 40, activation=activation, backend=backend)
    ref = nn.Sequential(nn.Linear(24, 40), torch_act, nn.Linear(40, 24))
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in ours.state_dict().items()})
    x = torch.randn(3, 5, 24, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    close(y, y_ref)
    dy = torch.randn_like(y)
    params, ref_params = list(ours.parameters()), list(ref.parameters())
    for g, g_ref in zip(torch.autograd.grad(y, [x, *params], dy), torch.autograd.grad(y_ref, [x, *ref_params], dy)):
        close(g, g_ref, 1e-4)


@pytest.mark.parametrize("backend", backends_of(gated_ffn_op.BACKENDS))
def test_gated_feed_forward_is_swiglu(backend):
    ours = fnn.GatedFeedForward(16, 44, activation="silu", backend=backend)
    assert set(ours.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    x = torch.randn(2, 7, 16, requires_grad=True)
    expected = ours.down_proj(F.silu(ours.gate_proj(x)) * ours.up_proj(x))
    y = ours(x)
    close(y, expected)
    dy = torch.randn_like(y)
    params = list(ours.parameters())
    for g, g_ref in zip(torch.autograd.grad(y, [x, *params], dy), torch.autograd.grad(expected, [x, *params], dy)):
        close(g, g_ref, 1e-4)


def test_ffn_modules_follow_autocast():
    ffn, gated = fnn.FeedForward(16, 32), fnn.GatedFeedForward(16, 32)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, z = ffn(x), gated(x)
    assert y.dtype == z.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ffn.fc1.weight.grad.dtype == F32
    close(y.float(), ffn(x), 5e-2)


# ----------------------------------------------------------------------------- rotary


def test_rotary_scores_depend_only_on_relative_position():
    head_dim = 8
    q, k = torch.randn(1, 1, 1, head_dim, dtype=torch.float64), torch.randn(1, 1, 1, head_dim, dtype=torch.float64)

    def score(i, j):
        cos_i, sin_i = fnn.rotary_cos_sin(torch.tensor([i]), head_dim)
        cos_j, sin_j = fnn.rotary_cos_sin(torch.tensor([j]), head_dim)
        return float((fnn.apply_rotary(q, cos_i, sin_i) * fnn.apply_rotary(k, cos_j, sin_j)).sum())

    assert math.isclose(score(5, 2), score(13, 10), rel_tol=1e-5)
    assert not math.isclose(score(5, 2), score(5, 3), rel_tol=1e-3)
    cos, sin = fnn.rotary_cos_sin(torch.tensor([0]), head_dim)
    close(fnn.apply_rotary(q, cos, sin), q)  # position 0 is the identity
    with pytest.raises(ValueError, match="even head_dim"):
        fnn.rotary_cos_sin(torch.arange(3), 7)


# ----------------------------------------------------------------------------- attention


def attention_reference(module, x, causal, key_padding_mask=None, rotary=None):
    """The module's math with F.scaled_dot_product_attention and repeated KV heads."""
    b, t, _ = x.shape
    h, hk, d = module.n_heads, module.n_kv_heads, module.head_dim
    q, k, v = module.qkv_proj(x).split((h * d, hk * d, hk * d), dim=-1)
    q = q.reshape(b, t, h, d).transpose(1, 2)
    k = k.reshape(b, t, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    v = v.reshape(b, t, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    if rotary is not None:
        q, k = fnn.apply_rotary(q, *rotary), fnn.apply_rotary(k, *rotary)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return module.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("backend", backends_of(attention_op.BACKENDS))
@pytest.mark.parametrize("n_kv_heads,causal,use_rotary", [(4, True, False), (2, True, True), (1, False, False)])
def test_attention_matches_sdpa(backend, n_kv_heads, causal, use_rotary):
    module = fnn.Attention(32, 4, n_kv_heads, causal=causal, backend=backend)
    x = torch.randn(2, 13, 32, requires_grad=True)
    rotary = fnn.rotary_cos_sin(torch.arange(13), module.head_dim) if use_rotary else None
    y, y_ref = module(x, rotary=rotary), attention_reference(module, x, causal, rotary=rotary)
    close(y, y_ref)
    dy = torch.randn_like(y)
    params = [x, module.qkv_proj.weight, module.out_proj.bias]
    for g, g_ref in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y_ref, params, dy)):
        close(g, g_ref, 1e-4)


def test_attention_key_padding_mask():
    module = fnn.Attention(16, 2, causal=False)
    x = torch.randn(2, 9, 16)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    y = module(x, key_padding_mask=keep)
    close(y, attention_reference(module, x, False, key_padding_mask=keep))
    # The real tokens of sequence 1 see exactly what they would without the padding.
    close(y[1, :6], module(x[1:, :6])[0])


def test_attention_bad_arguments():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        fnn.Attention(32, 4, 3)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        fnn.Attention(30, 4)
    with pytest.raises(ValueError, match="backend"):
        fnn.Attention(32, 4, backend="cudnn")
    encoder = fnn.Attention(16, 2, causal=False)
    with pytest.raises(ValueError, match="causal"):
        encoder(torch.randn(1, 3, 16), kv_cache=fnn.LayerKVCache(1, 8))


def _cache_backends():
    attention_ok = backends_of(attention_op.BACKENDS)
    return [b for b in backends_of(decode_op.BACKENDS) if b in attention_ok]


@pytest.mark.parametrize("backend", _cache_backends())
@pytest.mark.parametrize("page_size", [0, 4])
@pytest.mark.parametrize("chunks", [(3, 1, 1, 2), (19, 1, 5)])  # short prefill (decode path), long prefill
def test_attention_with_kv_cache_equals_full_sequence(backend, page_size, chunks):
    module = fnn.Attention(32, 4, 2, bias=False, backend=backend).eval()
    total = sum(chunks)
    x = torch.randn(2, total, 32)
    rotary = fnn.rotary_cos_sin(torch.arange(total), module.head_dim)
    with torch.no_grad():
        expected = module(x, rotary=rotary)
        cache = fnn.LayerKVCache(2, total + 3, page_size=page_size)
        outs, start = [], 0
        for n in chunks:
            part = tuple(t[start : start + n] for t in rotary)
            outs.append(module(x[:, start : start + n], rotary=part, kv_cache=cache))
            start += n
    close(torch.cat(outs, dim=1), expected)
    assert cache.length == total
    k, v = cache.dense()
    assert k.shape == (2, 2, total, 8) and v.shape == (2, 2, total, 8)
    if page_size:
        assert cache.block_table.dtype == torch.int32 and cache.block_table.shape == (2, -(-(total + 3) // 4))


def test_kv_cache_overflow_is_refused():
    cache = fnn.LayerKVCache(1, 4)
    cache.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.append(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match="page_size"):
        fnn.LayerKVCache(1, 4, page_size=-1)


def test_module_backend_can_be_switched():
    module = fnn.FeedForward(8, 16, backend="naive")
    x = torch.randn(3, 8)
    y = module(x)
    module.backend = "torch"
    close(module(x), y)
    with pytest.raises(ValueError, match="backend"):
        module.backend = "bogus"


def test_rms_norm_defaults_match_torch():
    """fastattn.nn.RMSNorm's constructor defaults are torch.nn.RMSNorm's: eps=None (the
    input dtype's eps at each call), so a default-built module gives torch's result in
    float32 and in float64. (The functional fastattn.rms_norm keeps eps=1e-6.)"""
    import inspect

    ours, theirs = inspect.signature(fnn.RMSNorm).parameters, inspect.signature(nn.RMSNorm).parameters
    for name in ("eps", "elementwise_affine"):
        assert ours[name].default == theirs[name].default, name
    assert inspect.signature(fnn.rms_norm).parameters["eps"].default == 1e-6
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 7, dtype=dtype) * 1e-4  # small: eps matters
        ref, mod = nn.RMSNorm(7, dtype=dtype), fnn.RMSNorm(7, dtype=dtype)
        close(mod(x), ref(x))
