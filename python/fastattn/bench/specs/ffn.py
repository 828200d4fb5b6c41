"""ffn and gated_ffn: M = 16k tokens, d = 1k..4k, h = 4d (gated: 8d/3 rounded up to a
multiple of 256, as in LLaMA); forward, backward, forward + backward; TFLOP/s. The
provider `gemm-only` runs the bare GEMMs alone (no bias, no activation): the floor
TARGETS.md compares against, not an FFN, so its output is not checked."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import reference
from ...ops import ffn as ffn_op
from ...ops import gated_ffn as gated_ffn_op
from ..reference import StoredReference
from ..spec import (
    OpSpec,
    Provider,
    Skip,
    compiled,
    fastattn_backend_check,
    optional_import,
    randn,
    require_cuda,
    rows_chunked_reference,
)

REFERENCE_CHUNK_TOKENS = 4096


def gated_hidden(d_model: int) -> int:
    return 256 * math.ceil(8 * d_model / 3 / 256)


class FfnSpec(OpSpec):
    gated: bool = False

    def _shape(self, tokens, d_model):
        hidden = gated_hidden(d_model) if self.gated else 4 * d_model
        return {"tokens": tokens, "d_model": d_model, "d_hidden": hidden,
                "activation": "silu" if self.gated else "gelu"}

    def sweep(self, kind):
        if kind == "full":
            return [self._shape(16384, d) for d in (1024, 2048, 4096)]
        if kind == "quick":
            return [self._shape(16384, d) for d in (1024, 4096)]
        if kind == "quick-gpu":
            return [self._shape(16384, 4096)]
        if kind == "cpu":
            return [self._shape(512, d) for d in (128, 256, 512)]
        return [self._shape(256, d) for d in (64, 128)]

    def make_inputs(self, shape, dtype, device, generator):
        m, d, h = shape["tokens"], shape["d_model"], shape["d_hidden"]
        x = randn((m, d), dtype, device, generator)
        if self.gated:
            return {"x": x,
                    "w_gate": randn((h, d), dtype, device, generator, scale=d ** -0.5),
                    "w_up": randn((h, d), dtype, device, generator, scale=d ** -0.5),
                    "w_down": randn((d, h), dtype, device, generator, scale=h ** -0.5)}
        return {"x": x,
                "w1": randn((h, d), dtype, device, generator, scale=d ** -0.5),
                "b1": randn((h,), dtype, device, generator, scale=0.1),
                "w2": randn((d, h), dtype, device, generator, scale=h ** -0.5),
                "b2": randn((d,), dtype, device, generator, scale=0.1)}

    def naive_fn(self, activation):
        if self.gated:
            return lambda x, w_gate, w_up, w_down: reference.gated_ffn(
                x, w_gate, w_up, w_down, activation_name=activation)
        return lambda x, w1, b1, w2, b2: reference.ffn(x, w1, b1, w2, b2, activation_name=activation)

    def output_shape(self, shape):
        return (shape["tokens"], shape["d_model"])

    def reference(self, inputs, shape, dout):
        return StoredReference(*rows_chunked_reference(self.naive_fn(shape["activation"]), inputs, ("x",),
                                                       shape["tokens"], REFERENCE_CHUNK_TOKENS, dout,
                                                       self.grad_names))

    def label(self, shape):
        return f"M={shape['tokens']} d={shape['d_model']} h={shape['d_hidden']} {shape['activation']}"


def naive_for(spec):
    def factory(shape, dtype, device):
        fn = spec.naive_fn(shape["activation"])
        return Provider("naive", lambda x: fn(**x), note="explicit matmuls + written-out activation")

    return factory


def torch_for(spec):
    """nn.Linear's F.linear + the built-in activation."""

    def factory(shape, dtype, device):
        activation = shape["activation"]
        if spec.gated:
            def fn(x):
                gate = F.linear(x["x"], x["w_gate"])
                return F.linear(reference.torch_activation(gate, activation) * F.linear(x["x"], x["w_up"]),
                                x["w_down"])
        else:
            def fn(x):
                hidden = reference.torch_activation(F.linear(x["x"], x["w1"], x["b1"]), activation)
                return F.linear(hidden, x["w2"], x["b2"])

        return Provider("torch", fn, note="F.linear + activation")

    return factory


def gemm_only_for(spec):
    def factory(shape, dtype, device):
        fn = _gated_gemms if spec.gated else _plain_gemms
        return Provider("gemm-only", fn, checked=False,
                        note="the bare GEMMs alone (no bias, no activation): the floor, not an FFN")

    return factory


def _plain_gemms(x):
    return torch.matmul(torch.matmul(x["x"], x["w1"].t()), x["w2"].t())


def _gated_gemms(x):
    # addmm joins the two branches inside the second GEMM (cuBLAS adds C in its epilogue).
    joined = torch.addmm(torch.matmul(x["x"], x["w_gate"].t()), x["x"], x["w_up"].t())  # (M, h)
    return torch.matmul(joined, x["w_down"].t())


def liger_for(spec):
    def factory(shape, dtype, device):
        require_cuda(device, "Liger-Kernel")
        if not spec.gated:
            raise Skip("Liger-Kernel has no plain (ungated) FFN kernel")
        if shape["activation"] != "silu":
            raise Skip("Liger-Kernel's GeGLU uses the tanh GELU; only SwiGLU is compared")
        silu_mul = optional_import("liger_kernel.ops.swiglu").LigerSiLUMulFunction

        def fn(x):
            gate, up = F.linear(x["x"], x["w_gate"]), F.linear(x["x"], x["w_up"])
            return F.linear(silu_mul.apply(gate, up), x["w_down"])

        return Provider("liger", fn, note="F.linear + Liger's fused silu(gate)·up + F.linear")

    return factory


def fastattn_backend_for(spec, name):
    module = gated_ffn_op if spec.gated else ffn_op

    def factory(shape, dtype, device):
        fastattn_backend_check(module, name, device)
        activation = shape["activation"]
        if spec.gated:
            def fn(x):
                return module.gated_ffn(x["x"], x["w_gate"], x["w_up"], x["w_down"], activation=activation,
                                        backend=name)
        else:
            def fn(x):
                return module.ffn(x["x"], x["w1"], x["b1"], x["w2"], x["b2"], activation=activation,
                                  backend=name)

        return Provider(name, fn)

    return factory


def _make(name, gated, grad_names):
    spec = FfnSpec(name=name, modes=("fwd", "bwd", "full"), x_key="d_model", grad_names=grad_names)
    spec.gated = gated
    spec.providers = {
        "naive": naive_for(spec),
        "torch": torch_for(spec),
        "naive-compile": compiled(naive_for(spec), "naive-compile"),
        "torch-compile": compiled(torch_for(spec), "torch-compile"),
        "gemm-only": gemm_only_for(spec),
        "liger": liger_for(spec),
        "triton": fastattn_backend_for(spec, "triton"),
        "cuda": fastattn_backend_for(spec, "cuda"),
    }
    return spec


FFN = _make("ffn", False, ("x", "w1", "b1", "w2", "b2"))
GATED_FFN = _make("gated_ffn", True, ("x", "w_gate", "w_up", "w_down"))
