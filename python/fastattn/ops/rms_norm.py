"""fastattn.rms_norm (the checks and backward wiring are shared with ops/layer_norm.py).

Registered ops, on x flattened to (rows, hidden):
    fastattn::rms_norm_fwd(x, weight?, residual?, eps, residual_in_fp32, backend)
        -> (y, residual_out, rstd)
    fastattn::rms_norm_bwd(dy, dresidual_out?, s, weight?, rstd, eps, backend) -> (ds, dweight)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ._common import BackendTable, empty_placeholder, is_placeholder
from .layer_norm import (
    NormCall,
    norm_limits,
    add_residual,
    check_norm_args,
    cuda_norm_backward,
    cuda_norm_forward,
    fake_residual_out,
    finish_norm_grads,
    finish_norm,
    residual_out_or_placeholder,
    save_norm_context,
    split_ds,
)


def _naive_forward(x, weight, residual, eps, residual_in_fp32):
    y, summed, rstd = reference.rms_norm(
        x, weight, eps, residual=residual, prenorm=True,
        residual_in_fp32=residual_in_fp32 and residual is not None, return_stats=True,
    )
    return y, residual_out_or_placeholder(x, residual, summed), rstd


def _torch_forward(x, weight, residual, eps, residual_in_fp32):
    summed = add_residual(x, residual, residual_in_fp32)
    w = None if weight is None else weight.to(summed.dtype)
    y = F.rms_norm(summed, [summed.shape[-1]], w, eps)
    # F.rms_norm does not return rstd; the torch backend's backward recomputes instead.
    rstd = torch.full((x.shape[0],), float("inf"), dtype=torch.float32, device=x.device)
    return y.to(x.dtype), residual_out_or_placeholder(x, residual, summed), rstd


def _reference_backward(dy, dresidual_out, summed, weight, rstd, eps):
    """The naive and torch backends' backward: reference.rms_norm_backward."""
    ds, dweight = reference.rms_norm_backward(dy, summed, weight, eps)
    return finish_norm_grads(ds, dresidual_out, summed, dweight)


def _triton_forward(x, weight, residual, eps, residual_in_fp32):
    from fastattn.kernels import layer_norm as kernels

    y, residual_out, _, rstd = kernels.layer_norm_forward(x, weight, None, residual, eps, residual_in_fp32,
                                                          is_rms_norm=True)
    return y, residual_out, rstd


def _triton_backward(dy, dresidual_out, summed, weight, rstd, eps):
    from fastattn.kernels import layer_norm as kernels

    dresidual_out = None if is_placeholder(dresidual_out) else dresidual_out
    ds, dweight, _ = kernels.layer_norm_backward(dy, dresidual_out, summed, weight, None, rstd, rstd,
                                                 is_rms_norm=True)
    return ds, dweight


def _cuda_forward(x, weight, residual, eps, residual_in_fp32):
    y, residual_out, _, rstd = cuda_norm_forward(x, weight, None, residual, eps, residual_in_fp32, is_rms_norm=True)
    return y, residual_out, rstd


def _cuda_backward(dy, dresidual_out, summed, weight, rstd, eps):
    ds, dweight, _ = cuda_norm_backward(dy, dresidual_out, summed, weight, None, None, rstd, is_rms_norm=True)
    return ds, dweight


BACKENDS = BackendTable(
    "rms_norm",
    forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward, "cuda": _cuda_forward},
    backward={"naive": _reference_backward, "torch": _reference_backward, "triton": _triton_backward,
              "cuda": _cuda_backward},
    limits=norm_limits,
)


@torch.library.custom_op("fastattn::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    residual_in_fp32: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS.forward[backend](x, weight, residual, eps, residual_in_fp32)


@rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x, weight, residual, eps, residual_in_fp32, backend):
    return (x.new_empty(x.shape), fake_residual_out(x, residual, residual_in_fp32),
            x.new_empty(x.shape[0], dtype=torch.float32))


@torch.library.custom_op("fastattn::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: Tensor,
    dresidual_out: Optional[Tensor],
    summed: Tensor,
    weight: Optional[Tensor],
    rstd: Tensor,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return BACKENDS.backward[backend](dy, dresidual_out, summed, weight, rstd, eps)


@rms_norm_bwd.register_fake
def _rms_norm_bwd_fake(dy, dresidual_out, summed, weight, rstd, eps, backend):
    dweight = empty_placeholder(summed) if weight is None else weight.new_empty(weight.shape)
    return summed.new_empty(summed.shape), dweight


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, residual_in_fp32, backend = inputs
    y, residual_out, rstd = output
    summed = save_norm_context(ctx, x, residual, residual_out, residual_index=2)
    ctx.save_for_backward(summed, weight, rstd)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, dy, dresidual_out, drstd):
    summed, weight, rstd = ctx.saved_tensors
    ds, dweight = rms_norm_bwd(dy, dresidual_out, summed, weight, rstd, ctx.eps, ctx.backend)
    dx, dresidual = split_ds(ctx, ds)
    return dx, dweight if weight is not None else None, dresidual, None, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor],
    eps: float = 1e-6,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: Optional[str] = None,
):
    """RMSNorm over the last dim of x, optionally of s = x + residual:
    y = s / sqrt(mean(s²) + eps) · weight. Arguments as in fastattn.layer_norm."""
    hidden = check_norm_args(x, weight, None, residual, eps, prenorm, residual_in_fp32)
    name = BACKENDS.resolve(backend, x.device, NormCall(x.dtype, hidden, residual is not None))
    x2d = x.reshape(-1, hidden)  # (rows, hidden)
    residual2d = None if residual is None else residual.reshape(-1, hidden)  # (rows, hidden)
    y, residual_out, _ = rms_norm_fwd(x2d, weight, residual2d, float(eps), residual_in_fp32, name)
    return finish_norm(x, y, residual, residual_out, prenorm, residual_in_fp32)
