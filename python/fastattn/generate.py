"""Sample from a trained reference Transformer: `fastattn-generate`.

    fastattn-generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 200

With the KV cache (the default), the prompt is run once (prefill) and every new token
attends to the cached keys and values through fastattn.decode_attention; --no-cache
reruns the whole sequence each step (the reference the cache must equal).
--page-size N keeps the cache in pages of N positions (decode_attention's paged layout).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
from torch import Tensor

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

    The model runs in eval mode (restored after). With use_cache, prompt + new tokens
    must fit the model's max_seq_len for learned positions; without, the context is
    cropped to the last max_seq_len tokens as in nanoGPT.
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
        if not use_cache:
            limit = model.config.max_seq_len if model.config.positions == "learned" else None
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a fastattn-train --out directory or checkpoint.pt")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="fastattn backend of every op (default: auto)")
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


def main(argv: Optional[list[str]] = None) -> None:
    from .train import load_model

    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise SystemExit("fastattn-generate: --max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model = load_model(args.checkpoint, device=device, backend=args.backend, dtype=getattr(torch, dtype_name))
    if not model.config.causal:
        raise SystemExit("fastattn-generate: this checkpoint is a bidirectional (masked-objective) model")
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(args.prompt) or [ByteTokenizer.EOS]
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)  # (N, T)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   top_p=args.top_p, use_cache=not args.no_cache, page_size=args.page_size,
                   generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))
    new_tokens = args.max_new_tokens * args.num_samples
    print(f"fastattn-generate: {new_tokens} new tokens in {seconds:.2f} s "
          f"({new_tokens / max(seconds, 1e-9):,.1f} tokens/s, {'no cache' if args.no_cache else 'KV cache'}, "
          f"{device}, {dtype_name})", file=sys.stderr)


if __name__ == "__main__":
    main()
