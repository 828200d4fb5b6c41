"""fastattn.layer_norm, and the argument checks and backward wiring it shares with
fastattn.rms_norm (ops/rms_norm.py).

Registered ops, on x flattened to (rows, hidden):
    fastattn::layer_norm_fwd(x, weight?, bias?, residual?, eps, residual_in_fp32, backend)
        -> (y, residual_out, mean, rstd)
    fastattn::layer_norm_bwd(dy, dresidual_out?, s, weight?, bias?, mean, rstd, eps, backend)
        -> (ds, dweight, dbias)

s = x + residual (residual_out, in the residual's dtype or fp32 when residual_in_fp32)
is what gets normalized; without a residual s is x and residual_out is a 0-element
placeholder. mean and rstd are (rows,) fp32. Absent outputs/gradients are 0-element
placeholders. ds is the gradient of s: it is both dx and dresidual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import _validate as check
from .. import reference
from ._common import BackendTable, empty_placeholder, is_placeholder


@dataclass(frozen=True)
class NormCall:
    dtype: torch.dtype
    hidden: int
    has_residual: bool


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def norm_limits(backend: str, call: NormCall) -> Optional[str]:
    """The calls a backend of layer_norm / rms_norm cannot serve (any hidden size is fine)."""
    if backend == "triton" and call.dtype not in TRITON_DTYPES:
        return f"the triton norm kernels take float16, bfloat16 or float32 x, got {str(call.dtype)[6:]}"
    if backend == "cuda" and call.dtype not in CUDA_DTYPES:
        return f"the cuda norm kernels take float16, bfloat16 or float32 x, got {str(call.dtype)[6:]}"
    return None


def residual_out_or_placeholder(x: Tensor, residual: Optional[Tensor], summed: Tensor) -> Tensor:
    return summed if residual is not None else empty_placeholder(x)


def fake_residual_out(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> Tensor:
    if residual is None:
        return empty_placeholder(x)
    return x.new_empty(x.shape, dtype=reference.residual_dtype(x, residual, residual_in_fp32))


def add_residual(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> Tensor:
    """s = x + residual in the residual dtype (x itself when there is no residual)."""
    if residual is None:
        return x
    dtype = reference.residual_dtype(x, residual, residual_in_fp32)
    return x.to(dtype) + residual.to(dtype)


def _naive_forward(x, weight, bias, residual, eps, residual_in_fp32):
    y, summed, mean, rstd = reference.layer_norm(
        x, weight, bias, eps, residual=residual, prenorm=True,
        residual_in_fp32=residual_in_fp32 and residual is not None, return_stats=True,
    )
    return y, residual_out_or_placeholder(x, residual, summed), mean, rstd


def _torch_forward(x, weight, bias, residual, eps, residual_in_fp32):
    summed = add_residual(x, residual, residual_in_fp32)
    cast = lambda t: None if t is None else t.to(summed.dtype)
    y, mean, rstd = torch.native_layer_norm(summed, [summed.shape[-1]], cast(weight), cast(bias), eps)
    return (y.to(x.dtype), residual_out_or_placeholder(x, residual, summed),
            mean.reshape(-1).float(), rstd.reshape(-1).float())


def _reference_backward(dy, dresidual_out, summed, weight, bias, mean, rstd, eps):
    """The naive and torch backends' backward: reference.layer_norm_backward."""
    ds, dweight, dbias = reference.layer_norm_backward(dy, summed, weight, bias, eps)
    return finish_norm_grads(ds, dresidual_out, summed, dweight, dbias)


def _triton_forward(x, weight, bias, residual, eps, residual_in_fp32):
    from fastattn.kernels import layer_norm as kernels

    return kernels.layer_norm_forward(x, weight, bias, residual, eps, residual_in_fp32)


