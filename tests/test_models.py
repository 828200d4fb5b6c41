"""The reference Transformer: presets, every backend against naive, the block formulas
(pre-norm, post-norm through the fused residual norm), encoder padding, the KV cache."""

import pytest
import torch
import torch.nn.functional as F

import fastattn.nn as fnn
import fastattn.ops.attention as attention_op
import fastattn.ops.decode_attention as decode_op
import fastattn.ops.ffn as ffn_op
import fastattn.ops.gated_ffn as gated_ffn_op
import fastattn.ops.layer_norm as layer_norm_op
import fastattn.ops.rms_norm as rms_norm_op
from fastattn.models import GPT, PRESETS, TransformerConfig
from helpers import GRAD_FACTOR, assert_within_naive_error, backends_of


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads cost more than they save (far more on
    a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = TransformerConfig.from_preset("tiny")
VARIANTS = {
    "gpt2": TINY,
    "llama": TINY.replace(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_heads=2, bias=False, d_ff=96),
    "post-norm": TINY.replace(norm_position="post", positions="sinusoidal"),
    "encoder": TINY.replace(causal=False, norm="rmsnorm"),
}


def variant_backends(config, *, with_decode=False):
    """The backends that every op the model uses implements, naive excluded."""
    tables = [
        attention_op.BACKENDS,
        rms_norm_op.BACKENDS if config.norm == "rmsnorm" else layer_norm_op.BACKENDS,
        gated_ffn_op.BACKENDS if config.mlp == "swiglu" else ffn_op.BACKENDS,
    ]
    if with_decode:
        tables.append(decode_op.BACKENDS)
    names = [set(backends_of(t)) for t in tables]
    return [b for b in backends_of(attention_op.BACKENDS) if b != "naive" and all(b in n for n in names)]


# The Triton interpreter is slow: it runs the two variants that between them use every op.
TRITON_VARIANTS = ("gpt2", "llama")


def backend_cases():
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for name, config in VARIANTS.items() for backend in variant_backends(config)
            if backend != "triton" or name in TRITON_VARIANTS]


def test_preset_sizes():
    expected = {"gpt2-small": 124.44e6, "gpt2-medium": 354.82e6, "llama-1b": 1235.81e6}
    for name, count in expected.items():
        with torch.device("meta"):
            model = GPT(PRESETS[name])
        assert abs(model.num_parameters() - count) < 0.01e6, name
    llama = PRESETS["llama-1b"]
    assert (llama.norm, llama.mlp, llama.positions, llama.kv_heads) == ("rmsnorm", "swiglu", "rope", 8)
    assert GPT(TINY).num_parameters() < 200_000


def test_config_validation():
    with pytest.raises(ValueError, match="norm must be one of"):
        TINY.replace(norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        TINY.replace(n_kv_heads=3)
    with pytest.raises(ValueError, match="preset must be one of"):
        TransformerConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown TransformerConfig fields"):
        TransformerConfig.from_dict({"d_model": 64, "width": 3})
    assert TransformerConfig.from_dict(VARIANTS["llama"].to_dict()) == VARIANTS["llama"]
    assert TINY.replace(mlp="swiglu").hidden_dim == 256 and TINY.hidden_dim == 256


@pytest.mark.parametrize("variant,backend", backend_cases())
def test_backend_matches_naive_logits_and_gradients(variant, backend):
    """The float64 naive model is the reference; our fp32 error must stay within the
    bounds of the naive fp32 model's (tests/helpers.py)."""
    config = VARIANTS[variant]
    torch.manual_seed(0)
    reference = GPT(config, backend="naive").double()
    naive = GPT(config, backend="naive")
    naive.load_state_dict(reference.state_dict())
    ours = GPT(config, backend=backend)
    ours.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 256, (2, 12))
    targets = torch.randint(0, 256, (2, 12))
    mask = None
    if not config.causal:
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, 9:] = False
    results = {}
    for name, model in (("reference", reference), ("naive", naive), ("ours", ours)):
        logits, loss = model(idx, targets, attention_mask=mask)
        loss.backward()
        results[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert_within_naive_error(results["ours"][0], results["naive"][0], results["reference"][0], what="logits")
    for name in results["ours"][1]:
        assert_within_naive_error(
            results["ours"][1][name], results["naive"][1][name], results["reference"][1][name],
            factor=GRAD_FACTOR, what=f"grad of {name}",
        )


def test_state_dict_is_backend_independent():
    a = GPT(VARIANTS["llama"], backend="naive")
    b = GPT(VARIANTS["llama"], backend="torch")
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-5, rtol=1e-5)
    b.backend = "naive"
    assert all(m.backend == "naive" for m in b.modules() if isinstance(m, fnn._BackendMixin))


def test_pre_norm_block_is_the_textbook_formula():
    model = GPT(TINY).eval()
    block = model.blocks[0]
    x = torch.randn(2, 7, TINY.d_model)
    h = x + block.attn(block.norm1(x))
    expected = h + block.mlp(block.norm2(h))
    hidden, residual = block(x, None)
    torch.testing.assert_close(hidden + residual, expected, atol=1e-5, rtol=1e-5)


