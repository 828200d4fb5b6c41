"""fastattn.gated_ffn: (act(x·W_gateᵀ) ⊙ x·W_upᵀ)·W_downᵀ (SwiGLU, GeGLU).

Registered ops, on x flattened to (tokens, d_model):
    fastattn::gated_ffn_fwd(x, w_gate, w_up, w_down, activation, save_hidden, backend)
        -> (y (tokens, d_out), gate_pre, up_pre)   (pre-activations, or 0-element
           placeholders when recompute=True)
    fastattn::gated_ffn_bwd(dy, x, w_gate, w_up, w_down, gate_pre, up_pre, activation,
                            backend) -> (dx, dw_gate, dw_up, dw_down)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ._common import BackendTable, empty_placeholder, is_placeholder
from .ffn import FfnCall, check_activation, check_ffn_inputs, check_weight, limits
from .. import _validate as check


def _naive_forward(x, w_gate, w_up, w_down, activation, save_hidden):
    gate = torch.matmul(x, w_gate.t())  # (tokens, d_hidden)
    up = torch.matmul(x, w_up.t())  # (tokens, d_hidden)
    y = torch.matmul(reference.activation(gate, activation) * up, w_down.t())  # (tokens, d_out)
    if not save_hidden:
        return y, empty_placeholder(x), empty_placeholder(x)
    return y, gate, up


def _torch_forward(x, w_gate, w_up, w_down, activation, save_hidden):
    gate = F.linear(x, w_gate)  # (tokens, d_hidden)
    up = F.linear(x, w_up)  # (tokens, d_hidden)
    y = F.linear(reference.torch_activation(gate, activation) * up, w_down)  # (tokens, d_out)
    if not save_hidden:
        return y, empty_placeholder(x), empty_placeholder(x)
    return y, gate, up


def _reference_backward(dy, x, w_gate, w_up, w_down, gate_pre, up_pre, activation):
    """The naive and torch backends' backward: reference.gated_ffn_backward."""
    return reference.gated_ffn_backward(dy, x, w_gate, w_up, w_down, activation_name=activation)


def _triton_forward(x, w_gate, w_up, w_down, activation, save_hidden):
    from ..kernels import ffn as kernels

    y, gate, up = kernels.gated_ffn_forward(x, w_gate, w_up, w_down, activation, save_hidden)
    if gate is None:
        return y, empty_placeholder(x), empty_placeholder(x)
    return y, gate, up


def _triton_backward(dy, x, w_gate, w_up, w_down, gate_pre, up_pre, activation):
    from ..kernels import ffn as kernels

    saved = not (is_placeholder(gate_pre) or is_placeholder(up_pre))
    return kernels.gated_ffn_backward(dy.to(x.dtype), x, w_gate, w_up, w_down, gate_pre if saved else None,
                                      up_pre if saved else None, activation)


def _cuda_forward(x, w_gate, w_up, w_down, activation, save_hidden):
    """fastattn_cuda::gated_ffn_fwd: cuBLASLt GEMMs and our fused gated activation kernel."""
    from .. import _extension

    _extension.extension()
    y, gate, up = torch.ops.fastattn_cuda.gated_ffn_fwd(x, w_gate, w_up, w_down, activation, save_hidden)
    return y, gate, up


def _cuda_backward(dy, x, w_gate, w_up, w_down, gate_pre, up_pre, activation):
    from .. import _extension

    _extension.extension()
    saved = not (is_placeholder(gate_pre) or is_placeholder(up_pre))
    grads = torch.ops.fastattn_cuda.gated_ffn_bwd(dy.to(x.dtype), x, w_gate, w_up, w_down,
                                                  gate_pre if saved else None, up_pre if saved else None, activation)
    return tuple(grads)


BACKENDS = BackendTable(
    "gated_ffn",
    forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward, "cuda": _cuda_forward},
    backward={"naive": _reference_backward, "torch": _reference_backward, "triton": _triton_backward,
              "cuda": _cuda_backward},
    limits=limits,
)


@torch.library.custom_op("fastattn::gated_ffn_fwd", mutates_args=())
def gated_ffn_fwd(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    activation: str,
    save_hidden: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS.forward[backend](x, w_gate, w_up, w_down, activation, save_hidden)


@gated_ffn_fwd.register_fake
def _gated_ffn_fwd_fake(x, w_gate, w_up, w_down, activation, save_hidden, backend):
    if save_hidden:
        gate, up = (x.new_empty(x.shape[0], w_gate.shape[0]) for _ in range(2))
    else:
        gate, up = empty_placeholder(x), empty_placeholder(x)
    return x.new_empty(x.shape[0], w_down.shape[0]), gate, up


@torch.library.custom_op("fastattn::gated_ffn_bwd", mutates_args=())
def gated_ffn_bwd(
    dy: Tensor,
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    gate_pre: Tensor,
    up_pre: Tensor,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS.backward[backend](dy, x, w_gate, w_up, w_down, gate_pre, up_pre, activation)


@gated_ffn_bwd.register_fake
def _gated_ffn_bwd_fake(dy, x, w_gate, w_up, w_down, gate_pre, up_pre, activation, backend):
    return tuple(t.new_empty(t.shape) for t in (x, w_gate, w_up, w_down))


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, activation, save_hidden, backend = inputs
    ctx.save_for_backward(x, w_gate, w_up, w_down, output[1], output[2])
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, dy, dgate, dup):
    x, w_gate, w_up, w_down, gate_pre, up_pre = ctx.saved_tensors
    grads = gated_ffn_bwd(dy, x, w_gate, w_up, w_down, gate_pre, up_pre, ctx.activation, ctx.backend)
    return (*grads, None, None, None)


gated_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_ffn(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    activation: str = "silu",
    recompute: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Gated feed-forward block: silu gives SwiGLU, gelu gives GeGLU.

    x: (..., d_model); w_gate, w_up: (d_hidden, d_model); w_down: (d_out, d_hidden)
    (nn.Linear's layout, no biases). recompute=True keeps only x for backward.
    Returns (..., d_out).
    """
    check_ffn_inputs(x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    d_model = x.shape[-1]
    check_weight("w_gate", w_gate, -1, "d_hidden", d_model, "d_model")
    d_hidden = w_gate.shape[0]
    check_weight("w_up", w_up, d_hidden, "d_hidden", d_model, "d_model")
    check_weight("w_down", w_down, -1, "d_out", d_hidden, "d_hidden")
    check_activation(activation)
    check.boolean("recompute", recompute)
    name = BACKENDS.resolve(backend, x.device, FfnCall(x.dtype, d_model, d_hidden, activation))
    x2d = x.reshape(-1, d_model)  # (tokens, d_model)
    y, _, _ = gated_ffn_fwd(x2d, w_gate, w_up, w_down, activation, not recompute, name)
    return y.reshape(*x.shape[:-1], w_down.shape[0])  # (..., d_out)
