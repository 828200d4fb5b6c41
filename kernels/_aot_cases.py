"""Named case matrices of fastattn's Triton ops, as data, and how to call one case.

A Case is one call of a public fastattn function (attention, scaled_dot_product_attention,
varlen_attention, decode_attention, layer_norm, rms_norm, ffn, gated_ffn) with the
triton backend: its dtype, sizes and options, and whether its backward runs too.
`build_call(case, make, make_index)` turns it into (function, args, kwargs) with tensors
from `make(shape, dtype, requires_grad)` and integer tensors from `make_index(values)`:
the ahead-of-time compile check (fastattn.kernels.aot) passes stand-in CUDA tensors, a
GPU test passes real ones. MATRICES names the lists:

    all        the compile check: every op, fp16/bf16 (fp32 where the op takes it), head
               dims 64/96/128/256, each option constexpr on its own, and `ci`
    smoke      the GPU run's correctness smoke shapes and quick benchmark shapes
               (benchmarks/device_run.sh: smoke_correctness_cases() + quick_benchmark_cases())
    gpu-tests  an approximation of the gpu-marked tests in tests/test_*.py (see _gpu_tests)
    ci         the part of `all` the CI compile check affords: each kernel's heaviest
               constexpr combinations at head dims 128 and 256

This module imports no triton and no torch at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

OPS = ("attention", "sdpa", "varlen_attention", "decode_attention", "layer_norm", "rms_norm", "ffn", "gated_ffn")
DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    """One call: `op` (OPS), `dtype` ("float16", "bfloat16", "float32"), `params` the
    sizes and options as sorted (name, value) pairs (see build_call for each op's
    names), `backward` whether the backward runs too (all outputs get gradients)."""

    op: str
    dtype: str
    params: tuple
    backward: bool = True

    def get(self, name, default=None):
        return dict(self.params).get(name, default)

    def __str__(self):
        parts = [self.op, DTYPE_NAMES[self.dtype]]
        for name, value in self.params:
            if value is True:
                parts.append(name)
            elif value not in (False, None):
                parts.append(f"{name}={_short(value)}")
        parts.append("fwd+bwd" if self.backward else "fwd")
        return " ".join(parts)


def _short(value) -> str:
    if isinstance(value, tuple):
        if len(value) > 4:
            return f"({value[0]},{value[1]},..{len(value)})"
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def case(op: str, dtype: str, backward: bool = True, **params) -> Case:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    return Case(op, dtype, tuple(sorted(params.items())), backward)


# ----------------------------------------------------------------------------- calling a case


def build_call(c: Case, make: Callable, make_index: Callable):
    """(function, args, kwargs) of the public call for case `c`.

    make(shape, dtype, requires_grad) -> a float/bool tensor on the GPU;
    make_index(values) -> an int32 tensor on the GPU holding `values` (nested lists).
    Parameters, by op (defaults in brackets):
      attention, sdpa: batch [2], heads [8], kv_heads [heads], seqlen_q, seqlen_k [seqlen_q],
        head_dim, head_dim_v [head_dim], causal [False], window (left, right) [None],
        softcap [0], dropout_p [0], alibi None|"heads"|"batch_heads", bias None|"float"|"bool",
        bias_shape: 4 letters of b/h/q/k or 1 for a broadcast dim ["bhqk"], return_lse [False].
        sdpa: fastattn.scaled_dot_product_attention (top-left causal; no window, softcap, alibi).
      varlen_attention: seqlens_q (tuple), seqlens_k [seqlens_q], heads, kv_heads, head_dim,
        causal, window, softcap, dropout_p, alibi.
      decode_attention: batch, heads, kv_heads, q_len [1], head_dim, capacity, page_size
        [None = contiguous cache], seqlens (tuple) [capacity for all], window_left [None],
        softcap, alibi, append [False: k_new / v_new written into the cache first].
      layer_norm, rms_norm: rows, hidden, weight [True], bias [True, layer_norm only],
        residual [False], prenorm [False], residual_in_fp32 [False].
      ffn, gated_ffn: tokens, d_model, d_hidden, d_out [d_model], bias [True, ffn only],
        activation ["gelu" / "silu"], recompute [False].
    """
    import torch

    import fastattn

    dtype = getattr(torch, c.dtype)
    p = dict(c.params)
    grad = c.backward
    if c.op in ("attention", "sdpa"):
        b, h = p.get("batch", 2), p.get("heads", 8)
        hk = p.get("kv_heads", h)
        sq = p["seqlen_q"]
        sk = p.get("seqlen_k", sq)
        d = p["head_dim"]
        dv = p.get("head_dim_v", d)
        q, k, v = (make(shape, dtype, grad) for shape in ((b, h, sq, d), (b, hk, sk, d), (b, hk, sk, dv)))
        bias = None
        if p.get("bias"):
            sizes = {"b": b, "h": h, "q": sq, "k": sk, "1": 1}
            shape = tuple(sizes[letter] for letter in p.get("bias_shape", "bhqk"))
            bias = make(shape, dtype, grad) if p["bias"] == "float" else make(shape, torch.bool, False)
        if c.op == "sdpa":
            kwargs = dict(attn_mask=bias, dropout_p=p.get("dropout_p", 0.0), is_causal=p.get("causal", False),
                          enable_gqa=hk != h)

            def sdpa(*args, **kw):
                with fastattn.use_backend("triton"):
                    return fastattn.scaled_dot_product_attention(*args, **kw)

            return sdpa, (q, k, v), kwargs
        kwargs = dict(causal=p.get("causal", False), window_size=p.get("window") or (-1, -1),
                      softcap=p.get("softcap", 0.0), dropout_p=p.get("dropout_p", 0.0),
                      alibi_slopes=_alibi(p.get("alibi"), b, h, make), attn_bias=bias,
                      return_lse=p.get("return_lse", False), backend="triton")
        return fastattn.attention, (q, k, v), kwargs
    if c.op == "varlen_attention":
        lengths_q = list(p["seqlens_q"])
        lengths_k = list(p.get("seqlens_k", p["seqlens_q"]))
        h = p.get("heads", 8)
        hk = p.get("kv_heads", h)
        d = p["head_dim"]
        q = make((sum(lengths_q), h, d), dtype, grad)
        k, v = (make((sum(lengths_k), hk, d), dtype, grad) for _ in range(2))
        cu_q, cu_k = (make_index([0] + list(_cumsum(lengths))) for lengths in (lengths_q, lengths_k))
        kwargs = dict(causal=p.get("causal", False), window_size=p.get("window") or (-1, -1),
                      softcap=p.get("softcap", 0.0), dropout_p=p.get("dropout_p", 0.0),
                      alibi_slopes=_alibi(p.get("alibi"), len(lengths_q), h, make), backend="triton")
        return fastattn.varlen_attention, (q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)), kwargs
    if c.op == "decode_attention":
        b, h = p["batch"], p.get("heads", 32)
        hk = p.get("kv_heads", h)
        q_len, d, capacity = p.get("q_len", 1), p["head_dim"], p["capacity"]
        page_size = p.get("page_size")
        lengths = list(p.get("seqlens") or [capacity] * b)
        q = make((b, h, q_len, d), dtype, False)
        if page_size is None:
            caches = [make((b, hk, capacity, d), dtype, False) for _ in range(2)]
            table = None
        else:
            pages = math.ceil(capacity / page_size)
            caches = [make((b * pages, hk, page_size, d), dtype, False) for _ in range(2)]
            order = [(i * 7919) % (b * pages) for i in range(b * pages)]  # pages scattered over the pool
            table = make_index([order[i * pages:(i + 1) * pages] for i in range(b)])
        kwargs = dict(block_table=table, window_size=(p.get("window_left") or -1, -1),
                      softcap=p.get("softcap", 0.0), alibi_slopes=_alibi(p.get("alibi"), b, h, make), backend="triton")
        if p.get("append"):
            kwargs.update(k_new=make((b, hk, q_len, d), dtype, False), v_new=make((b, hk, q_len, d), dtype, False))
        return fastattn.decode_attention, (q, *caches, make_index(lengths)), kwargs
    if c.op in ("layer_norm", "rms_norm"):
        rows, hidden = p["rows"], p["hidden"]
        x = make((rows, hidden), dtype, grad)
        weight = make((hidden,), dtype, grad) if p.get("weight", True) else None
        residual = make((rows, hidden), dtype, grad) if p.get("residual") else None
        kwargs = dict(residual=residual, prenorm=p.get("prenorm", False),
                      residual_in_fp32=p.get("residual_in_fp32", False), backend="triton")
        if c.op == "rms_norm":
            return fastattn.rms_norm, (x, weight), kwargs
        bias = make((hidden,), dtype, grad) if p.get("bias", True) else None
        return fastattn.layer_norm, (x, weight, bias), kwargs
    if c.op in ("ffn", "gated_ffn"):
        m, d, hidden = p["tokens"], p["d_model"], p["d_hidden"]
        n = p.get("d_out", d)
        x = make((m, d), dtype, grad)
        if c.op == "gated_ffn":
            weights = (make((hidden, d), dtype, grad), make((hidden, d), dtype, grad), make((n, hidden), dtype, grad))
            kwargs = dict(activation=p.get("activation", "silu"), recompute=p.get("recompute", False),
                          backend="triton")
            return fastattn.gated_ffn, (x, *weights), kwargs
        with_bias = p.get("bias", True)
        w1, w2 = make((hidden, d), dtype, grad), make((n, hidden), dtype, grad)
        b1 = make((hidden,), dtype, grad) if with_bias else None
        b2 = make((n,), dtype, grad) if with_bias else None
        kwargs = dict(activation=p.get("activation", "gelu"), recompute=p.get("recompute", False), backend="triton")
        return fastattn.ffn, (x, w1, b1, w2, b2), kwargs
    raise ValueError(f"no call for op {c.op!r}")


def _alibi(kind, batch, heads, make):
    import torch

    if kind is None:
        return None
    shape = {"heads": (heads,), "batch_heads": (batch, heads)}[kind]
    return make(shape, torch.float32, False)


def _cumsum(values):
    total = 0
    for value in values:
        total += value
        yield total


# ----------------------------------------------------------------------------- the matrices

HALF = ("float16", "bfloat16")
ALL_DTYPES = HALF + ("float32",)
HEAD_DIMS = (64, 96, 128, 256)  # 96: the odd size (padded to 128 inside the kernels)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # fastattn.reference.ACTIVATIONS


def _attention_options(head_dim):
    """Each option constexpr of the attention kernels on its own (plus GQA and an odd length)."""
    return [
        dict(),
        dict(causal=True),
        dict(causal=True, kv_heads=2),
        dict(causal=True, seqlen_q=1000),
        dict(bias="float", bias_shape="1hqk"),
        dict(causal=True, bias="bool", bias_shape="b1qk"),
        dict(causal=True, dropout_p=0.1),
        dict(window=(256, 0)),
        dict(causal=True, softcap=30.0),
        dict(causal=True, alibi="heads"),
    ]


def _all():
    cases = []
    for d in HEAD_DIMS:
        for dtype in HALF:
            for options in _attention_options(d):
                params = dict(batch=2, heads=8, seqlen_q=2048, head_dim=d)
                params.update(options)
                cases.append(case("attention", dtype, **params))
            cases.append(case("varlen_attention", dtype, seqlens_q=(1, 1000, 257, 3000), heads=8, kv_heads=2,
                              head_dim=d, causal=True))
        for options in (dict(causal=True), dict(bias="float", bias_shape="1hqk")):
            cases.append(case("attention", "float32", batch=2, heads=8, seqlen_q=2048, head_dim=d, **options))
    for dtype in HALF:
        cases.append(case("varlen_attention", dtype, seqlens_q=(300, 0, 129), seqlens_k=(257, 40, 500), heads=8,
                          kv_heads=1, head_dim=128, window=(64, 16), softcap=20.0, alibi="batch_heads",
                          dropout_p=0.1))
    cases.append(case("varlen_attention", "float32", seqlens_q=(1, 1000, 257, 3000), heads=8, kv_heads=2,
                      head_dim=128, causal=True))
    for dtype in ALL_DTYPES:
        for d in HEAD_DIMS:
            cases.append(case("decode_attention", dtype, False, batch=1, heads=32, kv_heads=4, head_dim=d,
                              capacity=32768))
            cases.append(case("decode_attention", dtype, False, batch=32, heads=32, kv_heads=4, head_dim=d,
                              capacity=8192, page_size=256))
        cases.append(case("decode_attention", dtype, False, batch=4, heads=32, kv_heads=4, q_len=2, head_dim=128,
                          capacity=5000, page_size=256, seqlens=(2, 300, 4097, 5000), window_left=1000,
                          softcap=30.0, alibi="batch_heads", append=True))
    for op in ("layer_norm", "rms_norm"):
        for dtype in ALL_DTYPES:
            for hidden in (1024, 4096, 5000, 8192, 16384, 65536):
                cases.append(case(op, dtype, rows=4096, hidden=hidden))
                cases.append(case(op, dtype, rows=4096, hidden=hidden, residual=True, prenorm=True))
            cases.append(case(op, dtype, rows=4096, hidden=4096, weight=False, residual=True, prenorm=True,
                              residual_in_fp32=True))
    for dtype in ALL_DTYPES:
        for activation in ACTIVATIONS:
            cases.append(case("ffn", dtype, tokens=4096, d_model=1024, d_hidden=4096, activation=activation))
            cases.append(case("gated_ffn", dtype, tokens=4096, d_model=1024, d_hidden=2816, activation=activation))
        cases.append(case("ffn", dtype, tokens=4096, d_model=1024, d_hidden=4096, bias=False, recompute=True))
        cases.append(case("gated_ffn", dtype, tokens=4096, d_model=1024, d_hidden=2816, recompute=True))
    return cases + [c for c in _ci() if c not in cases]


def smoke_correctness_cases():
    """The GPU run's correctness smoke (device_run.sh, stage 2): fastattn.bench.smoke.SMOKE, the
    list tests/test_gpu_smoke.py runs, for the triton backend in each of its dtypes,
    forward and backward."""
    from fastattn.bench import smoke

    cases = []
    for entry in smoke.SMOKE:
        if "triton" not in entry.backends:
            continue
        sizes = dict(entry.sizes)
        for dtype in smoke.DTYPES:
            if entry.op == "varlen_attention":
                others = {k: v for k, v in sizes.items() if k != "seqlens"}
                cases.append(case(entry.op, dtype, seqlens_q=tuple(sizes["seqlens"]), **others))
            elif entry.op == "decode_attention":
                lengths = tuple(sizes["cache_seqlens"])
                cases.append(case(entry.op, dtype, False, batch=len(lengths), heads=sizes["heads"],
                                  kv_heads=sizes["kv_heads"], q_len=1, head_dim=sizes["head_dim"],
                                  capacity=sizes["capacity"], page_size=sizes["page_size"] or None, seqlens=lengths))
            elif entry.op in ("layer_norm", "rms_norm"):
                cases.append(case(entry.op, dtype, rows=sizes["rows"], hidden=sizes["hidden"],
                                  residual=sizes["residual"], prenorm=sizes["residual"]))
            else:
                cases.append(case(entry.op, dtype, **sizes))
    return cases


def quick_benchmark_cases():
    """The GPU run's quick benchmark (device_run.sh, stage 3: fastattn-bench --preset quick-gpu),
    bf16, forward and backward: each op's quick-gpu sweep called as its triton provider
    calls it (norms with prenorm where a residual is fused, FFNs with biases, decode over
    full caches)."""
    from fastattn.bench.run import PRESETS
    from fastattn.bench.specs import get_spec

    preset = PRESETS["quick-gpu"]
    cases = []
    for op in preset.ops:
        for shape in get_spec(op).sweep(preset.sweep):
            if op == "decode_attention":
                cases.append(case(op, "bfloat16", False, batch=shape["batch"], heads=shape["heads"],
                                  kv_heads=shape["kv_heads"], q_len=shape["q_len"], head_dim=shape["head_dim"],
                                  capacity=shape["cache_len"], page_size=shape["page_size"] or None))
            elif op in ("layer_norm", "rms_norm"):
                cases.append(case(op, "bfloat16", **shape, prenorm=shape["residual"]))
            else:
                cases.append(case(op, "bfloat16", **shape))
    return cases


def _gpu_tests():
    """The gpu-marked tests of tests/test_*.py, approximated: their shapes, dtypes and
    options, run with the default configs (where a test pins a config through
    FASTATTN_<OP>_CONFIG, the pin is left out); tests that repeat a call of another one
    (opcheck, torch.compile, determinism, strides) are left out; the norm tests'
    rotating flag sets are reduced to plain and residual+prenorm per shape."""
    cases = []
    lengths = ((1, 1), (1, 257), (7, 97), (97, 7), (257, 257), (1025, 1025), (257, 1025), (1025, 257))
    for dtype in HALF:  # test_attention.py::test_gpu_sweep
        for d in (40, 64, 80, 96, 128, 192, 256):
            for sq, sk in lengths:
                for causal in (False, True):
                    cases.append(case("attention", dtype, batch=2, heads=4, kv_heads=2, seqlen_q=sq, seqlen_k=sk,
                                      head_dim=d, causal=causal, return_lse=True))
    small = dict(batch=1, heads=4, kv_heads=2, seqlen_q=37, seqlen_k=45, head_dim=32, return_lse=True)
    options = [dict(causal=True), dict(window=(5, 3)), dict(window=(6, -1)), dict(window=(2, 0)),
               dict(softcap=2.0, causal=True), dict(alibi="heads", causal=True), dict(alibi="batch_heads"),
               dict(bias="float", bias_shape="bhqk"), dict(bias="float", bias_shape="1hqk", causal=True),
               dict(bias="float", bias_shape="b11k"), dict(bias="float", bias_shape="11q1"),
               dict(bias="float", bias_shape="1111"), dict(bias="bool", bias_shape="b1qk"),
               dict(bias="bool", bias_shape="11qk"),
               dict(bias="float", bias_shape="1hqk", causal=True, softcap=5.0, alibi="heads", window=(10, -1))]
    for dtype in HALF:  # test_gpu_options, test_gpu_dropout_and_sdpa
        for option in options:
            cases.append(case("attention", dtype, **dict(small, **option)))
        cases.append(case("attention", dtype, **dict(small, dropout_p=0.3, causal=True)))
        cases.append(case("sdpa", dtype, batch=2, heads=8, kv_heads=2, seqlen_q=300, seqlen_k=257, head_dim=128,
                          causal=True))
    for d in (64, 128):  # test_gpu_autotuned_large, test_gpu_fp32_uses_ieee_dots
        for causal in (False, True):
            cases.append(case("attention", "bfloat16", batch=2, heads=16, kv_heads=4, seqlen_q=2048, head_dim=d,
                              causal=causal, return_lse=True))
        cases.append(case("attention", "float32", batch=2, heads=4, kv_heads=2, seqlen_q=257, seqlen_k=300,
                          head_dim=d, causal=True, return_lse=True))
    cases.append(case("attention", "bfloat16", batch=2, heads=8, kv_heads=2, seqlen_q=1000, head_dim=128,
                      causal=True, bias="float", bias_shape="1hqk"))  # test_gpu_backward_is_bitwise_deterministic
    varlen = {"ragged": ((1, 1000, 0, 257, 64, 3000), (1, 1000, 5, 300, 0, 3000)),
              "long": ((4096, 2048), (4096, 2048)),
              "decode-like": ((1,) * 16, tuple(range(100, 1700, 100)))}
    for dtype in HALF:  # test_varlen_attention.py::test_gpu_autotuned, test_gpu_options
        for lengths_q, lengths_k in varlen.values():
            for d in (64, 128):
                for causal in (False, True):
                    cases.append(case("varlen_attention", dtype, seqlens_q=lengths_q, seqlens_k=lengths_k, heads=8,
                                      kv_heads=2, head_dim=d, causal=causal))
        cases.append(case("varlen_attention", dtype, seqlens_q=(300, 0, 129), seqlens_k=(257, 40, 500), heads=8,
                          kv_heads=1, head_dim=96, window=(64, 16), softcap=20.0, alibi="batch_heads"))
    decode = ((1, 32, 4, 1, 128, 16384, None), (4, 32, 4, 1, 128, 4096, 256), (8, 8, 8, 1, 64, 2048, None),
              (2, 32, 4, 4, 128, 8192, 16), (3, 16, 2, 16, 128, 3000, 48), (16, 32, 1, 1, 256, 1024, 64))
    for dtype in HALF:  # test_decode_attention.py::test_gpu_autotuned, test_gpu_options_and_append
        for b, h, hk, q_len, d, capacity, page_size in decode:
            cases.append(case("decode_attention", dtype, False, batch=b, heads=h, kv_heads=hk, q_len=q_len,
                              head_dim=d, capacity=capacity, page_size=page_size))
        options = dict(batch=4, heads=32, kv_heads=4, q_len=2, head_dim=128, capacity=5000, page_size=256,
                       seqlens=(2, 300, 4097, 5000))
        cases.append(case("decode_attention", dtype, False, window_left=1000, softcap=30.0, alibi="batch_heads",
                          **options))
        cases.append(case("decode_attention", dtype, False, append=True, **options))
    for op in ("layer_norm", "rms_norm"):  # norm_cases.py: the cuda device params and test_triton_large_shapes_gpu
        for dtype in ALL_DTYPES:
            for hidden, rows in ((1, 3000), (7, 1531), (64, 517), (1000, 37), (1023, 9), (4096, 5), (5000, 3)):
                cases.append(case(op, dtype, rows=rows, hidden=hidden))
                cases.append(case(op, dtype, rows=rows, hidden=hidden, residual=True, prenorm=True))
            for hidden in (1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536):
                rows = max(16, (1 << 24) // (hidden * 8))
                cases.append(case(op, dtype, rows=rows, hidden=hidden, residual=True, prenorm=True))
                cases.append(case(op, dtype, rows=rows, hidden=hidden))
    for dtype in ALL_DTYPES:  # test_ffn.py, test_gated_ffn.py
        for activation in ACTIVATIONS:
            cases.append(case("ffn", dtype, tokens=1000, d_model=1024, d_hidden=2816, d_out=1000,
                              activation=activation))
            cases.append(case("gated_ffn", dtype, tokens=1000, d_model=1024, d_hidden=2731, d_out=1000,
                              activation=activation))
    for m, d, hidden, n in ((4097, 768, 3072, 768), (1, 4096, 11008, 4096), (333, 1000, 1000, 200)):
        cases.append(case("ffn", "bfloat16", tokens=m, d_model=d, d_hidden=hidden, d_out=n, recompute=True))
        cases.append(case("gated_ffn", "bfloat16", tokens=m, d_model=d, d_hidden=2048 if hidden == 3072 else hidden,
                          d_out=n, recompute=True))
    cases.append(case("ffn", "float32", tokens=512, d_model=1024, d_hidden=4096))
    cases.append(case("ffn", "bfloat16", tokens=256, d_model=512, d_hidden=2048))
    cases.append(case("gated_ffn", "bfloat16", tokens=256, d_model=512, d_hidden=1365))
    return cases


def _ci():
    """The heaviest constexpr combinations of each kernel (the most registers and shared
    memory) at head dims 128 and 256, bf16 and fp32 where fp32 costs more shared memory."""
    cases = []
    for d in (128, 256):
        cases.append(case("attention", "bfloat16", batch=2, heads=8, kv_heads=2, seqlen_q=2048, head_dim=d,
                          causal=True, bias="float", bias_shape="1hqk", dropout_p=0.1, softcap=30.0, alibi="heads",
                          window=(512, 0)))
        cases.append(case("varlen_attention", "bfloat16", seqlens_q=(1, 1000, 257, 3000), heads=8, kv_heads=2,
                          head_dim=d, causal=True))
        cases.append(case("decode_attention", "bfloat16", False, batch=4, heads=32, kv_heads=4, q_len=2,
                          head_dim=d, capacity=5000, page_size=256, seqlens=(2, 300, 4097, 5000), window_left=1000,
                          softcap=30.0, alibi="batch_heads", append=True))
    for op in ("layer_norm", "rms_norm"):
        cases.append(case(op, "bfloat16", rows=4096, hidden=4096, residual=True, prenorm=True))
        cases.append(case(op, "float32", rows=4096, hidden=65536, residual=True, prenorm=True))
    cases.append(case("ffn", "bfloat16", tokens=4096, d_model=1024, d_hidden=4096, activation="gelu_tanh"))
    cases.append(case("gated_ffn", "bfloat16", tokens=4096, d_model=1024, d_hidden=2816))
    return cases


MATRICES = {"all": _all, "smoke": lambda: smoke_correctness_cases() + quick_benchmark_cases(), "gpu-tests": _gpu_tests,
            "ci": _ci}


def matrix(name: str) -> list:
    """The cases of matrix `name` (MATRICES)."""
    if name not in MATRICES:
        raise ValueError(f"matrix must be one of {', '.join(MATRICES)}; got {name!r}")
    return MATRICES[name]()