def test_post_norm_uses_the_fused_residual_norm(monkeypatch):
    config = VARIANTS["post-norm"]
    model = GPT(config).eval()
    assert model.norm_f is None
    block = model.blocks[0]
    x = torch.randn(2, 7, config.d_model)
    ln = lambda t, norm: F.layer_norm(t, (config.d_model,), norm.weight, norm.bias, config.norm_eps)
    h = ln(x + block.attn(x), block.norm1)  # H = LN(X + Attn(X))
    expected = ln(h + block.mlp(h), block.norm2)
    calls = []
    original = fnn.layer_norm

    def spy(x, weight, bias=None, eps=1e-5, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return original(x, weight, bias, eps, **kwargs)

    monkeypatch.setattr(fnn, "layer_norm", spy)
    out, residual = block(x, None)
    assert residual is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert calls == [True, True]


def test_encoder_padding_does_not_change_real_tokens():
    model = GPT(VARIANTS["encoder"]).eval()
    idx = torch.randint(0, 256, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 8:] = False
    logits, _ = model(idx, attention_mask=mask)
    alone, _ = model(idx[:1, :8])
    torch.testing.assert_close(logits[0, :8], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], model(idx[1:])[0], atol=1e-5, rtol=1e-5)


def test_targets_ignore_index_and_position_limit():
    model = GPT(TINY)
    idx = torch.randint(0, 256, (1, 6))
    targets = torch.full((1, 6), -100)
    targets[0, 2] = 7
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, 2:3], targets[0, 2:3]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="causal"):
        GPT(VARIANTS["encoder"]).new_kv_cache(1, 8)


@pytest.mark.parametrize("variant", ["gpt2", "llama", "post-norm"])
@pytest.mark.parametrize("page_size", [0, 8])
def test_model_kv_cache_equals_full_forward(variant, page_size):
    config = VARIANTS[variant]
    model = GPT(config).eval()
    idx = torch.randint(0, 256, (2, 25))
    with torch.no_grad():
        expected, _ = model(idx)
        cache = model.new_kv_cache(2, 25, page_size=page_size)
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 18), (18, 19), (19, 25))]
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert cache.length == 25


def test_autocast_bf16_forward_backward():
    model = GPT(VARIANTS["llama"])
    idx = torch.randint(0, 256, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("backend", variant_backends(VARIANTS["llama"]))
def test_autocast_fp16_matches_naive(backend):
    """Mixed precision: fp16 activations, fp32 weights and residual stream (float16
    because the Triton interpreter cannot multiply bfloat16)."""
    torch.manual_seed(0)
    naive = GPT(VARIANTS["llama"], backend="naive")
    ours = GPT(VARIANTS["llama"], backend=backend)
    ours.load_state_dict(naive.state_dict())
    idx = torch.randint(0, 256, (1, 8))
    results = []
    for model in (naive, ours):
        with torch.autocast("cpu", dtype=torch.float16):
            logits, loss = model(idx, idx)
        loss.backward()
        results.append((logits.float(), model.embed.weight.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(results[1][1], results[0][1], atol=2e-3, rtol=1e-2)


@pytest.mark.slow
def test_compiled_model_forward_and_backward():
    """torch.compile(fullgraph=True) of the whole model, as fastattn-train --compile runs it."""
    config = VARIANTS["llama"]
    model = GPT(config, backend="torch")
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = compiled(idx, idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager_logits, eager_loss = model(idx, idx)
    eager_loss.backward()
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def cuda_cases():
    if not torch.cuda.is_available():
        return [pytest.param("none", "none", id="no-cuda")]
    device = torch.device("cuda")
    cases = []
    for name in ("gpt2", "llama"):
        config = VARIANTS[name]
        tables = [attention_op.BACKENDS, decode_op.BACKENDS,
                  rms_norm_op.BACKENDS if config.norm == "rmsnorm" else layer_norm_op.BACKENDS,
                  gated_ffn_op.BACKENDS if config.mlp == "swiglu" else ffn_op.BACKENDS]
        for backend in backends_of(attention_op.BACKENDS, device):
            if backend != "naive" and all(backend in backends_of(t, device) for t in tables):
                cases.append(pytest.param(name, backend, id=f"{name}-{backend}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("variant,backend", cuda_cases())
def test_cuda_bf16_training_step_and_cached_decoding(variant, backend):
    """On the GPU, at a realistic width: a bf16-autocast training step of every backend
    against the naive one (same weights), and KV-cache logits against full recompute."""
    config = VARIANTS[variant].replace(d_model=512, n_heads=8, n_kv_heads=2 if variant == "llama" else None,
                                       n_layers=2, max_seq_len=512, d_ff=None)
    torch.manual_seed(0)
    naive = GPT(config, backend="naive", device="cuda")
    ours = GPT(config, backend=backend, device="cuda")
    ours.load_state_dict(naive.state_dict())
    idx = torch.randint(0, 256, (4, 256), device="cuda")
    results = []
    for model in (naive, ours):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        loss.backward()
        results.append((logits.float(), loss.detach(), model.embed.weight.grad.float()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0.1, rtol=0.05)
    torch.testing.assert_close(results[1][1], results[0][1], atol=0.02, rtol=0.01)
    torch.testing.assert_close(results[1][2], results[0][2], atol=2e-3, rtol=0.1)
    ours = ours.to(torch.bfloat16).eval()
    with torch.no_grad():
        full, _ = ours(idx[:, :200])
        cache = ours.new_kv_cache(4, 200, page_size=16 if variant == "llama" else 0)
        parts = [ours(idx[:, :190], kv_cache=cache)[0]] + [
            ours(idx[:, i : i + 1], kv_cache=cache)[0] for i in range(190, 200)
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1).float(), full.float(), atol=0.1, rtol=0.05)
