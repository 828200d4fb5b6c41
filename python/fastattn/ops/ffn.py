"""fastattn.ffn: act(x·W1ᵀ + b1)·W2ᵀ + b2, and the checks shared with gated_ffn.

Registered ops, on x flattened to (tokens, d_model):
    fastattn::ffn_fwd(x, w1, b1?, w2, b2?, activation, save_hidden, backend)
        -> (y (tokens, d_out), hidden_pre (tokens, d_hidden) or a 0-element placeholder)
    fastattn::ffn_bwd(dy, x, w1, b1?, w2, b2?, hidden_pre, activation, backend)
        -> (dx, dw1, db1, dw2, db2)

hidden_pre = x·W1ᵀ + b1 is kept for backward unless recompute=True (save_hidden False),
which keeps only x and recomputes it. Absent biases get 0-element placeholder grads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as check
from .. import reference
from .. import backends
from ._common import BackendTable, empty_placeholder, is_placeholder

ACTIVATIONS = reference.ACTIVATIONS


@dataclass(frozen=True)
class FfnCall:
    dtype: torch.dtype
    d_model: int
    d_hidden: int
    activation: str


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def limits(backend: str, call: FfnCall) -> Optional[str]:
    """What the triton and cuda backends cannot serve (shared with gated_ffn)."""
    if backend == "cuda":
        if call.dtype not in CUDA_DTYPES:
            return f"the cuda kernels take float16, bfloat16 or float32, got {check.dtype_name(call.dtype)}"
        return None
    if backend != "triton":
        return None
    if call.dtype not in TRITON_DTYPES:
        return f"the triton kernels take float16, bfloat16 or float32, got {check.dtype_name(call.dtype)}"
    if call.dtype == torch.bfloat16 and backends.triton_interpreter_on():
        return "tl.dot on bfloat16 operands is wrong in the Triton interpreter (TRITON_INTERPRET=1)"
    return None


def _naive_hidden(x, w1, b1):
    hidden = torch.matmul(x, w1.t())  # (tokens, d_hidden)
    return hidden if b1 is None else hidden + b1


def _naive_forward(x, w1, b1, w2, b2, activation, save_hidden):
    hidden = _naive_hidden(x, w1, b1)
    y = torch.matmul(reference.activation(hidden, activation), w2.t())  # (tokens, d_out)
    if b2 is not None:
        y = y + b2
    return y, hidden if save_hidden else empty_placeholder(x)


def _torch_forward(x, w1, b1, w2, b2, activation, save_hidden):
    hidden = F.linear(x, w1, b1)  # (tokens, d_hidden)
    y = F.linear(reference.torch_activation(hidden, activation), w2, b2)  # (tokens, d_out)
    return y, hidden if save_hidden else empty_placeholder(x)


def _reference_backward(dy, x, w1, b1, w2, b2, hidden_pre, activation):
    """The naive and torch backends' backward: reference.ffn_backward (recomputes the
    hidden pre-activation; hidden_pre is not needed)."""
    grads = reference.ffn_backward(dy, x, w1, b1, w2, b2, activation_name=activation)
    return tuple(empty_placeholder(x) if g is None else g for g in grads)


def _triton_forward(x, w1, b1, w2, b2, activation, save_hidden):
    from ..kernels import ffn as kernels

    y, hidden = kernels.ffn_forward(x, w1, b1, w2, b2, activation, save_hidden)
    return y, empty_placeholder(x) if hidden is None else hidden


def _triton_backward(dy, x, w1, b1, w2, b2, hidden_pre, activation):
    from ..kernels import ffn as kernels

    grads = kernels.ffn_backward(dy.to(x.dtype), x, w1, b1, w2, b2,
                                 None if is_placeholder(hidden_pre) else hidden_pre, activation)
    return tuple(empty_placeholder(x) if g is None else g for g in grads)


def _cuda_forward(x, w1, b1, w2, b2, activation, save_hidden):
    """fastattn_cuda::ffn_fwd: cuBLASLt GEMMs with bias epilogues and our activation kernel."""
    from .. import _extension

    _extension.extension()
    y, hidden = torch.ops.fastattn_cuda.ffn_fwd(x, w1, b1, w2, b2, activation, save_hidden)
    return y, hidden


def _cuda_backward(dy, x, w1, b1, w2, b2, hidden_pre, activation):
    from .. import _extension

    _extension.extension()
    grads = torch.ops.fastattn_cuda.ffn_bwd(dy.to(x.dtype), x, w1, b1, w2, b2,
                                            None if is_placeholder(hidden_pre) else hidden_pre, activation)
    return tuple(grads)


BACKENDS = BackendTable(
    "ffn",
    forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward, "cuda": _cuda_forward},
    backward={"naive": _reference_backward, "torch": _reference_backward, "triton": _triton_backward,
              "cuda": _cuda_backward},
    limits=limits,
)


@torch.library.custom_op("fastattn::ffn_fwd", mutates_args=())
def ffn_fwd(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    activation: str,
    save_hidden: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return BACKENDS.forward[backend](x, w1, b1, w2, b2, activation, save_hidden)


@ffn_fwd.register_fake
def _ffn_fwd_fake(x, w1, b1, w2, b2, activation, save_hidden, backend):
    hidden = x.new_empty(x.shape[0], w1.shape[0]) if save_hidden else empty_placeholder(x)
    return x.new_empty(x.shape[0], w2.shape[0]), hidden


@torch.library.custom_op("fastattn::ffn_bwd", mutates_args=())
def ffn_bwd(
    dy: Tensor,
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    hidden_pre: Tensor,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS.backward[backend](dy, x, w1, b1, w2, b2, hidden_pre, activation)


@ffn_bwd.register_fake
def _ffn_bwd_fake(dy, x, w1, b1, w2, b2, hidden_pre, activation, backend):
    return tuple(empty_placeholder(x) if t is None else t.new_empty(t.shape) for t in (x, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, save_hidden, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1])
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, dy, dhidden):
    x, w1, b1, w2, b2, hidden_pre = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = ffn_bwd(dy, x, w1, b1, w2, b2, hidden_pre, ctx.activation, ctx.backend)
    return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None,
            None, None, None)


ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_activation(activation: object) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, got {type(activation).__name__}")
    check.choice("activation", activation, ACTIVATIONS)
    return activation


def check_ffn_inputs(x: object, **weights: Optional[Tensor]) -> None:
    """x (..., d_model) and weights/biases: tensors of x's dtype on x's device."""
    check.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must be at least 1-D (..., d_model), got shape {tuple(x.shape)}")
    for name, t in weights.items():
        if t is not None:
            check.tensor(name, t)
    check.same_dtype(x=x, **weights)
    check.same_device(x=x, **weights)


def check_weight(name: str, weight: Tensor, rows: int, rows_name: str, cols: int, cols_name: str) -> None:
    check.tensor(name, weight, ndim=2)
    if weight.shape[1] != cols:
        raise ValueError(
            f"{name} must have shape ({rows_name}, {cols_name}) in nn.Linear's layout with "
            f"{cols_name} = {cols}; got {tuple(weight.shape)}"
        )
    if rows >= 0 and weight.shape[0] != rows:
        raise ValueError(
            f"{name} must have shape ({rows_name}, {cols_name}) with {rows_name} = {rows}; "
            f"got {tuple(weight.shape)}"
        )


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    activation: str = "gelu",
    recompute: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """The Transformer feed-forward block act(x·W1ᵀ + b1)·W2ᵀ + b2.

    x: (..., d_model); w1: (d_hidden, d_model); b1: (d_hidden,) or None;
    w2: (d_out, d_hidden); b2: (d_out,) or None (nn.Linear's layout). activation:
    gelu (exact), gelu_tanh, relu, silu. recompute=True keeps only x for backward.
    Returns (..., d_out).
    """
    check_ffn_inputs(x, w1=w1, b1=b1, w2=w2, b2=b2)
    d_model = x.shape[-1]
    check_weight("w1", w1, -1, "d_hidden", d_model, "d_model")
    d_hidden = w1.shape[0]
    check_weight("w2", w2, -1, "d_out", d_hidden, "d_hidden")
    for name, bias, size, meaning in (("b1", b1, d_hidden, "(d_hidden,)"), ("b2", b2, w2.shape[0], "(d_out,)")):
        if bias is not None:
            check.shape(name, bias, (size,), meaning)
    check_activation(activation)
    check.boolean("recompute", recompute)
    name = BACKENDS.resolve(backend, x.device, FfnCall(x.dtype, d_model, d_hidden, activation))
    x2d = x.reshape(-1, d_model)  # (tokens, d_model)
    y, _ = ffn_fwd(x2d, w1, b1, w2, b2, activation, not recompute, name)
    return y.reshape(*x.shape[:-1], w2.shape[0])  # (..., d_out)
