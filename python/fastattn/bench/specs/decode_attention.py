"""decode_attention: one new token per sequence over a KV cache filled to cache_len
(batch 1..64, cache 4k..128k, GQA 8:1), contiguous and paged; forward only; GB/s of
the K and V cache read once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import reference
from ...ops import decode_attention as decode_op
from ..reference import StoredReference
from ..spec import (
    SDPA_PROVIDERS,
    OpSpec,
    Provider,
    Skip,
    compiled,
    fastattn_backend_check,
    optional_import,
    randn,
    require_cuda,
    sdpa_backend_context,
)


def _shape(batch, cache_len, heads=32, kv_heads=4, head_dim=128, page_size=0):
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "q_len": 1, "cache_len": cache_len,
            "head_dim": head_dim, "page_size": page_size}


class DecodeSpec(OpSpec):
    def sweep(self, kind):
        if kind == "full":
            return ([_shape(b, n) for b in (1, 16, 64) for n in (4096, 16384, 65536, 131072)]
                    + [_shape(16, n, page_size=256) for n in (16384, 65536)])
        if kind == "quick":
            return [_shape(b, n) for b in (1, 32) for n in (8192, 65536)] + [_shape(32, 16384, page_size=256)]
        if kind == "quick-gpu":
            return [_shape(b, 32768) for b in (1, 32)] + [_shape(32, 32768, page_size=256)]
        small = dict(heads=8, kv_heads=2, head_dim=64)
        if kind == "cpu":
            return ([_shape(b, n, **small) for b in (1, 4) for n in (1024, 4096)]
                    + [_shape(4, 4096, page_size=64, **small)])
        return [_shape(b, 2048, **small) for b in (1, 4)] + [_shape(4, 2048, page_size=128, **small)]

    def make_inputs(self, shape, dtype, device, generator):
        b, h, hk, q_len, n, d, page = (shape[k] for k in
                                       ("batch", "heads", "kv_heads", "q_len", "cache_len", "head_dim", "page_size"))
        inputs = {"q": randn((b, h, q_len, d), dtype, device, generator),
                  "cache_seqlens": torch.full((b,), n, dtype=torch.int32, device=device)}
        if page == 0:
            inputs["k_cache"] = randn((b, hk, n, d), dtype, device, generator)
            inputs["v_cache"] = randn((b, hk, n, d), dtype, device, generator)
            inputs["block_table"] = None
            return inputs
        pages_per_seq = -(-n // page)
        num_pages = b * pages_per_seq
        inputs["k_cache"] = randn((num_pages, hk, page, d), dtype, device, generator)
        inputs["v_cache"] = randn((num_pages, hk, page, d), dtype, device, generator)
        order = torch.randperm(num_pages, generator=generator, device=device)
        inputs["block_table"] = order.reshape(b, pages_per_seq).to(torch.int32)  # pages in random order
        return inputs

    def output_shape(self, shape):
        return (shape["batch"], shape["heads"], shape["q_len"], shape["head_dim"])

    def reference(self, inputs, shape, dout):
        q, k_cache, v_cache = inputs["q"], inputs["k_cache"], inputs["v_cache"]
        table = inputs["block_table"]
        out = torch.empty(q.shape[:-1] + (v_cache.shape[-1],), dtype=torch.float32, device=q.device)
        for b, length in enumerate(inputs["cache_seqlens"].tolist()):
            k = reference.gather_kv_cache(k_cache, b, length, table).unsqueeze(0).float()  # (1, hk, L, d)
            v = reference.gather_kv_cache(v_cache, b, length, table).unsqueeze(0).float()  # (1, hk, L, dv)
            out[b : b + 1] = reference.attention(q[b : b + 1].float(), k, v, causal=True)
        return StoredReference((out,), {})

    def label(self, shape):
        paged = f" paged({shape['page_size']})" if shape["page_size"] else ""
        return (f"b={shape['batch']} h={shape['heads']}/{shape['kv_heads']} cache={shape['cache_len']} "
                f"d={shape['head_dim']}{paged}")

    def group_keys(self):
        return ("batch", "page_size")


def _contiguous_only(shape, what):
    if shape["page_size"]:
        raise Skip(f"{what} has no paged KV cache")


def naive(shape, dtype, device):
    if shape["page_size"]:
        def paged(x):
            return reference.decode_attention(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"],
                                              block_table=x["block_table"])

        return Provider("naive", paged, note="reference.decode_attention (gathers the pages)")
    # Every sequence fills the cache, so naive attention over the whole cache is the op.
    return Provider("naive", lambda x: reference.attention(x["q"], x["k_cache"], x["v_cache"], causal=True))


def _sdpa_fn(shape):
    gqa = shape["heads"] != shape["kv_heads"]

    def fn(x):
        return F.scaled_dot_product_attention(x["q"], x["k_cache"], x["v_cache"], enable_gqa=gqa)

    return fn


def torch_sdpa(shape, dtype, device):
    _contiguous_only(shape, "F.scaled_dot_product_attention")
    return Provider("torch", _sdpa_fn(shape), note="F.scaled_dot_product_attention over the full cache")


def sdpa_backend(name):
    def factory(shape, dtype, device):
        require_cuda(device, f"an SDPA backend on its own ({name})")
        _contiguous_only(shape, "F.scaled_dot_product_attention")
        context = sdpa_backend_context(name)
        inner = _sdpa_fn(shape)

        def fn(x):
            with context():
                return inner(x)

        return Provider(name, fn)

    return factory


def naive_for_compile(shape, dtype, device):
    _contiguous_only(shape, "the compiled naive decode (reference.decode_attention loops in Python)")
    return naive(shape, dtype, device)


def _cache_bshd(x):
    """Caches laid out as (b, L, hk, d) in memory, logical shape unchanged."""
    out = dict(x)
    for n in ("q", "k_cache", "v_cache"):
        out[n] = x[n].transpose(1, 2).contiguous().transpose(1, 2)
    return out


def flash_attn(shape, dtype, device):
    require_cuda(device, "flash-attn")
    module = optional_import("flash_attn")
    if dtype not in (torch.float16, torch.bfloat16):
        raise Skip("flash-attn runs fp16 and bf16 only")

    def fn(x):
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k_cache", "v_cache"))  # (b, s, h, d)
        out = module.flash_attn_with_kvcache(q, k, v, cache_seqlens=x["cache_seqlens"],
                                             block_table=x["block_table"], causal=True)
        return out.transpose(1, 2)  # (b, h, q_len, d)

    return Provider("flash-attn", fn, prepare=_cache_bshd)


def fastattn_backend(name):
    def factory(shape, dtype, device):
        fastattn_backend_check(decode_op, name, device)

        def fn(x):
            return decode_op.decode_attention(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"],
                                              block_table=x["block_table"], backend=name)

        return Provider(name, fn)

    return factory


SPEC = DecodeSpec(
    name="decode_attention",
    modes=("fwd",),
    x_key="cache_len",
    providers={
        "naive": naive,
        "torch": torch_sdpa,
        **{name: sdpa_backend(name) for name in SDPA_PROVIDERS},
        "naive-compile": compiled(naive_for_compile, "naive-compile"),
        "torch-compile": compiled(torch_sdpa, "torch-compile"),
        "flash-attn": flash_attn,
        "triton": fastattn_backend("triton"),
        "cuda": fastattn_backend("cuda"),
    },
)
