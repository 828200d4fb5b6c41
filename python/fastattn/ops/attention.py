"""fastattn.attention and fastattn.scaled_dot_product_attention.

Registered ops (the one dispatch point for every backend):
    fastattn::attention_fwd(q, k, v, attn_bias?, alibi_slopes?, rng_seed?, scale,
                            window_left, window_right, top_left, softcap, dropout_p,
                            backend) -> (out (b, h, sq, dv), lse (b, h, sq) fp32)
    fastattn::attention_bwd(dout, dlse?, q, k, v, out, lse, ..., bias_needs_grad,
                            backend) -> (dq, dk, dv, dbias)

Masking is one rule (see reference.py): key j is visible from query i iff
i + off - window_left <= j <= i + off + window_right, off = sk - sq (bottom-right,
attention()) or 0 (top-left, scaled_dot_product_attention()); causal = window_right 0.

rng_seed (given when dropout_p > 0) is the dropout state of the call, a (2,) int64
tensor (Philox key, counter offset) on q's device, drawn by a torch RNG op on that
device (_common.draw_rng_seed): the Triton kernels load it, so it forks no compile and a
CUDA graph replay draws a new mask; the backward replays the forward's mask from it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension
from .. import _validate as check
from .. import reference
from ..backends import triton_interpreter_on
from ._common import (
    BackendTable,
    draw_rng_seed,
    empty_placeholder,
    is_placeholder,
    seeded_generator,
)


# PyTorch's own SDPA, bound at import: fastattn.patch_sdpa() replaces the attribute of
# torch.nn.functional, and the torch backend must still reach PyTorch's function.
TORCH_SDPA = F.scaled_dot_product_attention


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to say whether it can serve a call."""

    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    has_bias: bool
    softcap: float
    dropout_p: float
    return_lse: bool
    has_alibi: bool = False
    batch: int = 1  # sequences: the kernels' grid axis z


# ----------------------------------------------------------------------------- backends


def _naive_forward(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                   top_left, softcap, dropout_p):
    generator = seeded_generator(rng_seed, q.device) if dropout_p > 0 else None
    out, lse = reference.attention(
        q, k, v, scale=scale, window_size=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, attn_bias=attn_bias, dropout_p=dropout_p,
        generator=generator, return_lse=True, top_left=top_left,
    )
    return out.contiguous(), lse.contiguous()


