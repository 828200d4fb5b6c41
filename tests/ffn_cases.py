"""Shared machinery of tests/test_ffn.py and tests/test_gated_ffn.py: the shapes and
devices, leaves and gradient runs, the check of one call (output and every gradient)
against the float64 reference, and the checks both files run alike (recompute against
saved pre-activations, an empty batch, torch.compile against eager)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import fastattn
from fastattn import reference
from helpers import GRAD_FACTOR, assert_within_naive_error, forward_is_reference

ACTIVATIONS = reference.ACTIVATIONS
# (tokens, d_model, d_hidden, d_out): odd sizes, none a multiple of the interpreter's tile
SHAPES = [(1, 24, 40, 24), (7, 40, 136, 72), (33, 72, 96, 40), (100, 24, 136, 24)]
GPU = torch.device("cuda")
# where the triton backend runs in this session: the GPU, else the interpreter on CPU
TRITON_DEVICE = GPU if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class FfnOp:
    """One of the two ops: its public function, its float64 reference and the names of its
    tensor inputs in order (whose gradients the checks compare)."""

    public: Callable
    ref: Callable
    grad_names: tuple[str, ...]


FFN = FfnOp(fastattn.ffn, reference.ffn, ("x", "w1", "b1", "w2", "b2"))
GATED_FFN = FfnOp(fastattn.gated_ffn, reference.gated_ffn, ("x", "w_gate", "w_up", "w_down"))


def as_leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def run(fn, tensors, cotangent):
    """fn(*tensors) and the gradients of <fn(...), cotangent> wrt the tensors (None stays None)."""
    out = fn(*tensors)
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(out, present, cotangent.to(out.dtype)))
    return out, [None if t is None else next(grads) for t in tensors]


def check_against_reference(op: FfnOp, inputs, dtype, backend, activation, recompute=False):
    """Our output and gradients within the naive same-precision error of the float64 reference."""
    ref_fn = lambda *t: op.ref(*t, activation_name=activation)  # noqa: E731
    ref_out = ref_fn(*as_leaves(inputs, torch.float64))
    cotangent = torch.randn_like(ref_out)
    ref_out, ref_grads = run(ref_fn, as_leaves(inputs, torch.float64), cotangent)
    naive_out, naive_grads = run(ref_fn, as_leaves(inputs, dtype), cotangent)
    ours_out, ours_grads = run(
        lambda *t: op.public(*t, activation=activation, recompute=recompute, backend=backend),
        as_leaves(inputs, dtype), cotangent)
    assert ours_out.dtype == dtype
    if not forward_is_reference(backend):  # the naive forward is naive_out itself: only its backward is checked
        assert_within_naive_error(ours_out, naive_out, ref_out, what=f"{backend} {activation} y")
    for name, ours, naive, ref in zip(op.grad_names, ours_grads, naive_grads, ref_grads):
        assert (ours is None) == (ref is None), name
        if ref is not None:
            assert ours.dtype == dtype
            assert_within_naive_error(ours, naive, ref, factor=GRAD_FACTOR, what=f"{backend} {activation} d{name}")


def check_recompute_matches_saved(op: FfnOp, inputs, cotangent, activation, backend):
    """recompute=True gives bitwise the output and gradients of recompute=False (fp32)."""
    results = [run(lambda *t: op.public(*t, activation=activation, recompute=r, backend=backend),
                   as_leaves(inputs, torch.float32), cotangent) for r in (False, True)]
    (saved_out, saved_grads), (recomputed_out, recomputed_grads) = results
    torch.testing.assert_close(recomputed_out, saved_out, rtol=0, atol=0)
    for name, a, b in zip(op.grad_names, recomputed_grads, saved_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name}")


def check_no_tokens(op: FfnOp, make_inputs, backend):
    """An empty batch: empty output, zero weight (and bias) gradients."""
    leaves = as_leaves(make_inputs(0, 24, 40, 24), torch.float32)
    y = op.public(*leaves, backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    for t in leaves[1:]:
        assert torch.equal(t.grad, torch.zeros_like(t))


def check_compiled_matches_eager(fn, inputs, cotangent, dtype=torch.float32, compile_options=None,
                                 **grad_tolerance):
    """torch.compile(fn, fullgraph=True, **compile_options): the output as eager's (default
    tolerance) and the gradients within grad_tolerance (default: assert_close's)."""
    eager_out, eager_grads = run(fn, as_leaves(inputs, dtype), cotangent)
    compiled = torch.compile(fn, fullgraph=True, **(compile_options or {}))
    out, grads = run(compiled, as_leaves(inputs, dtype), cotangent)
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, **grad_tolerance)


