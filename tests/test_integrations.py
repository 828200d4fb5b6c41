"""Drop-in integrations: patch_sdpa, and transformers' attn_implementation="fastattn"
(tiny Llama, GPT-2 and BERT from config, against "eager", left padding included)."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn.integrations.sdpa as sdpa_mod
import fastattn.ops.attention as attention_op
from fastattn.integrations import patch_sdpa
from fastattn.integrations import transformers as fa_hf
from helpers import backends_of, require_module


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads cost more than they save (far more on
    a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- patch_sdpa


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls that reach fastattn.scaled_dot_product_attention."""
    calls = []
    original = sdpa_mod.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_mod, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("backend", backends_of(attention_op.BACKENDS))
def test_patch_sdpa_routes_torch_modules_through_fastattn(backend, sdpa_calls):
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    expected = layer(x, src_mask=causal)
    dx_expected, = torch.autograd.grad(expected.sum(), x)
    original = F.scaled_dot_product_attention
    with patch_sdpa(backend=backend):
        assert F.scaled_dot_product_attention is not original
        out = layer(x, src_mask=causal)
        dx, = torch.autograd.grad(out.sum(), x)
    assert F.scaled_dot_product_attention is original
    assert len(sdpa_calls) == 1  # one self-attention, served by fastattn
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_expected, atol=1e-4, rtol=1e-4)


def test_patch_sdpa_direct_calls_gqa_and_causal(sdpa_calls):
    q, k, v = torch.randn(2, 8, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, enable_gqa=True)
    assert len(sdpa_calls) == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_patch_sdpa_falls_back_to_torch(sdpa_calls):
    q = torch.randn(1, 2, 5, 8)
    expected = F.scaled_dot_product_attention(q, q, q)
    with patch_sdpa(backend="cuda"):  # cannot serve CPU tensors: PyTorch answers instead
        out = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, expected)
    with patch_sdpa():
        # An integer query is rejected by fastattn's checks, and then by PyTorch's own.
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q.long(), q.long(), q.long())
        # A keyword only a future PyTorch knows goes straight to PyTorch.
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, q, q, new_option=1)
    assert len(sdpa_calls) == 2  # the cuda call and the integer call tried fastattn first


def test_patch_sdpa_nests_and_restores_on_error():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with patch_sdpa():
            outer = F.scaled_dot_product_attention
            with patch_sdpa(backend="naive"):
                assert F.scaled_dot_product_attention is not outer
            assert F.scaled_dot_product_attention is outer
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ValueError, match="backend"):
        with patch_sdpa(backend="fastest"):
            pass


def test_patch_sdpa_counts_and_logs_where_calls_went(caplog):
    q = torch.randn(1, 2, 5, 8)
    with caplog.at_level(logging.DEBUG, logger="fastattn.integrations.sdpa"):
        with patch_sdpa() as sdpa:
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            F.scaled_dot_product_attention(q.to("meta"), q.to("meta"), q.to("meta"))
        with patch_sdpa(backend="cuda") as on_cuda:  # cannot serve CPU tensors
            F.scaled_dot_product_attention(q, q, q)
    assert sdpa.counts == {"fastattn": 1, "pytorch": 1}
    assert sdpa.fallbacks == {"query is on meta": 1}
    assert on_cuda.counts == {"fastattn": 0, "pytorch": 1}
    (reason,) = on_cuda.fallbacks
    assert reason.startswith("ValueError:") and "cuda" in reason
    logged = [r.getMessage() for r in caplog.records if r.name == "fastattn.integrations.sdpa"]
    assert logged == ["F.scaled_dot_product_attention -> PyTorch: query is on meta",
                      f"F.scaled_dot_product_attention -> PyTorch: {reason}"]


def test_transformer_encoder_fast_path_never_calls_sdpa():
    """As the README says: nn.TransformerEncoderLayer in eval mode under no_grad takes
    PyTorch's fused fast path, which does not call F.scaled_dot_product_attention."""
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 9, 32)
    with patch_sdpa() as sdpa, torch.no_grad():
        layer(x)
    assert sdpa.counts == {"fastattn": 0, "pytorch": 0}
    with patch_sdpa() as sdpa:
        layer(x)  # gradients wanted: the ordinary path, through F.scaled_dot_product_attention
    assert sdpa.counts == {"fastattn": 1, "pytorch": 0}


# ----------------------------------------------------------------------------- transformers


@pytest.fixture
def hf():
    """The transformers package; its tests skip where it is not installed (fail under CI=true)."""
    return require_module("transformers")


