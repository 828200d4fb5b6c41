"""fastattn.varlen_attention: attention over packed variable-length sequences.

Registered ops:
    fastattn::varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, alibi_slopes?, rng_seed?, scale, window_left, window_right,
        softcap, dropout_p, backend) -> (out (total_q, h, dv), lse (h, total_q) fp32)
    fastattn::varlen_attention_bwd(dout, dlse?, ...) -> (dq, dk, dv)

Sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and the matching rows of
k/v; causal and windows are bottom-right aligned per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validate as check
from .. import reference
from . import attention as dense
from ._common import BackendTable, draw_rng_seed, is_placeholder, seeded_generator


def _naive_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                   rng_seed, scale, window_left, window_right, softcap, dropout_p):
    generator = seeded_generator(rng_seed, q.device) if dropout_p > 0 else None
    out, lse = reference.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, window_size=(window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, generator=generator,
        return_lse=True,
    )
    return out.contiguous(), lse.contiguous()


def _torch_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                   rng_seed, scale, window_left, window_right, softcap, dropout_p):
    """F.scaled_dot_product_attention once per sequence (PyTorch has no packed SDPA)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        q_i = q[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, h, sq_i, d)
        k_i = k[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, hk, sk_i, d)
        v_i = v[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, hk, sk_i, dv)
        slopes_i = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out_i, _ = dense.BACKENDS.forward["torch"](q_i, k_i, v_i, None, slopes_i, None, scale,
                                           window_left, window_right, False, softcap, dropout_p)
        outs.append(out_i[0].transpose(0, 1))  # (sq_i, h, dv)
    out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    return out.contiguous(), lse


def _reference_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, alibi_slopes, rng_seed, scale, window_left, window_right,
                        softcap, dropout_p):
    """The naive and torch backends' backward: reference.varlen_attention_backward."""
    generator = seeded_generator(rng_seed, q.device) if dropout_p > 0 else None
    return reference.varlen_attention_backward(
        dout, q, k, v, cu_seqlens_q, cu_seqlens_k, dlse=dlse, alibi_slopes=alibi_slopes, scale=scale,
        window_size=(window_left, window_right), softcap=softcap, dropout_p=dropout_p,
        generator=generator,
    )


def _triton_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                    rng_seed, scale, window_left, window_right, softcap, dropout_p):
    """The dense Triton kernels in their packed (IS_VARLEN) mode; max_seqlen_q/k size
    the grid, so nothing is read back from the device."""
    from fastattn.kernels import attention as kernels  # lazily: importing triton is slow

    return kernels.varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            alibi_slopes, rng_seed, scale, window_left, window_right, softcap,
                                            dropout_p)


def _triton_backward(*args):
    from fastattn.kernels import attention as kernels

    return kernels.varlen_attention_backward(*args)


BACKENDS = BackendTable(
    "varlen_attention",
    forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward},
    backward={"naive": _reference_backward, "torch": _reference_backward, "triton": _triton_backward},
    limits=dense.limits,
)


@torch.library.custom_op("fastattn::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Optional[Tensor],
    rng_seed: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return BACKENDS.forward[backend](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     alibi_slopes, rng_seed, scale, window_left, window_right, softcap,
                                     dropout_p)


@varlen_attention_fwd.register_fake
def _varlen_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               alibi_slopes, rng_seed, scale, window_left, window_right, softcap,
                               dropout_p, backend):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastattn::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Optional[Tensor],
    rng_seed: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS.backward[backend](dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                      max_seqlen_q, max_seqlen_k, alibi_slopes, rng_seed, scale,
                                      window_left, window_right, softcap, dropout_p)


@varlen_attention_bwd.register_fake
def _varlen_attention_bwd_fake(dout, dlse, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_SCALARS = ("max_seqlen_q", "max_seqlen_k")
_OPTIONS = ("scale", "window_left", "window_right", "softcap", "dropout_p", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, rng_seed, *options = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_seed)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = dict(zip(_OPTIONS, options))
    ctx.set_materialize_grads(False)  # no zero dlse when lse was not used (ops/attention.py)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_seed = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    if dlse is not None and is_placeholder(dlse):
        dlse = None
    dq, dk, dv = varlen_attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                      *ctx.max_seqlens, alibi_slopes, rng_seed, **ctx.options)
    return dq, dk, dv, *([None] * (6 + len(_OPTIONS)))


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Attention over packed sequences (no padding).

    q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim);
    cu_seqlens_q/k: (batch + 1,) int32 cumulative lengths starting at 0;
    max_seqlen_q/k: the longest sequence of each. Options as in fastattn.attention
    (causal and window bottom-right aligned per sequence). Returns out
    (total_q, heads, head_dim) and, with return_lse, lse (heads, total_q) fp32.
    The values of cu_seqlens (starting at 0, non-decreasing, ending at total, no
    sequence longer than max_seqlen) are checked for CPU tensors; on a GPU only with
    FASTATTN_DEBUG=1, since reading them back synchronises with the device.
    """
    device = dense.check_qkv(q, k, v, ndim=3, layout="(total, heads, head_dim)")
    dense.check_gqa(q.shape[1], k.shape[1])
    cu_q = check.cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
    cu_k = check.cu_seqlens("cu_seqlens_k", cu_seqlens_k, device)
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries; got "
            f"{cu_q.shape[0]} and {cu_k.shape[0]}"
        )
    check.integer("max_seqlen_q", max_seqlen_q, minimum=0)
    check.integer("max_seqlen_k", max_seqlen_k, minimum=0)
    window_left, window_right = dense.check_common_options(
        causal=causal, window_size=window_size, softcap=softcap, dropout_p=dropout_p,
        return_lse=return_lse,
    )
    scale = dense.check_scale(scale, q.shape[-1])
    slopes = dense.check_alibi_slopes(alibi_slopes, cu_q.shape[0] - 1, q.shape[1], device)
    if not check.tracing() and (check.debug_checks() or device.type == "cpu"):
        for name, cu, total, total_name, longest, longest_name in (
            ("cu_seqlens_q", cu_q, q.shape[0], "total_q (q.shape[0])", max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_k, k.shape[0], "total_k (k.shape[0])", max_seqlen_k, "max_seqlen_k"),
        ):
            values = check.cu_seqlens_values(name, cu, total, total_name)
            lengths = [b - a for a, b in zip(values, values[1:])]
            if lengths and max(lengths) > longest:
                raise ValueError(
                    f"{longest_name} ({longest}) is shorter than the longest sequence in {name} "
                    f"({max(lengths)})"
                )
    call = dense.AttentionCall(q.dtype, q.shape[-1], v.shape[-1], False, softcap, dropout_p, return_lse,
                               has_alibi=slopes is not None, batch=cu_q.shape[0] - 1)
    name = BACKENDS.resolve(backend, device, call)
    rng_seed = draw_rng_seed(device) if dropout_p > 0 else None
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, slopes, rng_seed,
                                    scale, window_left, window_right, float(softcap), float(dropout_p),
                                    name)
    return (out, lse) if return_lse else out