def _triton_backward(dy, dresidual_out, summed, weight, bias, mean, rstd, eps):
    from fastattn.kernels import layer_norm as kernels

    dresidual_out = None if is_placeholder(dresidual_out) else dresidual_out
    return kernels.layer_norm_backward(dy, dresidual_out, summed, weight, bias, mean, rstd)


def _cuda_params(like: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """weight and bias as the CUDA kernels take them: both in like's dtype or both fp32."""
    dtypes = {t.dtype for t in (weight, bias) if t is not None}
    if dtypes <= {like.dtype} or dtypes == {torch.float32}:
        return weight, bias
    return tuple(None if t is None else t.float() for t in (weight, bias))


def cuda_norm_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm):
    """The cuda backend's forward of layer_norm and rms_norm (fastattn_cuda::layer_norm_fwd).

    The kernels keep the residual stream s = x + residual in x's dtype or fp32; a stream of
    another dtype (a float16 residual with bfloat16 x, a float64 one) is formed in fp32 and
    cast back.
    """
    from .. import _extension

    _extension.extension()
    stream = None if residual is None else reference.residual_dtype(x, residual, residual_in_fp32)
    if residual is not None:
        residual = residual.to(stream if stream in (x.dtype, torch.float32) else torch.float32)
    weight, bias = _cuda_params(x, weight, bias)
    y, residual_out, mean, rstd = torch.ops.fastattn_cuda.layer_norm_fwd(x, weight, bias, residual, eps, is_rms_norm)
    if stream is not None:
        residual_out = residual_out.to(stream)
    return y, residual_out, mean, rstd


def cuda_norm_backward(dy, dresidual_out, summed, weight, bias, mean, rstd, is_rms_norm):
    """The cuda backend's backward of layer_norm and rms_norm (fastattn_cuda::layer_norm_bwd):
    (ds in s's dtype, dweight, dbias), placeholders for absent parameters."""
    from .. import _extension

    _extension.extension()
    s = summed if summed.dtype in (dy.dtype, torch.float32) else summed.float()
    dresidual_out = None if is_placeholder(dresidual_out) else dresidual_out.to(s.dtype)
    w, b = _cuda_params(dy, weight, bias)
    ds, dweight, dbias = torch.ops.fastattn_cuda.layer_norm_bwd(dy, dresidual_out, s, w, b,
                                                                None if is_rms_norm else mean, rstd, is_rms_norm)
    grad = lambda g, param: empty_placeholder(summed) if param is None else g.to(param.dtype)
    return ds.to(summed.dtype), grad(dweight, weight), grad(dbias, bias)


def _cuda_forward(x, weight, bias, residual, eps, residual_in_fp32):
    return cuda_norm_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm=False)


def _cuda_backward(dy, dresidual_out, summed, weight, bias, mean, rstd, eps):
    return cuda_norm_backward(dy, dresidual_out, summed, weight, bias, mean, rstd, is_rms_norm=False)


BACKENDS = BackendTable(
    "layer_norm",
    forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward, "cuda": _cuda_forward},
    backward={"naive": _reference_backward, "torch": _reference_backward, "triton": _triton_backward,
              "cuda": _cuda_backward},
    limits=norm_limits,
)


@torch.library.custom_op("fastattn::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    residual_in_fp32: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS.forward[backend](x, weight, bias, residual, eps, residual_in_fp32)


@layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, residual, eps, residual_in_fp32, backend):
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    return (x.new_empty(x.shape), fake_residual_out(x, residual, residual_in_fp32), stats,
            stats.new_empty(stats.shape))


def finish_norm_grads(ds, dresidual_out, summed, *param_grads):
    """Add dresidual_out (the gradient of the prenorm output s) into ds and replace
    absent parameter gradients by placeholders: the bwd ops' fixed output tuple."""
    if dresidual_out is not None and not is_placeholder(dresidual_out):
        ds = ds + dresidual_out.to(ds.dtype)
    return (ds, *(empty_placeholder(summed) if g is None else g for g in param_grads))


