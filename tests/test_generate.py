"""Generation: the KV cache (contiguous and paged, through decode_attention) gives the
tokens that recomputing the whole sequence gives; sampling filters; the CLI."""

import pytest
import torch

import fastattn.ops.attention as attention_op
import fastattn.ops.decode_attention as decode_op
from fastattn import generate as gen
from fastattn import train as train_mod
from fastattn.models import GPT, TransformerConfig
from fastattn.models.tokenizer import ByteTokenizer
from helpers import backends_of


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads cost more than they save (far more on
    a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = TransformerConfig.from_preset("tiny")
LLAMA = TINY.replace(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_heads=2, bias=False, d_ff=96)


def cache_backends():
    decode = backends_of(decode_op.BACKENDS)
    return [b for b in backends_of(attention_op.BACKENDS) if b in decode]


CASES = [
    ("gpt2-short", TINY, 5, 0),  # a short prompt: the prefill itself runs through decode_attention
    ("llama-long", LLAMA, 21, 0),  # a long prompt: dense prefill, then decode steps
    ("llama-paged", LLAMA, 7, 4),  # a paged cache
    ("post-norm-paged", TINY.replace(norm_position="post", positions="sinusoidal"), 18, 8),
]


def generation_cases():
    """Every case on every backend, but only the paged Llama case under the (slow) Triton
    interpreter."""
    return [pytest.param(backend, config, prompt_len, page_size, id=f"{name}-{backend}")
            for name, config, prompt_len, page_size in CASES for backend in cache_backends()
            if backend != "triton" or name == "llama-paged"]


@pytest.mark.parametrize("backend,config,prompt_len,page_size", generation_cases())
def test_greedy_generation_with_cache_equals_without(backend, config, prompt_len, page_size):
    torch.manual_seed(0)
    model = GPT(config, backend=backend)
    # A larger init spreads the logits so that greedy choices are not near-ties.
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    # The interpreter is slow: for triton, the prefill and one decode step of one sequence.
    batch, new = (1, 2) if backend == "triton" else (2, 20)
    idx = torch.randint(0, 256, (batch, prompt_len))
    with_cache = gen.generate(model, idx, new, temperature=0, page_size=page_size)
    without = gen.generate(model, idx, new, temperature=0, use_cache=False)
    assert with_cache.shape == (batch, prompt_len + new)
    assert torch.equal(with_cache[:, :prompt_len], idx)
    assert torch.equal(with_cache, without)
    assert model.training  # generate() restores the mode it found


def test_sampling_with_cache_equals_without_in_float64():
    model = GPT(LLAMA).double()
    idx = torch.randint(0, 256, (3, 9))
    kwargs = dict(temperature=0.9, top_k=50, top_p=0.9)
    a = gen.generate(model, idx, 24, generator=torch.Generator().manual_seed(3), **kwargs)
    b = gen.generate(model, idx, 24, use_cache=False, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a, b)
    c = gen.generate(model, idx, 24, generator=torch.Generator().manual_seed(4), **kwargs)
    assert not torch.equal(a, c)


def test_filters_and_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()
    assert kept(gen.filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(gen.filter_logits(logits, top_p=0.75)) == [True, True, False, False]
    assert kept(gen.filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert kept(gen.filter_logits(logits, top_p=0.1)) == [True, False, False, False]
    assert gen.sample_next(logits, temperature=0).tolist() == [0]
    draws = gen.sample_next(logits.expand(4000, 4), temperature=1.0, top_k=3,
                            generator=torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=4).float() / 4000
    assert share[3] == 0 and abs(share[0] - 0.5 / 0.95) < 0.03
    with pytest.raises(ValueError, match="temperature"):
        gen.sample_next(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        gen.sample_next(logits, top_p=0)


@pytest.mark.parametrize("prompt_len,new,page_size", [(12, 30, 0), (21, 25, 4), (3, 16, 0)])
def test_generation_past_the_context_slides_a_window(prompt_len, new, page_size):
    """Learned positions end at max_seq_len (16 here): with the cache, generation goes
    on past it (it used to raise), each token sampled from the context
    windowed_contexts names, which recomputing without the cache confirms."""
    config = TINY.replace(max_seq_len=16)
    model = GPT(config).double()
    for p in model.parameters():  # spread the logits: greedy choices are not near-ties
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    idx = torch.randint(0, 256, (2, prompt_len))
    out = gen.generate(model, idx, new, temperature=0, page_size=page_size)
    assert out.shape == (2, prompt_len + new) and torch.equal(out[:, :prompt_len], idx)
    contexts = gen.windowed_contexts(prompt_len, new, config.max_seq_len)
    assert all(end - start <= config.max_seq_len for start, end in contexts)
    assert contexts[-1][0] > 0  # the window has moved
    model.eval()
    for step, (start, end) in enumerate(contexts):
        expected = model(out[:, start:end])[0][:, -1].argmax(-1)
        assert torch.equal(out[:, prompt_len + step], expected), step
    # Without the cache the window slides by one every step (nanoGPT's crop).
    cropped = gen.generate(model, idx, new, temperature=0, use_cache=False)
    assert cropped.shape == out.shape


def test_printing_escapes_control_bytes():
    ids = list("ok\tfine\n".encode()) + [27, ord("["), ord("2"), ord("J"), 0, 0xFF, ByteTokenizer.EOS] + \
        list("é".encode())
    text = gen.decode_for_display(ids)
    assert text == "ok\tfine\n\\x1b[2J\\x00\\xffé"
    assert all(ch.isprintable() or ch in "\n\t" for ch in text)


def test_cli_generates_from_a_checkpoint(tmp_path, capsys):
    model = GPT(TINY)
    train_mod.save_checkpoint(tmp_path / train_mod.CHECKPOINT_NAME, {
        "format": train_mod.CHECKPOINT_FORMAT, "config": TINY.to_dict(), "model": model.state_dict(),
        "step": 0,
    })
    gen.main(["--checkpoint", str(tmp_path), "--prompt", "def f(", "--max-new-tokens", "12", "--device", "cpu",
              "--seed", "1", "--top-k", "20", "--top-p", "0.95", "--num-samples", "2", "--page-size", "4"])
    out = capsys.readouterr()
    assert out.out.count("def f(") == 2 and "--- sample 2" in out.out
    assert "24 new tokens" in out.err
    gen.main(["--checkpoint", str(tmp_path), "--prompt", "x", "--max-new-tokens", "3", "--device", "cpu",
              "--temperature", "0", "--no-cache"])
    assert "no cache" in capsys.readouterr().err
    assert gen.main(["--checkpoint", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("fastattn-generate: error: --checkpoint: no checkpoint at")
