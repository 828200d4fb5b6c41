"""Bad input to every public op: a ValueError/TypeError naming the argument, raised
before any work (no op is called), and nothing written."""

import pytest
import torch

import fastattn
from fastattn._validate import DEBUG_ENV
from fastattn.ops import attention as attention_op
from fastattn.ops import decode_attention as decode_op
from fastattn.ops import ffn as ffn_op
from fastattn.ops import gated_ffn as gated_ffn_op
from fastattn.ops import layer_norm as layer_norm_op
from fastattn.ops import rms_norm as rms_norm_op
from fastattn.ops import varlen_attention as varlen_op

R = torch.randn


def qkv(b=2, h=4, hk=2, sq=5, sk=6, d=8, dtype=torch.float32):
    return R(b, h, sq, d, dtype=dtype), R(b, hk, sk, d, dtype=dtype), R(b, hk, sk, d, dtype=dtype)


def cu(*values):
    return torch.tensor(values, dtype=torch.int32)


def attention_case(**kwargs):
    q, k, v = kwargs.pop("qkv", qkv())
    return lambda: fastattn.attention(q, k, v, **kwargs)


CASES = {
    # attention
    "attention q not a tensor": (lambda: fastattn.attention([1.0], *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
    "attention q 3-D": (lambda: fastattn.attention(R(4, 5, 8), *qkv()[1:]), ValueError, "q must be 4-D"),
    "attention int dtype": (lambda: fastattn.attention(*(t.long() for t in qkv())), TypeError, "q must have dtype"),
    "attention mixed dtypes": (lambda: fastattn.attention(qkv()[0].half(), *qkv()[1:]), TypeError, "k has dtype float32 but q has float16"),
    "attention head_dim mismatch": (lambda: fastattn.attention(R(2, 4, 5, 16), *qkv()[1:]), ValueError, "same head_dim"),
    "attention k/v length mismatch": (lambda: fastattn.attention(qkv()[0], qkv()[1], R(2, 2, 7, 8)), ValueError, "k and v must agree"),
    "attention batch mismatch": (lambda: fastattn.attention(R(3, 4, 5, 8), *qkv()[1:]), ValueError, "same batch"),
    "attention GQA not divisible": (lambda: fastattn.attention(*qkv(h=5)), ValueError, r"heads of q \(5\) must be a multiple of kv_heads"),
    "attention window type": (attention_case(window_size=3), TypeError, "window_size must be a pair"),
    "attention window value": (attention_case(window_size=(-2, 0)), ValueError, "window_size sides"),
    "attention dropout 1": (attention_case(dropout_p=1.0), ValueError, "dropout_p must be < 1.0"),
    "attention dropout negative": (attention_case(dropout_p=-0.1), ValueError, "dropout_p must be >= 0.0"),
    "attention softcap negative": (attention_case(softcap=-1.0), ValueError, "softcap must be >= 0.0"),
    "attention scale zero": (attention_case(scale=0.0), ValueError, "scale must be > 0"),
    "attention scale nan": (attention_case(scale=float("nan")), ValueError, "scale must be finite"),
    "attention causal not bool": (attention_case(causal=1), TypeError, "causal must be a bool"),
    "attention bias not broadcastable": (attention_case(attn_bias=R(5, 7)), ValueError, r"attn_bias of shape \(5, 7\) is not broadcastable to \(batch, heads, seqlen_q, seqlen_k\)"),
    "attention bias int": (attention_case(attn_bias=torch.ones(5, 6, dtype=torch.int64)), TypeError, "attn_bias must have dtype"),
    "attention alibi shape": (attention_case(alibi_slopes=R(3)), ValueError, r"alibi_slopes must have shape \(heads,\)"),
    "attention alibi 3-D": (attention_case(alibi_slopes=R(2, 4, 1)), ValueError, "alibi_slopes must be 1 or 2-D"),
    "attention device mismatch": (attention_case(attn_bias=torch.empty(5, 6, device="meta")), ValueError, "attn_bias is on meta"),
    "attention alibi device": (attention_case(alibi_slopes=torch.empty(4, device="meta")), ValueError, "alibi_slopes is on meta but q is on cpu"),
    "varlen cu device": (lambda: fastattn.varlen_attention(R(5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 5).to("meta"), cu(0, 6), 5, 6), ValueError, "cu_seqlens_q is on meta but q is on cpu"),
    # scaled_dot_product_attention
    "sdpa mask and causal": (lambda: fastattn.scaled_dot_product_attention(*qkv(hk=4), attn_mask=R(5, 6), is_causal=True), ValueError, "attn_mask and is_causal"),
    "sdpa gqa without flag": (lambda: fastattn.scaled_dot_product_attention(*qkv()), ValueError, "enable_gqa=True"),
    "sdpa 2-D": (lambda: fastattn.scaled_dot_product_attention(R(5, 8), R(6, 8), R(6, 8)), ValueError, "query must be at least 3-D"),
    "sdpa mask shape": (lambda: fastattn.scaled_dot_product_attention(*qkv(hk=4), attn_mask=R(4, 6)), ValueError, "attn_mask of shape"),
    # varlen_attention
    "varlen cu dtype": (lambda: fastattn.varlen_attention(R(5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 5).long(), cu(0, 6), 5, 6), TypeError, "cu_seqlens_q must have dtype int32"),
    "varlen cu lengths differ": (lambda: fastattn.varlen_attention(R(5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 5), cu(0, 3, 6), 5, 6), ValueError, "batch \\+ 1 entries"),
    "varlen cu end": (lambda: fastattn.varlen_attention(R(5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 4), cu(0, 6), 5, 6), ValueError, r"cu_seqlens_q\[-1\] must equal total_q"),
    "varlen cu decreasing": (lambda: fastattn.varlen_attention(R(5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 3, 2, 5), cu(0, 2, 4, 6), 5, 6), ValueError, "non-decreasing"),
    "varlen max too small": (lambda: fastattn.varlen_attention(R(5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 5), cu(0, 6), 4, 6), ValueError, "max_seqlen_q .* shorter"),
    "varlen q 4-D": (lambda: fastattn.varlen_attention(R(1, 5, 4, 8), R(6, 2, 8), R(6, 2, 8), cu(0, 5), cu(0, 6), 5, 6), ValueError, "q must be 3-D"),
    # decode_attention
    "decode q_len 17": (lambda: fastattn.decode_attention(R(2, 4, 17, 8), R(2, 2, 32, 8), R(2, 2, 32, 8), cu(20, 20)), ValueError, "q_len .* must be in 1..16"),
    "decode seqlens beyond cache": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(2, 2, 32, 8), R(2, 2, 32, 8), cu(20, 33)), ValueError, r"cache_seqlens must lie in \[q_len, capacity\] = \[1, 32\]"),
    "decode seqlens shorter than q_len": (lambda: fastattn.decode_attention(R(2, 4, 3, 8), R(2, 2, 32, 8), R(2, 2, 32, 8), cu(2, 5)), ValueError, "cache_seqlens must lie in"),
    "decode seqlens shape": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(2, 2, 32, 8), R(2, 2, 32, 8), cu(5)), ValueError, r"cache_seqlens must have shape \(batch,\)"),
    "decode block_table too short": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(6, 2, 16, 8), R(6, 2, 16, 8), cu(20, 33), block_table=cu(0, 1, 2, 3).reshape(2, 2)), ValueError, r"capacity\] = \[1, 32\] \(block_table pages"),
    "decode block_table bad page": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(6, 2, 16, 8), R(6, 2, 16, 8), cu(20, 3), block_table=cu(0, 9, 2, 3).reshape(2, 2)), ValueError, r"block_table entries in use must index pages 0\.\.5 of k_cache, got block_table\[0, 1\] = 9"),
    "decode block_table dtype": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(6, 2, 16, 8), R(6, 2, 16, 8), cu(20, 3), block_table=cu(0, 1, 2, 3).reshape(2, 2).long()), TypeError, "block_table must have dtype int32"),
    "decode seqlens 0 with k_new": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(2, 2, 32, 8), R(2, 2, 32, 8), cu(0, 3), k_new=R(2, 2, 1, 8), v_new=R(2, 2, 1, 8)), ValueError, r"cache_seqlens must lie in \[q_len, capacity\] = \[1, 32\]"),
    "decode block_table negative page": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(6, 2, 16, 8), R(6, 2, 16, 8), cu(20, 3), block_table=cu(0, -1, 2, 3).reshape(2, 2)), ValueError, r"block_table entries in use must index pages 0\.\.5 of k_cache, got block_table\[0, 1\] = -1"),
    "decode page_size 0": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(6, 2, 0, 8), R(6, 2, 0, 8), cu(1, 1), block_table=cu(0, 1, 2, 3).reshape(2, 2)), ValueError, r"page_size >= 1, got shape \(6, 2, 0, 8\)"),
    "decode contiguous batch": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(3, 2, 32, 8), R(3, 2, 32, 8), cu(5, 5)), ValueError, "contiguous k_cache"),
    "decode head_dim": (lambda: fastattn.decode_attention(R(2, 4, 1, 8), R(2, 2, 32, 16), R(2, 2, 32, 16), cu(5, 5)), ValueError, "k_cache head_dim"),
    # layer_norm / rms_norm
    "layer_norm weight shape": (lambda: fastattn.layer_norm(R(3, 8), R(7)), ValueError, r"weight must have shape \(hidden,\) = \(8,\)"),
    "layer_norm bias shape": (lambda: fastattn.layer_norm(R(3, 8), R(8), R(9)), ValueError, r"bias must have shape \(hidden,\)"),
    "layer_norm residual shape": (lambda: fastattn.layer_norm(R(3, 8), R(8), residual=R(3, 7)), ValueError, "residual must have the shape of x"),
    "layer_norm eps negative": (lambda: fastattn.layer_norm(R(3, 8), R(8), eps=-1.0), ValueError, "eps must be >= 0.0"),
    "layer_norm x int": (lambda: fastattn.layer_norm(torch.ones(3, 8, dtype=torch.int32), None), TypeError, "x must have dtype"),
    "layer_norm hidden 0": (lambda: fastattn.layer_norm(R(3, 0), None), ValueError, "hidden"),
    "layer_norm prenorm not bool": (lambda: fastattn.layer_norm(R(3, 8), None, prenorm="yes"), TypeError, "prenorm must be a bool"),
    "rms_norm weight 2-D": (lambda: fastattn.rms_norm(R(3, 8), R(1, 8)), ValueError, "weight must be 1-D"),
    "rms_norm residual type": (lambda: fastattn.rms_norm(R(3, 8), None, residual=3), TypeError, "residual must be a torch.Tensor"),
    # ffn / gated_ffn
    "ffn w1 shape": (lambda: fastattn.ffn(R(4, 8), R(16, 9), None, R(8, 16), None), ValueError, r"w1 must have shape \(d_hidden, d_model\) .* d_model = 8"),
    "ffn w2 shape": (lambda: fastattn.ffn(R(4, 8), R(16, 8), None, R(8, 15), None), ValueError, r"w2 must have shape \(d_out, d_hidden\)"),
    "ffn b1 shape": (lambda: fastattn.ffn(R(4, 8), R(16, 8), R(15), R(8, 16), None), ValueError, r"b1 must have shape \(d_hidden,\)"),
    "ffn activation": (lambda: fastattn.ffn(R(4, 8), R(16, 8), None, R(8, 16), None, activation="swish"), ValueError, "activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'"),
    "ffn dtype mismatch": (lambda: fastattn.ffn(R(4, 8), R(16, 8).double(), None, R(8, 16), None), TypeError, "w1 has dtype float64 but x has float32"),
    "gated w_up shape": (lambda: fastattn.gated_ffn(R(4, 8), R(16, 8), R(12, 8), R(8, 16)), ValueError, r"w_up must have shape \(d_hidden, d_model\) with d_hidden = 16"),
    "gated w_down shape": (lambda: fastattn.gated_ffn(R(4, 8), R(16, 8), R(16, 8), R(8, 12)), ValueError, r"w_down must have shape \(d_out, d_hidden\)"),
    "gated activation type": (lambda: fastattn.gated_ffn(R(4, 8), R(16, 8), R(16, 8), R(8, 16), activation=None), TypeError, "activation must be a str"),
}

