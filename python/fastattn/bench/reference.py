"""The fp32 reference a provider is checked against, and the comparison.

`compare(values)` takes the provider's tensors by key ("out0", "out1", ... for the
outputs, "grad_<input>" for gradients) and returns, per key, (max |value - ref|,
max |ref|), both in fp32. A missing value, a wrong shape or a NaN/inf gives an
error of inf.

StoredReference keeps the fp32 tensors (moved to host memory when they are large).
RowChunkedReference keeps nothing big: for row-independent ops (norms) it recomputes
the reference `chunk` rows at a time during each comparison, which on a GPU is far
cheaper than moving gigabytes of stored reference across PCIe for every provider.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

COMPARE_CHUNK = 2**26  # elements compared at once
ON_DEVICE_BYTES = 2**30  # a stored reference larger than this goes to host memory


def max_abs_error(value: Optional[Tensor], ref: Tensor) -> float:
    """max |value - ref| in fp32, chunked; inf for None, a wrong shape or NaN/inf."""
    if value is None or tuple(value.shape) != tuple(ref.shape):
        return math.inf
    flat_v, flat_r = value.detach().reshape(-1), ref.reshape(-1)
    worst = 0.0
    for start in range(0, flat_v.numel(), COMPARE_CHUNK):
        v = flat_v[start : start + COMPARE_CHUNK].float()
        r = flat_r[start : start + COMPARE_CHUNK].to(v.device)
        if not bool(torch.isfinite(v).all()):
            return math.inf
        worst = max(worst, float((v - r).abs().max()))
    return worst


def max_abs(t: Tensor) -> float:
    flat = t.reshape(-1)
    return max((float(flat[s : s + COMPARE_CHUNK].abs().max()) for s in range(0, flat.numel(), COMPARE_CHUNK)),
               default=0.0)


class Reference:
    keys: frozenset = frozenset()

    def compare(self, values: Mapping[str, Optional[Tensor]]) -> dict[str, tuple[float, float]]:
        raise NotImplementedError


class StoredReference(Reference):
    """Reference outputs (a tuple) and gradients ({input name: tensor}), in fp32."""

    def __init__(self, outputs: Sequence[Tensor], grads: Mapping[str, Tensor]):
        tensors = {f"out{i}": t.float() for i, t in enumerate(outputs)}
        tensors.update({f"grad_{n}": g.float() for n, g in grads.items()})
        if sum(t.numel() * 4 for t in tensors.values() if t.is_cuda) > ON_DEVICE_BYTES:
            tensors = {k: t.cpu() for k, t in tensors.items()}
        self.tensors = tensors
        self.scales = {k: max_abs(t) for k, t in tensors.items()}
        self.keys = frozenset(tensors)

    def compare(self, values):
        return {k: (max_abs_error(v, self.tensors[k]), self.scales[k]) for k, v in values.items() if k in self.keys}


class RowChunkedReference(Reference):
    """fn(**inputs) in fp32, `chunk` rows at a time along dim 0 of the `row_names`
    inputs and of every output (row-independent ops). Gradients are of the first
    output for `dout`: row inputs' gradients are per chunk, the others' (weights)
    summed over the chunks."""

    def __init__(self, fn: Callable, inputs: Mapping, row_names: Sequence[str], rows: int, chunk: int,
                 dout: Optional[Tensor], grad_names: Sequence[str], n_outputs: int):
        self.fn, self.inputs, self.row_names = fn, dict(inputs), tuple(row_names)
        self.rows, self.chunk, self.dout = rows, max(1, chunk), dout
        self.grad_names = [n for n in grad_names if inputs.get(n) is not None] if dout is not None else []
        self.keys = frozenset([f"out{i}" for i in range(n_outputs)] + [f"grad_{n}" for n in self.grad_names])

    def chunks(self, with_grads: bool) -> Iterator[tuple[int, int, tuple, dict]]:
        """(start, size, fp32 outputs, fp32 gradients) for each chunk of rows."""
        for start in range(0, self.rows, self.chunk):
            size = min(self.chunk, self.rows - start)
            part = {k: (v.narrow(0, start, size) if k in self.row_names and v is not None else v)
                    for k, v in self.inputs.items()}
            part = {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in part.items()}
            wanted = self.grad_names if with_grads else []
            for n in wanted:
                part[n] = part[n].detach().requires_grad_()
            with torch.enable_grad() if wanted else torch.no_grad():
                outs = self.fn(**part)
                outs = outs if isinstance(outs, tuple) else (outs,)
                grads = {}
                if wanted:
                    found = torch.autograd.grad(outs[0], [part[n] for n in wanted],
                                                self.dout.narrow(0, start, size).float())
                    grads = dict(zip(wanted, found))
            yield start, size, tuple(o.detach() for o in outs), grads

    def compare(self, values):
        values = {k: v for k, v in values.items() if k in self.keys}
        errors = {k: (math.inf if v is None else 0.0) for k, v in values.items()}
        scales = {k: 0.0 for k in values}
        shared: dict[str, Tensor] = {}
        with_grads = any(k.startswith("grad_") for k in values)
        for start, size, outs, grads in self.chunks(with_grads):
            parts = {f"out{i}": o for i, o in enumerate(outs)}
            for n, g in grads.items():
                if n in self.row_names:
                    parts[f"grad_{n}"] = g
                else:
                    shared[n] = g if n not in shared else shared[n] + g
            for key, ref in parts.items():
                if key not in values:
                    continue
                scales[key] = max(scales[key], max_abs(ref))
                value = values[key]
                if value is None or value.shape[1:] != ref.shape[1:] or value.shape[0] != self.rows:
                    errors[key] = math.inf
                elif math.isfinite(errors[key]):
                    errors[key] = max(errors[key], max_abs_error(value.narrow(0, start, size), ref))
        for n, ref in shared.items():
            key = f"grad_{n}"
            if key in values:
                scales[key] = max_abs(ref)
                errors[key] = max_abs_error(values[key], ref)
        return {k: (errors[k], scales[k]) for k in values}

    def materialize(self) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """The whole reference as tensors (for small cases and tests)."""
        out_parts, grad_parts = [], {n: [] for n in self.grad_names}
        for _, _, outs, grads in self.chunks(bool(self.grad_names)):
            out_parts.append(outs)
            for n, g in grads.items():
                grad_parts[n].append(g)
        outputs = tuple(torch.cat([p[i] for p in out_parts]) for i in range(len(out_parts[0])))
        gradients = {n: (torch.cat(p) if n in self.row_names else functools.reduce(torch.add, p))
                     for n, p in grad_parts.items() if p}
        return outputs, gradients
