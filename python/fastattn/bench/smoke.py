"""The correctness smoke matrix of a GPU run (stage 2 of benchmarks/device_run.sh), as
data, and the runner that evaluates one case.

    python -m fastattn.bench.smoke list [--matrix smoke|tiny]   # the cases, one a line
    python -m fastattn.bench.smoke memcheck                     # one small call of each CUDA kernel

The matrix is every op × BACKENDS × DTYPES at two to four shapes each (SMOKE, for the
GPU), forward and backward, each against the float64 reference with the tests' rule
(tests/helpers.py; tests/test_gpu_smoke.py runs it). TINY holds the same cases at
sizes the Triton interpreter runs in seconds: the CPU dry run of device_run.sh runs it.
MATRICES names both, so that a tool counting the Triton variants a run compiles (the
ahead-of-time compile check, `python -m fastattn.kernels.aot`) reads the same list.

A case's `sizes` are plain numbers, booleans and lists, by op:
    attention          batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, causal
    varlen_attention   seqlens (one per sequence; q and k alike), heads, kv_heads, head_dim, causal
    decode_attention   cache_seqlens (one per sequence), capacity (cache slots per sequence),
                       page_size (0 = contiguous cache), heads, kv_heads, head_dim; q_len 1
    layer_norm, rms_norm   rows, hidden, residual (with a residual: prenorm, both outputs checked)
    ffn, gated_ffn     tokens, d_model, d_hidden, activation
Every case runs with the default Triton configs: nothing here pins or tunes one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

BACKENDS = ("triton", "cuda")
DTYPES = ("float16", "bfloat16")
OPS = ("attention", "varlen_attention", "decode_attention", "layer_norm", "rms_norm", "ffn", "gated_ffn")
# Ops whose Triton kernels use tl.dot, which the interpreter computes wrongly in bfloat16
# (ENVIRONMENT.md): under the interpreter their bf16 cases are skipped, with that reason.
DOT_OPS = ("attention", "varlen_attention", "decode_attention", "ffn", "gated_ffn")
MATRIX_ENV = "FASTATTN_SMOKE_MATRIX"


@dataclass(frozen=True)
class SmokeCase:
    op: str
    name: str
    sizes: Mapping = field(default_factory=dict)
    backends: tuple = BACKENDS  # the backends this case is run on

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}"


def _attention(name, batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, causal, backends=BACKENDS):
    return SmokeCase("attention", name, dict(batch=batch, heads=heads, kv_heads=kv_heads, seqlen_q=seqlen_q,
                                             seqlen_k=seqlen_k, head_dim=head_dim, causal=causal), backends)


def _norms(rows, hidden_sizes):
    return [SmokeCase(op, f"h{hidden}" + ("-residual" if residual else ""),
                      dict(rows=rows, hidden=hidden, residual=residual))
            for op in ("layer_norm", "rms_norm") for hidden in hidden_sizes for residual in (False, True)]


def _ffns(tokens, d_model, d_hidden):
    return [SmokeCase(op, f"{tokens}x{d_model}x{d_hidden}",
                      dict(tokens=tokens, d_model=d_model, d_hidden=d_hidden, activation=activation))
            for op, activation in (("ffn", "gelu"), ("gated_ffn", "silu"))]


# The GPU matrix. Attention: head_dim 64 and 128 on both backends, 256 on Triton only,
# causal and not, GQA, an odd length (seqlen_q < seqlen_k: bottom-right causal);
# varlen: one ragged batch; decode: a contiguous and a paged cache with ragged lengths;
# norms: hidden 4096 and 5000 (not a power of 2) with and without a residual; the FFNs
# at 1024 tokens × d_model 1024 × d_hidden 4096.
SMOKE = (
    _attention("d64", 2, 8, 8, 1024, 1024, 64, False),
    _attention("d128-gqa-causal", 2, 8, 2, 1024, 1024, 128, True),
    _attention("d64-odd-causal", 1, 4, 4, 333, 999, 64, True),
    _attention("d256", 1, 4, 4, 512, 512, 256, False, backends=("triton",)),
    SmokeCase("varlen_attention", "ragged",
              dict(seqlens=[1, 300, 17, 1000, 129], heads=8, kv_heads=2, head_dim=128, causal=True)),
    SmokeCase("decode_attention", "contiguous",
              dict(cache_seqlens=[4096, 1, 1000, 3333], capacity=4096, page_size=0, heads=32, kv_heads=4,
                   head_dim=128)),
    SmokeCase("decode_attention", "paged",
              dict(cache_seqlens=[8192, 5, 2000, 7777], capacity=8192, page_size=256, heads=32, kv_heads=4,
                   head_dim=128)),
    *_norms(1024, (4096, 5000)),
    *_ffns(1024, 1024, 4096),
)

# The same cases at interpreter sizes (the CPU dry run).
TINY = (
    _attention("d32", 1, 2, 2, 64, 64, 32, False),
    _attention("d64-gqa-causal", 1, 4, 2, 48, 48, 64, True),
    _attention("d32-odd-causal", 1, 2, 2, 17, 45, 32, True),
    _attention("d128", 1, 1, 1, 32, 32, 128, False, backends=("triton",)),
    SmokeCase("varlen_attention", "ragged",
              dict(seqlens=[1, 30, 7], heads=2, kv_heads=1, head_dim=32, causal=True)),
    SmokeCase("decode_attention", "contiguous",
              dict(cache_seqlens=[40, 1], capacity=64, page_size=0, heads=4, kv_heads=2, head_dim=32)),
    SmokeCase("decode_attention", "paged",
              dict(cache_seqlens=[70, 3], capacity=80, page_size=16, heads=4, kv_heads=2, head_dim=32)),
    *_norms(8, (64, 100)),
    *_ffns(16, 32, 64),
)

MATRICES = {"smoke": SMOKE, "tiny": TINY}


def matrix_name(device: torch.device) -> str:
    """FASTATTN_SMOKE_MATRIX when set, else smoke on CUDA and tiny elsewhere."""
    import os

    name = os.environ.get(MATRIX_ENV, "").strip() or ("smoke" if device.type == "cuda" else "tiny")
    if name not in MATRICES:
        raise ValueError(f"{MATRIX_ENV} must be one of {', '.join(MATRICES)}; got {name!r}")
    return name


def params(matrix: Sequence[SmokeCase]) -> list[tuple[SmokeCase, str, str]]:
    """(case, backend, dtype) for every run of the matrix, case-major."""
    return [(case, backend, dtype) for case in matrix for backend in case.backends for dtype in DTYPES]


# ----------------------------------------------------------------------------- one case


class SmokeSkip(Exception):
    """This backend cannot run this case here; the message says why."""


@dataclass
class Evaluation:
    """Outputs and gradients of one call, by name: out, out1 (prenorm sum), d<input>."""

    tensors: dict


@dataclass
class SmokeCall:
    """A case made runnable: fp32 master inputs, which of them get gradients, and the
    op call (backend, inputs in the run's dtype) -> output tensor or tuple."""

    inputs: dict
    grad_names: tuple
    call: Callable[[str, dict], object]
    static: dict = field(default_factory=dict)  # integer/index inputs, never converted


def _randn(shape, generator, device, scale=1.0, offset=0.0):
    t = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return t * scale + offset


def build(case: SmokeCase, device: torch.device, seed: int = 0) -> SmokeCall:
    """Random fp32 inputs of the case (never zeros) and its op call."""
    import fastattn

    g = torch.Generator(device=device).manual_seed(seed)
    s = case.sizes
    if case.op == "attention":
        inputs = {"q": _randn((s["batch"], s["heads"], s["seqlen_q"], s["head_dim"]), g, device),
                  "k": _randn((s["batch"], s["kv_heads"], s["seqlen_k"], s["head_dim"]), g, device),
                  "v": _randn((s["batch"], s["kv_heads"], s["seqlen_k"], s["head_dim"]), g, device)}
        return SmokeCall(inputs, ("q", "k", "v"), lambda backend, x: fastattn.attention(
            x["q"], x["k"], x["v"], causal=s["causal"], backend=backend))
    if case.op == "varlen_attention":
        total = sum(s["seqlens"])
        cu = torch.tensor([0] + list(_cumsum(s["seqlens"])), dtype=torch.int32, device=device)
        longest = max(s["seqlens"])
        inputs = {"q": _randn((total, s["heads"], s["head_dim"]), g, device),
                  "k": _randn((total, s["kv_heads"], s["head_dim"]), g, device),
                  "v": _randn((total, s["kv_heads"], s["head_dim"]), g, device)}
        return SmokeCall(inputs, ("q", "k", "v"), lambda backend, x: fastattn.varlen_attention(
            x["q"], x["k"], x["v"], cu, cu, longest, longest, causal=s["causal"], backend=backend))
    if case.op == "decode_attention":
        return _build_decode(s, g, device)
    if case.op in ("layer_norm", "rms_norm"):
        rows, hidden = s["rows"], s["hidden"]
        inputs = {"x": _randn((rows, hidden), g, device),
                  "weight": _randn((hidden,), g, device, scale=0.1, offset=1.0)}
        if case.op == "layer_norm":
            inputs["bias"] = _randn((hidden,), g, device, scale=0.1)
        if s["residual"]:
            inputs["residual"] = _randn((rows, hidden), g, device)
        names = tuple(inputs)
        if case.op == "layer_norm":
            return SmokeCall(inputs, names, lambda backend, x: fastattn.layer_norm(
                x["x"], x["weight"], x["bias"], residual=x.get("residual"), prenorm=s["residual"],
                backend=backend))
        return SmokeCall(inputs, names, lambda backend, x: fastattn.rms_norm(
            x["x"], x["weight"], residual=x.get("residual"), prenorm=s["residual"], backend=backend))
    if case.op in ("ffn", "gated_ffn"):
        m, d, h = s["tokens"], s["d_model"], s["d_hidden"]
        x = _randn((m, d), g, device)
        if case.op == "gated_ffn":
            inputs = {"x": x, "w_gate": _randn((h, d), g, device, scale=d ** -0.5),
                      "w_up": _randn((h, d), g, device, scale=d ** -0.5),
                      "w_down": _randn((d, h), g, device, scale=h ** -0.5)}
            return SmokeCall(inputs, tuple(inputs), lambda backend, t: fastattn.gated_ffn(
                t["x"], t["w_gate"], t["w_up"], t["w_down"], activation=s["activation"], backend=backend))
        inputs = {"x": x, "w1": _randn((h, d), g, device, scale=d ** -0.5), "b1": _randn((h,), g, device, scale=0.1),
                  "w2": _randn((d, h), g, device, scale=h ** -0.5), "b2": _randn((d,), g, device, scale=0.1)}
        return SmokeCall(inputs, tuple(inputs), lambda backend, t: fastattn.ffn(
            t["x"], t["w1"], t["b1"], t["w2"], t["b2"], activation=s["activation"], backend=backend))
    raise ValueError(f"op must be one of {', '.join(OPS)}; got {case.op!r}")


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def _build_decode(s, g, device) -> SmokeCall:
    import fastattn

    lengths = s["cache_seqlens"]
    batch, hk, d, page = len(lengths), s["kv_heads"], s["head_dim"], s["page_size"]
    q = _randn((batch, s["heads"], 1, d), g, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    if page == 0:
        shape, table = (batch, hk, s["capacity"], d), None
    else:
        pages_per_seq = -(-s["capacity"] // page)
        shape = (batch * pages_per_seq, hk, page, d)
        order = torch.randperm(batch * pages_per_seq, generator=g, device=device)
        table = order.reshape(batch, pages_per_seq).to(torch.int32)  # pages in random order
    inputs = {"q": q, "k_cache": _randn(shape, g, device), "v_cache": _randn(shape, g, device)}
    return SmokeCall(inputs, (), lambda backend, x: fastattn.decode_attention(
        x["q"], x["k_cache"], x["v_cache"], seqlens, block_table=table, backend=backend))


def skip_reason(case: SmokeCase, backend: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run `case` in `dtype` here (None: it can, as far as can be
    told before the call; the op itself may still refuse with a ValueError)."""
    from .. import backends

    why = backends.backend_unavailable_reason(backend, device)
    if why is not None:
        return why
    if case.op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {case.op!r}")
    module = __import__(f"fastattn.ops.{case.op}", fromlist=["BACKENDS"])
    if backend not in module.BACKENDS.forward:
        return f"the {backend} backend has no {case.op} kernel"
    if backend == "triton" and backends.triton_interpreter_on() and dtype == torch.bfloat16 and case.op in DOT_OPS:
        return "the Triton interpreter computes bfloat16 tl.dot wrongly (ENVIRONMENT.md): bf16 is checked on a GPU"
    return None


def evaluate(smoke: SmokeCall, backend: str, dtype: torch.dtype, cotangents: Optional[list] = None
             ) -> tuple[Evaluation, list]:
    """Run the call in `dtype` on `backend`: outputs, then the gradients of
    sum(out_i · cotangent_i) with respect to the grad inputs. Cotangents (fp32, one per
    output) are drawn from the outputs' shapes when not given; returns them too."""
    leaves = {n: t.detach().to(dtype).requires_grad_(n in smoke.grad_names) for n, t in smoke.inputs.items()}
    with torch.enable_grad() if smoke.grad_names else torch.no_grad():
        result = smoke.call(backend, leaves)
        outs = list(result) if isinstance(result, tuple) else [result]
        tensors = {("out" if i == 0 else f"out{i}"): o.detach() for i, o in enumerate(outs)}
        if cotangents is None:
            g = torch.Generator(device=outs[0].device).manual_seed(1)
            cotangents = [torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32) for o in outs]
        if smoke.grad_names:
            loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents))
            wanted = [leaves[n] for n in smoke.grad_names]
            grads = torch.autograd.grad(loss, wanted)
            tensors.update({f"d{n}": gr.detach() for n, gr in zip(smoke.grad_names, grads)})
    return Evaluation(tensors), cotangents


def run_case(case: SmokeCase, backend: str, dtype_name: str, device: torch.device
             ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """{tensor name: (ours, naive in the same dtype, float64 reference)} for one case;
    raises SmokeSkip when the backend cannot run it here."""
    dtype = getattr(torch, dtype_name)
    why = skip_reason(case, backend, dtype, device)
    if why is not None:
        raise SmokeSkip(why)
    smoke = build(case, device)
    reference, cotangents = evaluate(smoke, "naive", torch.float64)
    naive, _ = evaluate(smoke, "naive", dtype, cotangents)
    try:
        ours, _ = evaluate(smoke, backend, dtype, cotangents)
    except ValueError as exc:
        if "cannot serve" in str(exc):
            raise SmokeSkip(str(exc).splitlines()[0]) from None
        raise
    return {name: (ours.tensors.get(name), naive.tensors[name], ref)
            for name, ref in reference.tensors.items()}


# ----------------------------------------------------------------------------- memcheck


def memcheck_calls(device: torch.device) -> list[tuple[str, str]]:
    """One small call (forward and backward) of each CUDA kernel, bf16, for
    compute-sanitizer. Returns (call, "ran" or the reason it was skipped)."""
    import fastattn

    from .. import backends

    done = []
    why = backends.backend_unavailable_reason("cuda", device)
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, scale=1.0, offset=0.0):
        return _randn(shape, g, device, scale, offset).to(torch.bfloat16).requires_grad_()

    calls = {
        "attention d64 causal": lambda: fastattn.attention(leaf(1, 2, 67, 64), leaf(1, 2, 67, 64),
                                                           leaf(1, 2, 67, 64), causal=True, backend="cuda"),
        "attention d128 gqa": lambda: fastattn.attention(leaf(1, 4, 130, 128), leaf(1, 2, 130, 128),
                                                         leaf(1, 2, 130, 128), backend="cuda"),
        "layer_norm residual": lambda: fastattn.layer_norm(leaf(9, 1030), leaf(1030, scale=0.1, offset=1.0),
                                                           leaf(1030, scale=0.1), residual=leaf(9, 1030),
                                                           backend="cuda"),
        "rms_norm": lambda: fastattn.rms_norm(leaf(9, 1024), leaf(1024, scale=0.1, offset=1.0), backend="cuda"),
        "ffn": lambda: fastattn.ffn(leaf(9, 48), leaf(72, 48, scale=0.1), leaf(72, scale=0.1),
                                    leaf(48, 72, scale=0.1), leaf(48, scale=0.1), backend="cuda"),
        "gated_ffn": lambda: fastattn.gated_ffn(leaf(9, 48), leaf(72, 48, scale=0.1), leaf(72, 48, scale=0.1),
                                                leaf(48, 72, scale=0.1), backend="cuda"),
    }
    for name, call in calls.items():
        if why is not None:
            done.append((name, f"skipped: {why}"))
            continue
        try:
            out = call()
        except ValueError as exc:
            done.append((name, f"skipped: {str(exc).splitlines()[0]}"))
            continue
        out.float().sum().backward()
        done.append((name, "ran"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.bench.smoke", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="print the cases of a matrix")
    listing.add_argument("--matrix", choices=tuple(MATRICES), default="smoke")
    sub.add_parser("memcheck", help="one small call of each CUDA kernel (run it under compute-sanitizer)")
    args = p.parse_args(argv)
    if args.command == "list":
        matrix = MATRICES[args.matrix]
        for case in matrix:
            print(f"{case.id}: {dict(case.sizes)} backends={','.join(case.backends)}")
        print(f"{args.matrix}: {len(matrix)} cases, {len(params(matrix))} runs ({'/'.join(DTYPES)}), "
              "forward and backward")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    done = memcheck_calls(device)
    for name, what in done:
        print(f"memcheck call {name}: {what}")
    ran = sum(what == "ran" for _, what in done)
    print(f"memcheck calls finished: {ran} of {len(done)} ran on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
