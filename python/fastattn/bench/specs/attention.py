"""attention: the TARGETS.md sweep b·s = 16k tokens, h·d = 2048, d = 64/128, causal
and not, s = 512..16k; forward, backward and forward + backward; TFLOP/s."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import reference
from ...ops import attention as attention_op
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

# Elements of fp32 score matrix the reference materializes at once (512 MiB).
REFERENCE_SCORES_BUDGET = 2**27


def _shape(batch, heads, seqlen, head_dim, causal, kv_heads=None):
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads or heads, "seqlen_q": seqlen,
            "seqlen_k": seqlen, "head_dim": head_dim, "causal": causal}


def _targets_shape(seqlen, head_dim, causal, tokens=16384, width=2048):
    return _shape(max(1, tokens // seqlen), width // head_dim, seqlen, head_dim, causal)


class AttentionSpec(OpSpec):
    def sweep(self, kind):
        # head_dim 128 first: the headline targets, measured first if the time budget runs short.
        if kind == "full":
            return [_targets_shape(s, d, c) for d in (128, 64) for c in (False, True)
                    for s in (512, 1024, 2048, 4096, 8192, 16384)]
        if kind == "quick":
            return [_targets_shape(s, d, c) for d in (128, 64) for c in (False, True) for s in (1024, 4096)]
        if kind == "quick-gpu":
            return [_targets_shape(s, d, c) for d in (128, 64) for c in (False, True) for s in (1024, 4096, 16384)]
        if kind == "cpu":
            return [_shape(2, 4, s, 64, c) for c in (False, True) for s in (128, 256, 512)]
        return [_shape(2, 4, s, 32, c) for c in (False, True) for s in (64, 128)]

    def make_inputs(self, shape, dtype, device, generator):
        b, h, hk, sq, sk, d = (shape[k] for k in ("batch", "heads", "kv_heads", "seqlen_q", "seqlen_k", "head_dim"))
        return {"q": randn((b, h, sq, d), dtype, device, generator),
                "k": randn((b, hk, sk, d), dtype, device, generator),
                "v": randn((b, hk, sk, d), dtype, device, generator)}

    def output_shape(self, shape):
        return (shape["batch"], shape["heads"], shape["seqlen_q"], shape["head_dim"])

    def reference(self, inputs, shape, dout):
        q, k, v = (inputs[n] for n in ("q", "k", "v"))
        batch, heads, seqlen_q, _ = q.shape
        kv_heads, seqlen_k = k.shape[1], k.shape[2]
        group = heads // kv_heads
        per_kv_head = group * seqlen_q * seqlen_k
        kv_chunk = max(1, min(kv_heads, REFERENCE_SCORES_BUDGET // max(per_kv_head, 1)))
        batch_chunk = max(1, min(batch, REFERENCE_SCORES_BUDGET // max(per_kv_head * kv_heads, 1))) \
            if kv_chunk == kv_heads else 1
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
        grads = {n: torch.empty(t.shape, dtype=torch.float32, device=t.device) for n, t in inputs.items()} \
            if dout is not None else {}
        for b0 in range(0, batch, batch_chunk):
            bs = slice(b0, min(batch, b0 + batch_chunk))
            for j0 in range(0, kv_heads, kv_chunk):
                ks = slice(j0, min(kv_heads, j0 + kv_chunk))
                qs = slice(j0 * group, min(kv_heads, j0 + kv_chunk) * group)
                parts = {"q": q[bs, qs], "k": k[bs, ks], "v": v[bs, ks]}
                parts = {n: t.float().detach().requires_grad_(dout is not None) for n, t in parts.items()}
                with torch.enable_grad():
                    o = reference.attention(parts["q"], parts["k"], parts["v"], causal=shape["causal"])
                    if dout is not None:
                        dq, dk, dv = torch.autograd.grad(o, [parts["q"], parts["k"], parts["v"]],
                                                         dout[bs, qs].float())
                        grads["q"][bs, qs], grads["k"][bs, ks], grads["v"][bs, ks] = dq, dk, dv
                out[bs, qs] = o.detach()
        return StoredReference((out,), grads)

    def label(self, shape):
        causal = "causal" if shape["causal"] else "non-causal"
        gqa = f" kv_heads={shape['kv_heads']}" if shape["kv_heads"] != shape["heads"] else ""
        return f"b={shape['batch']} h={shape['heads']}{gqa} s={shape['seqlen_q']} d={shape['head_dim']} {causal}"

    def group_keys(self):
        return ("head_dim", "causal")


def _bottom_right_ok(shape):
    if shape["causal"] and shape["seqlen_q"] != shape["seqlen_k"]:
        raise Skip("SDPA's is_causal is top-left aligned; fastattn's causal is bottom-right when seqlen_q != seqlen_k")


def naive(shape, dtype, device):
    causal = shape["causal"]
    return Provider("naive", lambda x: reference.attention(x["q"], x["k"], x["v"], causal=causal))


def _sdpa_fn(shape):
    causal, gqa = shape["causal"], shape["heads"] != shape["kv_heads"]

    def fn(x):
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal, enable_gqa=gqa)

    return fn


def torch_sdpa(shape, dtype, device):
    _bottom_right_ok(shape)
    return Provider("torch", _sdpa_fn(shape), note="F.scaled_dot_product_attention, default dispatch")


# The math backend materializes the score matrix, as naive does; past this length it
# only repeats naive's story at a large cost in time and memory.
MATH_MAX_SEQLEN = 4096


def sdpa_backend(name):
    def factory(shape, dtype, device):
        require_cuda(device, f"an SDPA backend on its own ({name})")
        _bottom_right_ok(shape)
        if name == "torch-math" and max(shape["seqlen_q"], shape["seqlen_k"]) > MATH_MAX_SEQLEN:
            raise Skip(f"the math backend materializes the score matrix like naive; not run above "
                       f"seqlen {MATH_MAX_SEQLEN} to keep the sweep short")
        context = sdpa_backend_context(name)
        inner = _sdpa_fn(shape)

        def fn(x):
            with context():
                return inner(x)

        return Provider(name, fn, note=f"SDPA with only {SDPA_PROVIDERS[name]}")

    return factory


def _bshd(x):
    """Same logical (b, h, s, d) tensors laid out as (b, s, h, d) in memory."""
    return {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in x.items()}


def flash_attn(shape, dtype, device):
    require_cuda(device, "flash-attn")
    module = optional_import("flash_attn")
    if dtype not in (torch.float16, torch.bfloat16):
        raise Skip("flash-attn runs fp16 and bf16 only")
    causal = shape["causal"]

    def fn(x):
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))  # (b, s, h, d)
        return module.flash_attn_func(q, k, v, causal=causal).transpose(1, 2)  # (b, h, s, d)

    return Provider("flash-attn", fn, prepare=_bshd, note=f"flash_attn {getattr(module, '__version__', '?')}")


def fastattn_backend(name):
    def factory(shape, dtype, device):
        fastattn_backend_check(attention_op, name, device)
        causal = shape["causal"]
        return Provider(name, lambda x: attention_op.attention(x["q"], x["k"], x["v"], causal=causal, backend=name))

    return factory


SPEC = AttentionSpec(
    name="attention",
    modes=("fwd", "bwd", "full"),
    x_key="seqlen_q",
    grad_names=("q", "k", "v"),
    providers={
        "naive": naive,
        "torch": torch_sdpa,
        **{name: sdpa_backend(name) for name in SDPA_PROVIDERS},
        "naive-compile": compiled(naive, "naive-compile"),
        "torch-compile": compiled(torch_sdpa, "torch-compile"),
        "flash-attn": flash_attn,
        "triton": fastattn_backend("triton"),
        "cuda": fastattn_backend("cuda"),
    },
)