OP_MODULES = {
    attention_op: ("attention_fwd",), varlen_op: ("varlen_attention_fwd",), decode_op: ("decode_attention_fwd",),
    layer_norm_op: ("layer_norm_fwd",), rms_norm_op: ("rms_norm_fwd",), ffn_op: ("ffn_fwd",),
    gated_ffn_op: ("gated_ffn_fwd",),
}


@pytest.fixture
def no_op_may_run(monkeypatch):
    """Replace every registered forward op by one that fails the test if called."""
    for module, names in OP_MODULES.items():
        for name in names:
            def forbidden(*args, _name=name, **kwargs):
                raise AssertionError(f"{_name} ran before the bad input was rejected")
            monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_rejected_before_any_work(case, no_op_may_run, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)  # the default backends check decode's cache values on the host
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call()


def test_decode_bad_input_leaves_the_cache_untouched(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    k_cache, v_cache = R(2, 2, 32, 8), R(2, 2, 32, 8)
    before = (k_cache.clone(), v_cache.clone())
    with pytest.raises(ValueError):
        fastattn.decode_attention(R(2, 4, 1, 8), k_cache, v_cache, cu(20, 40))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_fully_masked_rows_give_zero_not_nan_on_every_backend():
    q, k, v = qkv(hk=4)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1] = False
    for backend in ("naive", "torch"):
        q_ = q.clone().requires_grad_()
        out = fastattn.attention(q_, k, v, attn_bias=mask, backend=backend)
        out.sum().backward()
        assert torch.isfinite(out).all() and out[:, :, 1].abs().max() == 0
        assert torch.isfinite(q_.grad).all()


