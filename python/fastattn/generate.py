"""Sample from a trained reference Transformer: `fastattn-generate`.

    fastattn-generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 200

With the KV cache (the default), the prompt is run once (prefill) and every new token
attends to the cached keys and values through fastattn.decode_attention; --no-cache
reruns the whole sequence each step (the reference the cache must equal).
--page-size N keeps the cache in pages of N positions (decode_attention's paged layout).

A model with learned positions has a context of max_seq_len positions (128 for the
tiny preset). When prompt + new tokens do not fit, generation slides a window: the
cache fills up to max_seq_len, is then rebuilt from the last max_seq_len / 2 tokens
(one prefill), and decoding goes on; the oldest tokens drop out of the context, as
when --no-cache crops the context to the last max_seq_len tokens every step. So all
the tokens asked for come; once the window slides, each sees between max_seq_len / 2
and max_seq_len tokens of context, at one extra prefill per max_seq_len / 2 tokens. The text is printed with
non-printable bytes escaped (\\x1b, \\x00 ...; invalid UTF-8 as \\xNN).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional

import torch
from torch import Tensor

from . import _cli
from ._cli import UsageError
from .backends import BACKENDS
from .models import GPT
from .models.tokenizer import ByteTokenizer


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Logits (B, V) with everything outside the top_k, and outside the smallest set
    whose probability reaches top_p (nucleus), set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass ranked above each token
        drop_sorted = before >= top_p  # the most likely token always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """The next token of each sequence, (B,) int64, from logits (B, V). temperature 0 =
    greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    page_size: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

    The model runs in eval mode (restored after). For learned positions the context is
    max_seq_len: without the cache it is cropped to the last max_seq_len tokens every
    step (as in nanoGPT); with it, a window slides when prompt + new tokens do not fit
    (see the module docstring and windowed_contexts).
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (batch, seqlen) with seqlen >= 1, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        sample = lambda logits: sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                            generator=generator)
        if max_new_tokens == 0:
            return idx
        limit = model.config.max_seq_len if model.config.positions == "learned" else None
        if use_cache and limit is not None and idx.shape[1] + max_new_tokens > limit:
            return _generate_sliding(model, idx, max_new_tokens, limit, page_size, sample)
        if not use_cache:
            for _ in range(max_new_tokens):
                context = idx if limit is None else idx[:, -limit:]  # (B, <= max_seq_len)
                logits, _ = model(context)
                idx = torch.cat((idx, sample(logits[:, -1])[:, None]), dim=1)  # (B, T + 1)
            return idx
        cache = model.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens, page_size=page_size)
        logits, _ = model(idx, kv_cache=cache)  # prefill: (B, T, V)
        tokens = [sample(logits[:, -1])]
        for _ in range(max_new_tokens - 1):
            logits, _ = model(tokens[-1][:, None], kv_cache=cache)  # (B, 1, V)
            tokens.append(sample(logits[:, -1]))
        return torch.cat((idx, torch.stack(tokens, dim=1)), dim=1)  # (B, T + max_new_tokens)
    finally:
        model.train(was_training)