def sdpa_mask(q, k, attn_bias, alibi_slopes, window_left, window_right, top_left):
    """The attn_mask / is_causal pair that makes F.scaled_dot_product_attention compute
    our masking rule; None mask when nothing needs one."""
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    if attn_bias is None and alibi_slopes is None and top_left and window_left < 0 and window_right == 0:
        return None, True
    visible = reference.attention_visibility(
        seqlen_q, seqlen_k, window_left, window_right, top_left, q.device
    )
    mask = attn_bias
    if alibi_slopes is not None:
        alibi = reference.alibi_bias(alibi_slopes, seqlen_q, seqlen_k, top_left, q.dtype)
        if mask is None:
            mask = alibi
        elif mask.dtype == torch.bool:
            visible = mask if visible is None else visible & mask
            mask = alibi
        else:
            mask = mask.to(q.dtype) + alibi
    if visible is not None:
        if mask is None:
            mask = visible
        elif mask.dtype == torch.bool:
            mask = mask & visible
        else:
            mask = mask.to(q.dtype).masked_fill(~visible, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return mask, False


def _torch_forward(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                   top_left, softcap, dropout_p):
    """F.scaled_dot_product_attention with our masks; `limits` refuses dropout, softcap, lse."""
    mask, is_causal = sdpa_mask(q, k, attn_bias, alibi_slopes, window_left, window_right, top_left)
    out = TORCH_SDPA(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    if mask is not None:
        # A fully masked row: SDPA's fused kernels may give NaN where we promise 0.
        out = torch.nan_to_num(out, nan=0.0)
    # SDPA does not return the logsumexp: the torch backend refuses return_lse, and
    # its backward (the reference formulas) does not read this.
    lse = torch.full(q.shape[:3], float("inf"), dtype=torch.float32, device=q.device)
    return out.contiguous(), lse


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
# CUDA grid axes y and z hold at most 65535 blocks; the Triton and CUDA kernels put the
# batch (the number of sequences) on one of them.
GRID_MAX_BATCH = 65535


def grid_batch_limit(call) -> Optional[str]:
    """Why a call's batch does not fit the kernels' grid, or None."""
    if call.batch > GRID_MAX_BATCH:
        return (f"the kernels launch one grid row per sequence, at most {GRID_MAX_BATCH}; got a batch of "
                f"{call.batch} sequences (split the batch)")
    return None


def limits(backend: str, call: AttentionCall) -> Optional[str]:
    if backend in ("triton", "cuda") and (reason := grid_batch_limit(call)):
        return reason
    if backend == "triton":
        if call.dtype not in TRITON_DTYPES:
            return f"the Triton kernels take float16, bfloat16 or float32, got {check.dtype_name(call.dtype)}"
        if call.dtype == torch.bfloat16 and triton_interpreter_on():
            return "the Triton interpreter (TRITON_INTERPRET=1) computes tl.dot on bfloat16 wrongly"
        if max(call.head_dim, call.head_dim_v) > TRITON_MAX_HEAD_DIM:
            return (f"the Triton kernels take head_dim up to {TRITON_MAX_HEAD_DIM}, got head_dim "
                    f"{call.head_dim} (q, k) and {call.head_dim_v} (v)")
    if backend == "cuda":
        return _cuda_limits(call)
    if backend == "torch":
        if call.softcap > 0:
            return "F.scaled_dot_product_attention has no softcap"
        if call.return_lse:
            return "F.scaled_dot_product_attention does not return the logsumexp"
        if call.dropout_p > 0:
            return "SDPA's dropout mask cannot be replayed by the backward"
    return None


def _reference_backward(dout, dlse, q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed, scale,
                        window_left, window_right, top_left, softcap, dropout_p, bias_needs_grad):
    """The naive and torch backends' backward: the explicit formulas of
    reference.attention_backward (P recomputed; dropout replayed from rng_seed)."""
    generator = seeded_generator(rng_seed, q.device) if dropout_p > 0 else None
    dq, dk, dv, dbias = reference.attention_backward(
        dout, q, k, v, dlse=dlse, scale=scale, window_size=(window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, dropout_p=dropout_p,
        generator=generator, top_left=top_left, bias_needs_grad=bias_needs_grad,
    )
    return dq, dk, dv, empty_placeholder(q) if dbias is None else dbias


def _triton_forward(*args):
    from fastattn.kernels import attention as kernels  # lazily: importing triton is slow

    return kernels.attention_forward(*args)


def _triton_backward(*args):
    from fastattn.kernels import attention as kernels

    return kernels.attention_backward(*args)


CUDA_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def cuda_head_dims() -> tuple[int, ...]:
    """The head dims fastattn._C's attention kernels are built for; () without it."""
    if _extension.unavailable_reason() is not None:
        return ()
    return tuple(torch.ops.fastattn_cuda.attention_head_dims())


def _cuda_limits(call: AttentionCall) -> Optional[str]:
    if call.dtype not in CUDA_DTYPES:
        return f"the CUDA kernels take float16 or bfloat16, got {check.dtype_name(call.dtype)}"
    head_dims = cuda_head_dims()
    if call.head_dim not in head_dims or call.head_dim_v != call.head_dim:
        return (f"the CUDA kernels take head_dim in {head_dims} for q, k and v alike, got "
                f"{call.head_dim} (q, k) and {call.head_dim_v} (v)")
    if call.has_bias:
        return "the CUDA kernels take no attn_bias"
    if call.has_alibi:
        return "the CUDA kernels take no alibi_slopes"
    if call.softcap > 0:
        return "the CUDA kernels have no softcap"
    if call.dropout_p > 0:
        return "the CUDA kernels have no dropout"
    return None


def _cuda_forward(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left, window_right,
                  top_left, softcap, dropout_p):
    """csrc/attention's forward; `limits` refuses bias, ALiBi, softcap and dropout."""
    _extension.extension()  # loads the fastattn_cuda ops
    return torch.ops.fastattn_cuda.attention_fwd(q, k, v, scale, window_left, window_right, top_left)


def _cuda_backward(dout, dlse, q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed, scale,
                   window_left, window_right, top_left, softcap, dropout_p, bias_needs_grad):
    _extension.extension()
    dq, dk, dv = torch.ops.fastattn_cuda.attention_bwd(dout, dlse, q, k, v, out, lse, scale,
                                                       window_left, window_right, top_left)
    return dq, dk, dv, empty_placeholder(q)


BACKENDS = BackendTable(
    "attention",
    forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward,
             "cuda": _cuda_forward},
    backward={"naive": _reference_backward, "torch": _reference_backward, "triton": _triton_backward,
              "cuda": _cuda_backward},
    limits=limits,
)


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    rng_seed: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    top_left: bool,
    softcap: float,
    dropout_p: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return BACKENDS.forward[backend](q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left,
                                     window_right, top_left, softcap, dropout_p)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, attn_bias, alibi_slopes, rng_seed, scale, window_left,
                        window_right, top_left, softcap, dropout_p, backend):
    batch, heads, seqlen_q, _ = q.shape
    out = q.new_empty(batch, heads, seqlen_q, v.shape[-1])
    lse = q.new_empty(batch, heads, seqlen_q, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    rng_seed: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    top_left: bool,
    softcap: float,
    dropout_p: float,
    bias_needs_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS.backward[backend](dout, dlse, q, k, v, out, lse, attn_bias, alibi_slopes,
                                      rng_seed, scale, window_left, window_right, top_left, softcap,
                                      dropout_p, bias_needs_grad)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed, scale,
                        window_left, window_right, top_left, softcap, dropout_p, bias_needs_grad,
                        backend):
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_needs_grad else empty_placeholder(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


_SCALARS = ("scale", "window_left", "window_right", "top_left", "softcap", "dropout_p", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, alibi_slopes, rng_seed, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed)
    ctx.scalars = dict(zip(_SCALARS, scalars))
    # An output nobody used gets None, not zeros: a call without return_lse then runs the
    # backward without the dlse term (a zero dlse would be loaded and added for nothing).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed = ctx.saved_tensors
    bias_needs_grad = bool(ctx.needs_input_grad[3])
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    if dlse is not None and is_placeholder(dlse):
        dlse = None
    dq, dk, dv, dbias = attention_bwd(
        dout, dlse, q, k, v, out, lse, attn_bias, alibi_slopes, rng_seed, bias_needs_grad=bias_needs_grad,
        **ctx.scalars,
    )
    return dq, dk, dv, (dbias if bias_needs_grad else None), None, None, *([None] * len(_SCALARS))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- validation


def check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return check.number("scale", scale, positive=True)


def check_alibi_slopes(alibi_slopes: object, batch: int, heads: int, device) -> Optional[Tensor]:
    """(heads,) or (batch, heads) float slopes, on the device of q."""
    slopes = check.optional_tensor("alibi_slopes", alibi_slopes, ndim=(1, 2))
    if slopes is not None:
        expected = (heads,) if slopes.dim() == 1 else (batch, heads)
        check.shape("alibi_slopes", slopes, expected, "(heads,)" if slopes.dim() == 1 else "(batch, heads)")
        check.on_device(device, alibi_slopes=slopes)
    return slopes


def check_common_options(*, causal, window_size, softcap, dropout_p, return_lse):
    """The scalar options attention, varlen_attention and decode_attention share.
    Returns (window_left, window_right) with causal folded in (right = 0)."""
    check.boolean("causal", causal)
    check.boolean("return_lse", return_lse)
    left, right = check.window("window_size", window_size)
    check.number("softcap", softcap, minimum=0.0)
    check.number("dropout_p", dropout_p, minimum=0.0, below=1.0)
    return left, (0 if causal else right)


def check_qkv(q: object, k: object, v: object, *, ndim: int, layout: str):
    """q, k, v are tensors of rank `ndim`, one float dtype, one device, with matching
    head_dim (q, k), kv_heads and lengths (k, v). `layout` names the dims for messages.
    Returns the device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, ndim=ndim, dtypes=check.FLOAT_DTYPES)
    check.same_dtype(q=q, k=k, v=v)
    device = check.same_device(q=q, k=k, v=v)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head_dim (last dim of {layout}); got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"head_dim (last dim of q, {layout}) must be > 0, got shape {tuple(q.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must agree on every dim but head_dim ({layout}); got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}"
        )
    return device


def check_gqa(heads: int, kv_heads: int) -> None:
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"heads of q ({heads}) must be a multiple of kv_heads of k/v ({kv_heads}) (GQA/MQA)"
        )


def _check_attn_bias(attn_bias: object, q: Tensor, k: Tensor, device) -> Optional[Tensor]:
    bias = check.optional_tensor(
        "attn_bias", attn_bias, dtypes=(torch.bool,) + check.FLOAT_DTYPES
    )
    if bias is not None:
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        check.broadcastable("attn_bias", bias, target, "(batch, heads, seqlen_q, seqlen_k)")
        check.same_device(q=q, attn_bias=bias)
        if bias.dim() < 4:
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # (.., .., sq|1, sk|1)
    return bias


# ----------------------------------------------------------------------------- public API


def _run(q, k, v, bias, slopes, scale, window_left, window_right, top_left, softcap, dropout_p,
         return_lse, backend):
    """Resolve the backend, draw the dropout seed and call the registered op."""
    call = AttentionCall(q.dtype, q.shape[-1], v.shape[-1], bias is not None, softcap, dropout_p,
                         return_lse, has_alibi=slopes is not None, batch=q.shape[0])
    name = BACKENDS.resolve(backend, q.device, call)
    rng_seed = draw_rng_seed(q.device) if dropout_p > 0 else None
    out, lse = attention_fwd(q, k, v, bias, slopes, rng_seed, scale, window_left, window_right,
                             top_left, float(softcap), float(dropout_p), name)
    return (out, lse) if return_lse else out


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Scaled dot-product attention, FlashAttention-style options.

    q: (batch, heads, seqlen_q, head_dim); k, v: (batch, kv_heads, seqlen_k, head_dim),
    heads % kv_heads == 0; any strides; float16, bfloat16, float32 (float64 on the
    naive and torch backends).
    causal: bottom-right aligned (query i sees keys j <= i + seqlen_k - seqlen_q).
    window_size: (left, right) sliding window, -1 = unbounded, same alignment.
    softcap: scores become softcap·tanh(scores/softcap) when > 0.
    alibi_slopes: (heads,) or (batch, heads); adds -slope·|i + sk - sq - j|.
    attn_bias: float (added to the scores) or bool (True = attend), broadcastable to
    (batch, heads, seqlen_q, seqlen_k); receives a gradient if it requires grad.
    dropout_p: drop probability on the attention weights, seeded from torch's
    default generator (torch.manual_seed reproduces it).
    Returns out (batch, heads, seqlen_q, head_dim), and lse (batch, heads, seqlen_q)
    fp32 when return_lse. A fully masked row gives 0 (lse -inf).
    """
    check_qkv(q, k, v, ndim=4, layout="(batch, heads, seqlen, head_dim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    check_gqa(q.shape[1], k.shape[1])
    window_left, window_right = check_common_options(
        causal=causal, window_size=window_size, softcap=softcap, dropout_p=dropout_p,
        return_lse=return_lse,
    )
    scale = check_scale(scale, q.shape[-1])
    slopes = check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[1], q.device)
    bias = _check_attn_bias(attn_bias, q, k, q.device)
    return _run(q, k, v, bias, slopes, scale, window_left, window_right, False, softcap, dropout_p,
                return_lse, backend)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (top-left causal).

    query (N, ..., L, E), key (N, ..., S, E), value (N, ..., S, Ev); the leading dims
    other than heads (dim -3) must match; heads may differ only with enable_gqa=True.
    Runs on the current default backend (fastattn.set_backend / use_backend).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check.tensor(name, t, dtypes=None)
        if t.dim() < 3:
            raise ValueError(f"{name} must be at least 3-D (N, ..., L, E), got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"query, key and value must have the same rank; got {query.dim()}, {key.dim()}, {value.dim()}"
        )
    check.boolean("is_causal", is_causal)
    check.boolean("enable_gqa", enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be given (as in PyTorch SDPA)")
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(
            f"query, key and value must share the leading dims {tuple(lead)}; got key "
            f"{tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[-3]} heads but key has {key.shape[-3]}; pass enable_gqa=True "
            "for grouped-query attention"
        )
    flat = (-1,) + tuple(query.shape[-3:])
    q = query.reshape(flat) if query.dim() != 4 else query  # (N', H, L, E)
    k = key.reshape((-1,) + tuple(key.shape[-3:])) if key.dim() != 4 else key  # (N', Hk, S, E)
    v = value.reshape((-1,) + tuple(value.shape[-3:])) if value.dim() != 4 else value  # (N', Hk, S, Ev)
    check_qkv(q, k, v, ndim=4, layout="(N, ..., L, E)")
    check_gqa(q.shape[1], k.shape[1])
    check.number("dropout_p", dropout_p, minimum=0.0, below=1.0)
    scale = check_scale(scale, q.shape[-1])
    bias = None
    if attn_mask is not None:
        check.tensor("attn_mask", attn_mask, dtypes=(torch.bool,) + check.FLOAT_DTYPES)
        target = tuple(query.shape[:-1]) + (key.shape[-2],)
        check.broadcastable("attn_mask", attn_mask, target, "(N, ..., L, S)")
        check.same_device(query=query, attn_mask=attn_mask)
        bias = attn_mask.expand(target).reshape(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) \
            if query.dim() != 4 else _check_attn_bias(attn_mask, q, k, q.device)
    out = _run(q, k, v, bias, None, scale, -1, 0 if is_causal else -1, True, 0.0, float(dropout_p),
               False, None)
    return out.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))  # (N, ..., L, Ev)