def test_batches_beyond_the_grid_are_refused_by_the_kernels_not_by_auto():
    """The Triton and CUDA kernels put the batch on a CUDA grid axis of at most 65535
    blocks: a larger batch gets a ValueError naming the limit before any launch from the
    kernel backends, while the reference backends still serve it (so `auto` falls back)."""
    batch = attention_op.GRID_MAX_BATCH + 1
    q = torch.randn(batch, 1, 1, 16)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
    empty = torch.randn(0, 1, 16)
    calls = {
        "attention": lambda backend: fastattn.attention(q, q, q, backend=backend),
        "varlen_attention": lambda backend: fastattn.varlen_attention(empty, empty, empty, cu_seqlens, cu_seqlens,
                                                                      0, 0, backend=backend),
        "decode_attention": lambda backend: fastattn.decode_attention(q, q, q, torch.ones(batch, dtype=torch.int32),
                                                                      backend=backend),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=f"at most 65535; got a batch of {batch} sequences"):
            call("triton")
    big = attention_op.AttentionCall(torch.float16, 64, 64, False, 0.0, 0.0, False, batch=batch)
    assert "at most 65535" in attention_op.BACKENDS.reason("cuda", big)
    assert attention_op.BACKENDS.reason("torch", big) is None and attention_op.BACKENDS.reason("naive", big) is None