def hf_configs():
    import transformers

    small = dict(vocab_size=128, max_position_embeddings=64)
    return {
        "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          initializer_range=0.3, pad_token_id=0, **small),
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                        initializer_range=0.3, bos_token_id=1, eos_token_id=1, pad_token_id=0),
        "bert": transformers.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, pad_token_id=0, **small),
    }


def hf_pair(name, implementation):
    """An eager model and a copy with attn_implementation=`implementation` (separate
    configs: from_config writes the implementation into the config it is given)."""
    import transformers

    config = hf_configs()[name]
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    eager = auto.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = auto.from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == implementation
    return eager, ours


def output(model, ids, mask):
    result = model(ids, attention_mask=mask)
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


def left_padded_batch():
    ids = torch.randint(2, 128, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def implementation_for(backend):
    name = f"fastattn-test-{backend}"
    fa_hf.register(name, backend=backend)
    return name


def hf_cases():
    """Every model on every backend; under the (slow) Triton interpreter only Llama
    (GQA, rotary), which covers the attention call."""
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for name in ("llama", "gpt2", "bert") for backend in backends_of(attention_op.BACKENDS)
            if backend != "triton" or name == "llama"]


@pytest.mark.parametrize("name,backend", hf_cases())
def test_transformers_models_match_eager(hf, name, backend):
    eager, ours = hf_pair(name, implementation_for(backend))
    ids, mask = left_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expected, got = output(eager, ids, mask), output(ours, ids, mask)
        # Padded positions are meaningless (fully masked rows); only real tokens are compared.
        torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(output(ours, ids, None), output(eager, ids, None), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transformers_generation_and_gradients_match_eager(hf, name):
    fa_hf.register()
    eager, ours = hf_pair(name, "fastattn")
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    real = mask.bool()
    grads = []
    for model in (eager, ours):
        loss = output(model, ids, mask)[real].float().pow(2).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    for g_eager, g_ours in zip(*grads):
        if g_eager is not None:
            torch.testing.assert_close(g_ours, g_eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,expected", [
    ("llama", {"GatedFeedForward": 2, "RMSNorm": 5}),
    ("gpt2", {"Sequential": 2, "LayerNorm": 5}),
    ("bert", {"LayerNorm": 5}),
])
def test_patch_modules_swaps_norms_and_mlps(hf, name, expected):
    fa_hf.register()
    eager, ours = hf_pair(name, "fastattn")
    swapped = fa_hf.patch_modules(ours)
    counts = {}
    for kind in swapped.values():
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == expected
    ids, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(output(ours, ids, mask)[mask.bool()], output(eager, ids, mask)[mask.bool()],
                                   atol=2e-5, rtol=2e-5)
    assert fa_hf.patch_modules(ours) == {}  # already swapped: nothing left to do


def test_transformers_from_pretrained(hf, tmp_path):
    fa_hf.register()
    eager, _ = hf_pair("llama", "fastattn")
    eager.save_pretrained(tmp_path)
    ours = hf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastattn").eval()
    assert ours.config._attn_implementation == "fastattn"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(output(ours, ids, mask)[mask.bool()], output(eager, ids, mask)[mask.bool()],
                                   atol=2e-5, rtol=2e-5)


def test_register_without_transformers_says_what_is_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match="needs transformers"):
        fa_hf.register()


def _fake_transformers(version, **attributes):
    """A stand-in `transformers` module of `version`; a callable attribute named
    `__getattr__` decides what `from transformers import X` finds."""
    import types

    module = types.ModuleType("transformers")
    module.__version__ = version
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def test_register_reports_the_import_error_transformers_raised(monkeypatch):
    """A transformers that fails while importing AttentionInterface (here as a shadowed
    `kernels` package made it fail) is reported with that error, not as too old."""
    import sys

    def broken(name):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)")

    monkeypatch.setitem(sys.modules, "transformers", _fake_transformers("5.25.0", __getattr__=broken))
    with pytest.raises(ImportError) as raised:
        fa_hf.register()
    message = str(raised.value)
    assert "transformers 5.25.0" in message and "cannot import name 'CUDAProperties' from 'kernels'" in message
    assert "or newer" not in message


def test_register_names_a_transformers_too_old(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", _fake_transformers("4.40.2"))
    with pytest.raises(ImportError, match=r"AttentionInterface API \(4\.48 or newer\); this is transformers 4\.40\.2"):
        fa_hf.register()
