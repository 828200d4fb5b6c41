"""layer_norm and rms_norm: rows 32k × hidden 1k..64k, with and without a residual
(prenorm: the sum is returned too); forward, backward, forward + backward; GB/s."""

from __future__ import annotations

import torch.nn.functional as F

from ... import reference
from ...ops import layer_norm as layer_norm_op
from ...ops import rms_norm as rms_norm_op
from ..reference import RowChunkedReference, StoredReference
from ..spec import (
    OpSpec,
    Provider,
    compiled,
    fastattn_backend_check,
    optional_import,
    randn,
    require_cuda,
)

EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
# Elements the fp32 reference handles at once (256 MiB per fp32 tensor), and the size of
# one fp32 output above which the reference is recomputed at each check, not stored.
REFERENCE_CHUNK_ELEMENTS = 2**26
STORE_LIMIT_BYTES = 2**29


def _shape(rows, hidden, residual):
    return {"rows": rows, "hidden": hidden, "residual": residual}


class NormSpec(OpSpec):
    def sweep(self, kind):
        if kind == "full":
            return [_shape(32768, h, r) for r in (False, True) for h in (1024, 4096, 8192, 16384, 65536)]
        if kind == "quick":
            return [_shape(32768, h, r) for r in (False, True) for h in (1024, 8192)]
        if kind == "quick-gpu":
            return [_shape(32768, h, r) for r in (False, True) for h in (4096, 8192)]
        if kind == "cpu":
            return [_shape(2048, h, r) for r in (False, True) for h in (256, 1024, 4096)]
        return [_shape(512, h, r) for r in (False, True) for h in (256, 1024)]

    def make_inputs(self, shape, dtype, device, generator):
        rows, hidden = shape["rows"], shape["hidden"]
        inputs = {"x": randn((rows, hidden), dtype, device, generator),
                  "weight": randn((hidden,), dtype, device, generator, scale=0.1, offset=1.0),
                  "residual": randn((rows, hidden), dtype, device, generator) if shape["residual"] else None}
        if self.name == "layer_norm":
            inputs["bias"] = randn((hidden,), dtype, device, generator, scale=0.1)
        return inputs

    def naive_fn(self, eps):
        if self.name == "layer_norm":
            return lambda x, weight, bias, residual: reference.layer_norm(
                x, weight, bias, eps, residual=residual, prenorm=True)
        return lambda x, weight, residual: reference.rms_norm(x, weight, eps, residual=residual, prenorm=True)

    def output_shape(self, shape):
        return (shape["rows"], shape["hidden"])

    def reference(self, inputs, shape, dout):
        rows, hidden = shape["rows"], shape["hidden"]
        chunked = RowChunkedReference(self.naive_fn(EPS[self.name]), inputs, ("x", "residual"), rows,
                                      max(1, REFERENCE_CHUNK_ELEMENTS // hidden), dout, self.grad_names, n_outputs=2)
        if rows * hidden * 4 > STORE_LIMIT_BYTES:
            return chunked  # recomputed chunk by chunk at each comparison: nothing big kept
        return StoredReference(*chunked.materialize())

    def label(self, shape):
        return f"{shape['rows']}x{shape['hidden']}" + (" +residual" if shape["residual"] else "")

    def group_keys(self):
        return ("residual",)



def naive_for(spec):
    def factory(shape, dtype, device):
        fn = spec.naive_fn(EPS[spec.name])
        return Provider("naive", lambda x: fn(**x))

    return factory


def torch_for(spec):
    """F.layer_norm / F.rms_norm on x + residual (the add is a separate torch op)."""
    eps = EPS[spec.name]

    def factory(shape, dtype, device):
        hidden = [shape["hidden"]]
        if spec.name == "layer_norm":
            def fn(x):
                s = x["x"] if x["residual"] is None else x["x"] + x["residual"]
                return F.layer_norm(s, hidden, x["weight"], x["bias"], eps), s
        else:
            def fn(x):
                s = x["x"] if x["residual"] is None else x["x"] + x["residual"]
                return F.rms_norm(s, hidden, x["weight"], eps), s

        return Provider("torch", fn, note=f"F.{spec.name}")

    return factory


def liger_for(spec):
    eps = EPS[spec.name]

    def factory(shape, dtype, device):
        require_cuda(device, "Liger-Kernel")
        if spec.name == "layer_norm":
            function = optional_import("liger_kernel.ops.layer_norm").LigerLayerNormFunction

            def fn(x):
                s = x["x"] if x["residual"] is None else x["x"] + x["residual"]
                return function.apply(s, x["weight"], x["bias"], eps), s
        else:
            function = optional_import("liger_kernel.ops.rms_norm").LigerRMSNormFunction

            def fn(x):
                s = x["x"] if x["residual"] is None else x["x"] + x["residual"]
                return function.apply(s, x["weight"], eps), s

        note = "Liger-Kernel" + (" (residual add unfused, in torch)" if shape["residual"] else "")
        return Provider("liger", fn, note=note)

    return factory


def fastattn_backend_for(spec, name):
    module = layer_norm_op if spec.name == "layer_norm" else rms_norm_op
    eps = EPS[spec.name]

    def factory(shape, dtype, device):
        fastattn_backend_check(module, name, device)
        if spec.name == "layer_norm":
            def fn(x):
                return module.layer_norm(x["x"], x["weight"], x["bias"], eps, residual=x["residual"],
                                         prenorm=True, backend=name)
        else:
            def fn(x):
                return module.rms_norm(x["x"], x["weight"], eps, residual=x["residual"], prenorm=True,
                                       backend=name)

        return Provider(name, fn)

    return factory


def _make(name, grad_names):
    spec = NormSpec(name=name, modes=("fwd", "bwd", "full"), x_key="hidden", grad_names=grad_names)
    spec.providers = {
        "naive": naive_for(spec),
        "torch": torch_for(spec),
        "naive-compile": compiled(naive_for(spec), "naive-compile"),
        "torch-compile": compiled(torch_for(spec), "torch-compile"),
        "liger": liger_for(spec),
        "triton": fastattn_backend_for(spec, "triton"),
        "cuda": fastattn_backend_for(spec, "cuda"),
    }
    return spec


LAYER_NORM = _make("layer_norm", ("x", "weight", "bias", "residual"))
RMS_NORM = _make("rms_norm", ("x", "weight", "residual"))