@torch.library.custom_op("fastattn::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor,
    dresidual_out: Optional[Tensor],
    summed: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS.backward[backend](dy, dresidual_out, summed, weight, bias, mean, rstd, eps)


@layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, dresidual_out, summed, weight, bias, mean, rstd, eps, backend):
    like_or_placeholder = lambda t: empty_placeholder(summed) if t is None else t.new_empty(t.shape)
    return summed.new_empty(summed.shape), like_or_placeholder(weight), like_or_placeholder(bias)


def split_ds(ctx, ds: Tensor):
    """ds is the gradient of s = x + residual: it is dx and dresidual, in their dtypes.
    When both dtypes are s's, both are ds itself, not a copy: what PyTorch's own add
    gives, whose backward hands one gradient tensor to both inputs (and, through views
    such as our reshape of x and residual, may leave two leaves' .grad sharing memory
    exactly as x.reshape(...) + r.reshape(...) does natively)."""
    dx = ds.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dresidual = None
    if ctx.residual_dtype is not None and ctx.needs_input_grad[ctx.residual_index]:
        dresidual = ds.to(ctx.residual_dtype)
    return dx, dresidual


def save_norm_context(ctx, x, residual, residual_out, residual_index):
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.residual_index = residual_index
    return x if residual is None else residual_out


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, residual_in_fp32, backend = inputs
    y, residual_out, mean, rstd = output
    summed = save_norm_context(ctx, x, residual, residual_out, residual_index=3)
    ctx.save_for_backward(summed, weight, bias, mean, rstd)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, dy, dresidual_out, dmean, drstd):
    summed, weight, bias, mean, rstd = ctx.saved_tensors
    ds, dweight, dbias = layer_norm_bwd(dy, dresidual_out, summed, weight, bias, mean, rstd, ctx.eps,
                                        ctx.backend)
    dx, dresidual = split_ds(ctx, ds)
    return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
            dresidual, None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_norm_args(x, weight, bias, residual, eps, prenorm, residual_in_fp32):
    """Shared validation of layer_norm and rms_norm; returns hidden."""
    check.tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last (hidden) dim > 0, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check.tensor(name, t, ndim=1)
            check.shape(name, t, (hidden,), "(hidden,)")
            check.same_device(x=x, **{name: t})
    if residual is not None:
        check.tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        check.same_device(x=x, residual=residual)
    check.number("eps", eps, minimum=0.0)
    check.boolean("prenorm", prenorm)
    check.boolean("residual_in_fp32", residual_in_fp32)
    return hidden


def finish_norm(x, y, residual, residual_out, prenorm, residual_in_fp32):
    """Reshape back to x's shape; with prenorm also return s = x + residual."""
    y = y.reshape(x.shape)
    if not prenorm:
        return y
    if residual is None:
        return y, (x.float() if residual_in_fp32 and x.dtype != torch.float64 else x)
    return y, residual_out.reshape(x.shape)


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: Optional[str] = None,
):
    """Layer norm over the last dim of x, optionally of x + residual.

    x: (..., hidden); weight, bias: (hidden,) or None; residual: like x. The sum
    s = x + residual is formed in the residual's dtype (fp32 with residual_in_fp32)
    and normalized; y has x's dtype. prenorm=True returns (y, s) so s can feed the
    next residual branch.
    """
    hidden = check_norm_args(x, weight, bias, residual, eps, prenorm, residual_in_fp32)
    name = BACKENDS.resolve(backend, x.device, NormCall(x.dtype, hidden, residual is not None))
    x2d = x.reshape(-1, hidden)  # (rows, hidden)
    residual2d = None if residual is None else residual.reshape(-1, hidden)  # (rows, hidden)
    y, residual_out, _, _ = layer_norm_fwd(x2d, weight, bias, residual2d, float(eps), residual_in_fp32, name)
    return finish_norm(x, y, residual, residual_out, prenorm, residual_in_fp32)