def window_keep(limit: int) -> int:
    """How many of the newest tokens a full window of `limit` positions is rebuilt from."""
    return max(1, limit // 2)


def _generate_sliding(model: GPT, idx: Tensor, max_new_tokens: int, limit: int, page_size: int,
                      sample) -> Tensor:
    """generate() with the KV cache when prompt + new tokens exceed the context `limit`:
    the prefill takes the last `limit` prompt tokens; when the cache is full, it is
    rebuilt from the last window_keep(limit) tokens. Each token is sampled from the
    tokens since the window's start (windowed_contexts spells out which)."""
    out = idx
    cache = model.new_kv_cache(idx.shape[0], limit, page_size=page_size)
    logits, _ = model(idx[:, -limit:], kv_cache=cache)  # (B, <= limit, V)
    for _ in range(max_new_tokens):
        token = sample(logits[:, -1])  # (B,)
        out = torch.cat((out, token[:, None]), dim=1)
        if out.shape[1] - idx.shape[1] == max_new_tokens:
            break
        if cache.length == limit:  # full: a new window from the newest tokens
            cache = model.new_kv_cache(idx.shape[0], limit, page_size=page_size)
            logits, _ = model(out[:, -window_keep(limit):], kv_cache=cache)
        else:
            logits, _ = model(token[:, None], kv_cache=cache)  # (B, 1, V)
    return out


def windowed_contexts(prompt_len: int, max_new_tokens: int, limit: int) -> list[tuple[int, int]]:
    """(start, end) of the tokens each new token of the sliding-window generation is
    sampled from (positions in prompt + output): what _generate_sliding computes with
    the cache, written out without it."""
    contexts, start = [], max(0, prompt_len - limit)
    for end in range(prompt_len, prompt_len + max_new_tokens):
        if end - start > limit:
            start = end - window_keep(limit)
        contexts.append((start, end))
    return contexts


def printable(text: str) -> str:
    """text with every character that is not printable (control bytes, stray escape
    sequences) escaped as \\xNN / \\uNNNN; newlines and tabs stay."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def decode_for_display(ids) -> str:
    """Token ids as printable text: specials dropped, invalid UTF-8 as \\xNN, control
    characters escaped."""
    data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
    return printable(data.decode("utf-8", errors="backslashreplace"))


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog="fastattn-generate", description=__doc__.split("\n\n")[0],
                            formatter_class=_cli.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a fastattn-train --out directory or checkpoint.pt")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="fastattn backend of every op (auto: the fastest that serves each call)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely bytes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--num-samples", type=int, default=1, help="sequences generated side by side")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--page-size", type=int, default=0,
                   help="paged KV cache with pages of N positions (0 = contiguous)")
    return p


def _main(argv: Optional[list[str]]) -> None:
    from .train import load_checkpoint_for_cli, model_from_checkpoint

    args = build_parser().parse_args(argv)
    _cli.check_values([
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
        ("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
         "finite and >= 0 (0 = greedy)"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = all)"),
        ("--top-p", args.top_p, 0.0 < args.top_p <= 1.0, "in (0, 1]"),
        ("--page-size", args.page_size, args.page_size >= 0, ">= 0 (0 = a contiguous cache)"),
        ("--seed", args.seed, args.seed is None or _cli.SEED_RANGE[0] <= args.seed < _cli.SEED_RANGE[1],
         "in [-2**63, 2**64)"),
    ])
    device = _cli.resolve_device(args.device)
    _cli.check_backend_runs(args.backend, device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    payload = load_checkpoint_for_cli(args.checkpoint, "--checkpoint")
    model = model_from_checkpoint(payload, device=device, backend=args.backend, dtype=getattr(torch, dtype_name))
    if not model.config.causal:
        raise UsageError(f"--checkpoint {args.checkpoint} is a bidirectional (masked-objective) model, which cannot "
                         "generate; train with --objective causal")
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(args.prompt) or [ByteTokenizer.EOS]
    limit = model.config.max_seq_len if model.config.positions == "learned" else None
    if limit is not None and len(prompt) + args.max_new_tokens > limit:
        how = ("the context is cropped to the last max_seq_len tokens every step" if args.no_cache else
               f"generating with a sliding window: the KV cache is rebuilt from the last {window_keep(limit)} "
               "tokens whenever it fills")
        print(f"fastattn-generate: prompt ({len(prompt)}) + --max-new-tokens ({args.max_new_tokens}) exceed the "
              f"model's context of {limit} positions; {how}", file=sys.stderr)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)  # (N, T)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p, use_cache=not args.no_cache, page_size=args.page_size,
                       generator=generator)
    except ValueError as exc:
        refusal = _cli.backend_refusal(exc)
        if refusal is None:
            raise
        raise UsageError(f"--backend {args.backend}: {refusal}; pick another --backend or --dtype") from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(decode_for_display(row))
    new_tokens = args.max_new_tokens * args.num_samples
    print(f"fastattn-generate: {new_tokens} new tokens in {seconds:.2f} s "
          f"({new_tokens / max(seconds, 1e-9):,.1f} tokens/s, {'no cache' if args.no_cache else 'KV cache'}, "
          f"{device}, {dtype_name})", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """The fastattn-generate command: exit status 0, or 2 with one line for a user error."""
    return _cli.run("fastattn-generate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
