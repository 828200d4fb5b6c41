"""The op contract, for every op on every backend that runs here.

For each public op: the output and every gradient against the float64 reference
(FlashAttention's rule, tests/helpers.py), torch.library.opcheck on each registered
`fastattn::<op>_fwd` / `_bwd` call the op makes, torch.compile(fullgraph=True)
forward + backward, and empty inputs. New backends join automatically: the backend
list comes from each op's BackendTable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import attention as attention_op
from fastattn.ops import decode_attention as decode_op
from fastattn.ops import ffn as ffn_op
from fastattn.ops import gated_ffn as gated_ffn_op
from fastattn.ops import layer_norm as layer_norm_op
from fastattn.ops import rms_norm as rms_norm_op
from fastattn.ops import varlen_attention as varlen_op
from helpers import GRAD_FACTOR, assert_within_naive_error, backends_of, forward_is_reference


@dataclass
class Spec:
    """One op: how to make small inputs, call the public op, and call the reference.

    `module` is the op's file in fastattn.ops (its BACKENDS table and registered ops).
    `make(batch)` returns a dict of inputs (tensors and options); float tensors
    listed in `differentiable` get gradients checked. `run(inputs, backend)` calls
    the public op; `reference(inputs)` calls reference.py on the same inputs.
    """

    name: str
    module: object
    make: Callable[[int], dict]
    run: Callable[[dict, str], torch.Tensor]
    reference: Callable[[dict], torch.Tensor]
    differentiable: tuple[str, ...]


def _attention_inputs(batch):
    return dict(
        q=torch.randn(batch, 4, 7, 16), k=torch.randn(batch, 2, 11, 16), v=torch.randn(batch, 2, 11, 16),
        attn_bias=torch.randn(1, 4, 7, 11), causal=True, window_size=(6, -1),
    )


def _attention_reference(i):
    return reference.attention(i["q"], i["k"], i["v"], attn_bias=i["attn_bias"], causal=True, window_size=(6, -1))


def _varlen_inputs(batch):
    lengths_q, lengths_k = [3, 5, 1][:batch], [4, 5, 6][:batch]
    cumsum = lambda ls: torch.tensor([0] + [sum(ls[: i + 1]) for i in range(len(ls))], dtype=torch.int32)
    return dict(
        q=torch.randn(sum(lengths_q), 4, 8), k=torch.randn(sum(lengths_k), 2, 8), v=torch.randn(sum(lengths_k), 2, 8),
        cu_seqlens_q=cumsum(lengths_q), cu_seqlens_k=cumsum(lengths_k),
        max_seqlen_q=max(lengths_q, default=0), max_seqlen_k=max(lengths_k, default=0),
    )


def _decode_inputs(batch):
    return dict(
        q=torch.randn(batch, 4, 2, 16), k_cache=torch.randn(batch, 2, 20, 16), v_cache=torch.randn(batch, 2, 20, 16),
        cache_seqlens=torch.tensor([2, 20, 9][:batch], dtype=torch.int32),
    )


def _norm_inputs(batch, bias=True):
    inputs = dict(x=torch.randn(batch, 3, 40), weight=torch.randn(40), residual=torch.randn(batch, 3, 40))
    if bias:
        inputs["bias"] = torch.randn(40)
    return inputs


def _ffn_inputs(batch):
    return dict(x=torch.randn(batch, 5, 24), w1=torch.randn(40, 24) / 5, b1=torch.randn(40),
                w2=torch.randn(24, 40) / 6, b2=torch.randn(24))


def _gated_inputs(batch):
    return dict(x=torch.randn(batch, 5, 24), w_gate=torch.randn(40, 24) / 5, w_up=torch.randn(40, 24) / 5,
                w_down=torch.randn(24, 40) / 6)


SPECS = [
    Spec("attention", attention_op, _attention_inputs,
         lambda i, b: fastattn.attention(i["q"], i["k"], i["v"], attn_bias=i["attn_bias"], causal=True,
                                         window_size=(6, -1), backend=b),
         _attention_reference, ("q", "k", "v", "attn_bias")),
    Spec("scaled_dot_product_attention", attention_op,
         lambda batch: dict(q=torch.randn(batch, 4, 9, 16), k=torch.randn(batch, 4, 6, 16), v=torch.randn(batch, 4, 6, 16)),
         lambda i, b: _with_backend(b, fastattn.scaled_dot_product_attention, i["q"], i["k"], i["v"], is_causal=True),
         lambda i: reference.attention(i["q"], i["k"], i["v"], causal=True, top_left=True), ("q", "k", "v")),
    Spec("varlen_attention", varlen_op, _varlen_inputs,
         lambda i, b: fastattn.varlen_attention(i["q"], i["k"], i["v"], i["cu_seqlens_q"], i["cu_seqlens_k"],
                                                i["max_seqlen_q"], i["max_seqlen_k"], causal=True, backend=b),
         lambda i: reference.varlen_attention(i["q"], i["k"], i["v"], i["cu_seqlens_q"], i["cu_seqlens_k"], causal=True),
         ("q", "k", "v")),
    Spec("decode_attention", decode_op, _decode_inputs,
         lambda i, b: fastattn.decode_attention(i["q"], i["k_cache"], i["v_cache"], i["cache_seqlens"], backend=b),
         lambda i: reference.decode_attention(i["q"], i["k_cache"], i["v_cache"], i["cache_seqlens"]), ()),
    Spec("layer_norm", layer_norm_op, _norm_inputs,
         lambda i, b: fastattn.layer_norm(i["x"], i["weight"], i["bias"], residual=i["residual"], backend=b),
         lambda i: reference.layer_norm(i["x"], i["weight"], i["bias"], residual=i["residual"]),
         ("x", "weight", "bias", "residual")),
    Spec("rms_norm", rms_norm_op, lambda batch: _norm_inputs(batch, bias=False),
         lambda i, b: fastattn.rms_norm(i["x"], i["weight"], residual=i["residual"], backend=b),
         lambda i: reference.rms_norm(i["x"], i["weight"], residual=i["residual"]), ("x", "weight", "residual")),
    Spec("ffn", ffn_op, _ffn_inputs,
         lambda i, b: fastattn.ffn(i["x"], i["w1"], i["b1"], i["w2"], i["b2"], activation="gelu_tanh", backend=b),
         lambda i: reference.ffn(i["x"], i["w1"], i["b1"], i["w2"], i["b2"], activation_name="gelu_tanh"),
         ("x", "w1", "b1", "w2", "b2")),
    Spec("gated_ffn", gated_ffn_op, _gated_inputs,
         lambda i, b: fastattn.gated_ffn(i["x"], i["w_gate"], i["w_up"], i["w_down"], backend=b),
         lambda i: reference.gated_ffn(i["x"], i["w_gate"], i["w_up"], i["w_down"]),
         ("x", "w_gate", "w_up", "w_down")),
]


def _with_backend(backend, fn, *args, **kwargs):
    with fastattn.use_backend(backend):
        return fn(*args, **kwargs)


def _cases():
    return [pytest.param(spec, backend, id=f"{spec.name}-{backend}")
            for spec in SPECS for backend in backends_of(spec.module.BACKENDS)]


def _reference_cases():
    """_cases() less those with nothing to check against the reference: the naive
    backend's forward is the reference itself, so it stays only where gradients meet
    autograd (decode_attention has no backward)."""
    return [pytest.param(spec, backend, id=f"{spec.name}-{backend}")
            for spec in SPECS for backend in backends_of(spec.module.BACKENDS)
            if not (forward_is_reference(backend) and not spec.differentiable)]


def _prepare(inputs, dtype, spec):
    """Inputs cast to dtype; the differentiable ones become leaves requiring grad."""
    prepared = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype).detach().requires_grad_(key in spec.differentiable)
        prepared[key] = value
    return prepared


def _output_and_grads(fn, inputs, spec, cotangent):
    out = fn(inputs)
    wanted = [inputs[key] for key in spec.differentiable]
    if not wanted:
        return out, []
    cotangent = torch.ones_like(out) if cotangent is None else cotangent.to(out.dtype)
    return out, list(torch.autograd.grad(out, wanted, cotangent))


@pytest.mark.parametrize("spec,backend", _reference_cases())
def test_matches_float64_reference(spec, backend):
    inputs = spec.make(2)
    reference64 = _prepare(inputs, torch.float64, spec)
    ref_out = spec.reference(reference64)
    cotangent = torch.randn_like(ref_out)
    ref_out, ref_grads = _output_and_grads(spec.reference, reference64, spec, cotangent)
    naive_out, naive_grads = _output_and_grads(spec.reference, _prepare(inputs, torch.float32, spec), spec, cotangent)
    ours_out, ours_grads = _output_and_grads(lambda i: spec.run(i, backend), _prepare(inputs, torch.float32, spec),
                                             spec, cotangent)
    assert ours_out.dtype == torch.float32
    if not forward_is_reference(backend):  # the naive forward is naive_out itself
        assert_within_naive_error(ours_out, naive_out, ref_out, what=f"{spec.name} output")
    for key, ours, naive, ref in zip(spec.differentiable, ours_grads, naive_grads, ref_grads):
        assert_within_naive_error(ours, naive, ref, factor=GRAD_FACTOR, what=f"{spec.name} d{key}")


def _record_op_calls(monkeypatch, module, op_name):
    """Wrap the module's registered `<op>_fwd` / `<op>_bwd` so each call is recorded
    (the public function and the autograd backward look them up by module name)."""
    calls = []
    for suffix in ("_fwd", "_bwd"):
        original = getattr(module, op_name + suffix, None)
        if original is None:
            continue

        def recording(*args, _original=original, **kwargs):
            calls.append((_original, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, op_name + suffix, recording)
    return calls


def _strided(inputs):
    """The same values with non-contiguous strides (last dim not innermost)."""
    return {key: value.transpose(0, -1).contiguous().transpose(0, -1)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2 else value
            for key, value in inputs.items()}


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("spec,backend", _cases())
def test_opcheck_every_registered_call(spec, backend, layout, monkeypatch):
    inputs = spec.make(2)
    inputs = _prepare(_strided(inputs) if layout == "strided" else inputs, torch.float32, spec)
    calls = _record_op_calls(monkeypatch, spec.module, _op_name(spec))
    out = spec.run(inputs, backend)
    if spec.differentiable:
        out.backward(torch.randn_like(out))
    names = {op._qualname for op, _, _ in calls}
    assert f"fastattn::{_op_name(spec)}_fwd" in names
    if spec.differentiable:
        assert f"fastattn::{_op_name(spec)}_bwd" in names
    for op, args, kwargs in calls:
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, detached, kwargs)


def _op_name(spec):
    return "attention" if spec.name == "scaled_dot_product_attention" else spec.name


@pytest.mark.parametrize("spec,backend", _cases())
def test_compile_fullgraph_forward_and_backward(spec, backend):
    torch._dynamo.reset()
    inputs = _prepare(spec.make(2), torch.float32, spec)
    eager_out, eager_grads = _output_and_grads(lambda i: spec.run(i, backend), inputs, spec,
                                               None)
    compiled = torch.compile(lambda i: spec.run(i, backend), fullgraph=True, backend="aot_eager")
    out, grads = _output_and_grads(compiled, inputs, spec, None)
    torch.testing.assert_close(out, eager_out)
    for ours, expected in zip(grads, eager_grads):
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("attention", "layer_norm", "ffn")], ids=lambda s: s.name)
def test_compile_with_inductor(spec):
    """One full inductor compile per op family (the rest use aot_eager to save CI time),
    on non-contiguous inputs: inductor checks the real output strides against the fakes."""
    torch._dynamo.reset()
    inputs = _prepare(_strided(spec.make(2)), torch.float32, spec)
    eager_out, eager_grads = _output_and_grads(lambda i: spec.run(i, None), inputs, spec, None)
    compiled = torch.compile(lambda i: spec.run(i, None) * 2, fullgraph=True)
    out, grads = _output_and_grads(compiled, inputs, spec, None)
    torch.testing.assert_close(out, eager_out * 2)
    for ours, expected in zip(grads, eager_grads):
        torch.testing.assert_close(ours, expected * 2)


@pytest.mark.parametrize("spec,backend", _cases())
def test_empty_batch_gives_empty_output(spec, backend):
    inputs = _prepare(spec.make(0), torch.float32, spec)
    out = spec.run(inputs, backend)
    expected = spec.reference(inputs)
    assert out.shape == expected.shape and out.numel() == 0
    if spec.differentiable:
        out.sum().backward()
        for key in spec.differentiable:
            assert inputs[key].grad is not None and inputs[key].grad.shape == inputs[key].shape


@pytest.mark.parametrize("backend", backends_of(attention_op.BACKENDS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 6), (5, 0), (0, 0)])
def test_attention_zero_length_sequences(backend, seqlen_q, seqlen_k):
    """seqlen 0: empty output for no queries; no keys means every row is fully
    masked: output 0, lse -inf where the backend returns it, zero gradients."""
    q = torch.randn(2, 4, seqlen_q, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, seqlen_k, 8, requires_grad=True) for _ in range(2))
    out = fastattn.attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (2, 4, seqlen_q, 8) and (out.numel() == 0 or out.abs().max() == 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and (q.grad.numel() == 0 or q.grad.abs().max() == 0)
    if backend != "torch":
        _, lse = fastattn.attention(q, k, v, return_lse=True, backend=backend)
        assert lse.shape == (2, 4, seqlen_q) and (seqlen_k > 0 or torch.isneginf(lse).all())