# Tile edges: every GEMM here masks the tails of M, N and K against its tiles and counts
# tiles with cdiv (kernels/ffn.py). The sweep pins 16×16×16 tiles (groups of 2 tile rows)
# and takes each size of (tokens, d_model, d_hidden, d_out) through every residue modulo
# 16 once, each size in its own order (residue a·r + b for r = 0..15, a odd), one tile or
# two, so that every GEMM of the forward and the backward meets every residue of its M, N
# and K (tokens is M forward and K for the weight gradients; d_hidden is N, then K, ...).
EDGE_BLOCK = 16
EDGE_CONFIG = f"BLOCK_M={EDGE_BLOCK},BLOCK_N={EDGE_BLOCK},BLOCK_K={EDGE_BLOCK},GROUP_M=2"
EDGE_ORDERS = ((1, 0), (5, 3), (3, 7), (7, 1))  # (a, b) of tokens, d_model, d_hidden, d_out


def edge_shapes() -> list[tuple[int, int, int, int]]:
    shapes = []
    for r in range(EDGE_BLOCK):
        sizes = []
        for i, (a, b) in enumerate(EDGE_ORDERS):
            size = (a * r + b) % EDGE_BLOCK + EDGE_BLOCK * ((r + i) % 2)
            sizes.append(size or EDGE_BLOCK)
        shapes.append(tuple(sizes))
    return shapes


def edge_failures(check) -> list[str]:
    """check(shape) for each of edge_shapes(); the shapes that fail, each with its error."""
    failures = []
    for shape in edge_shapes():
        try:
            check(shape)
        except AssertionError as error:
            residues = "/".join(str(size % EDGE_BLOCK) for size in shape)
            failures.append(f"(tokens, d_model, d_hidden, d_out) = {shape} (≡ {residues} mod {EDGE_BLOCK}): "
                            f"{str(error).splitlines()[0]}")
    return failures


# ----------------------------------------------------------------------------- forced autotuning


def force_autotuning(monkeypatch):
    """Make kernels/ffn.py autotune even here (the interpreter never does): the
    FASTATTN_AUTOTUNE switch on, a space of two small configs, and a benchmark that runs
    each config twice on the same buffers (Triton's do_bench runs it many times; the
    interpreter has none) and times it with the host clock. Everything else is the real
    triton.autotune path: pruning, the pre/post hooks that restore buffers, the choice
    of a config and the final launch."""
    import time

    import triton
    from triton.runtime import autotuner

    from fastattn.kernels import _config
    from fastattn.kernels import ffn as kernels

    space = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=1, num_stages=1),
             triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 1}, num_warps=1, num_stages=1)]

    def bench(kernel_call, quantiles):
        start = time.perf_counter()
        kernel_call()
        kernel_call()
        return [time.perf_counter() - start] * len(quantiles)

    monkeypatch.delenv(_config.FFN_CONFIG_ENV, raising=False)
    monkeypatch.setattr(_config, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_config, "ffn_configs", lambda kernel, family: list(space))
    monkeypatch.setattr(kernels, "_tuned", {})
    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(lambda self: bench))
    benched = []
    real_bench = autotuner.Autotuner._bench

    def counting_bench(self, *args, config, **meta):
        benched.append(self.base_fn.__name__)
        return real_bench(self, *args, config=config, **meta)

    monkeypatch.setattr(autotuner.Autotuner, "_bench", counting_bench)
    return benched
