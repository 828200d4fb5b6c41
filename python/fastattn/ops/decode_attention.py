"""fastattn.decode_attention: attention of a few new queries over a (paged) KV cache.

Registered op (forward only; decoding never needs a gradient):
    fastattn::decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, block_table?,
        alibi_slopes?, scale, window_left, softcap, backend)
        -> (out (b, h, q_len, dv), lse (b, h, q_len) fp32)

    fastattn::decode_attention_append(k_new, v_new, k_cache!, v_cache!, cache_seqlens,
        block_table?, backend) -> ()   (writes the new keys/values into the caches in place)

The q_len queries are the last q_len of the cache_seqlens[b] valid positions, causal
among themselves; window_left bounds how far back each query sees.

No call reads the device from the host (a decoding step stays asynchronous and can be
captured in a CUDA graph): shapes, dtypes and devices are checked on every call, but the
values of cache_seqlens and block_table only with FASTATTN_DEBUG=1. Otherwise the Triton
kernels clamp a bad value so that nothing outside the caches is read or written, and
flag it on the device; check_flagged_inputs() raises for what they flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import _validate as check
from .. import reference
from ..backends import triton_interpreter_on
from . import attention as dense
from ._common import BackendTable

MAX_QUERY_LEN = 16


@dataclass(frozen=True)
class DecodeCall:
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    paged: bool
    page_size: int
    softcap: float
    return_lse: bool
    batch: int = 1  # sequences: the kernels' grid axis z


def _naive_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale,
                   window_left, softcap):
    out, lse = reference.decode_attention(
        q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale,
        window_size=(window_left, -1), softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True,
    )
    return out.contiguous(), lse.contiguous()


def _torch_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale,
                   window_left, softcap):
    """One batched F.scaled_dot_product_attention over the whole cache with a
    length + causal (+ window) mask; a paged cache is gathered into a dense one first."""
    if block_table is not None:
        batch, pages = block_table.shape
        page_size = k_cache.shape[2]
        # entries past a sequence's length may hold anything (they are masked out below):
        # clamped, so that the gather stays in range
        pages_in_range = block_table.long().clamp(0, max(k_cache.shape[0] - 1, 0))
        gathered = (
            cache[pages_in_range]  # (b, pages, hk, page_size, d)
            .transpose(1, 2)
            .reshape(batch, cache.shape[1], pages * page_size, cache.shape[3])  # (b, hk, L, d)
            for cache in (k_cache, v_cache)
        )
        k_cache, v_cache = gathered
    q_len, max_len = q.shape[2], k_cache.shape[2]
    # Query t of sequence b sits at absolute position cache_seqlens[b] - q_len + t.
    query_pos = cache_seqlens.long()[:, None] - q_len + torch.arange(q_len, device=q.device)  # (b, q_len)
    key_pos = torch.arange(max_len, device=q.device)  # (L,)
    visible = key_pos[None, None, :] <= query_pos[:, :, None]  # (b, q_len, L)
    if window_left >= 0:
        visible &= key_pos[None, None, :] >= query_pos[:, :, None] - window_left
    mask = visible[:, None]  # (b, 1, q_len, L)
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]  # (b|1, h)
        distance = (query_pos[:, :, None] - key_pos[None, None, :]).abs().to(q.dtype)  # (b, q_len, L)
        mask = (-slopes[:, :, None, None].to(q.dtype) * distance[:, None]).masked_fill(
            ~visible[:, None], float("-inf")
        )  # (b, h, q_len, L)
    out = dense.TORCH_SDPA(
        q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1]
    )
    out = torch.nan_to_num(out, nan=0.0)
    lse = torch.full(q.shape[:3], float("inf"), dtype=torch.float32, device=q.device)
    return out.contiguous(), lse


def _triton_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale, window_left,
                    softcap):
    from fastattn.kernels import decode as kernels  # lazily: importing triton is slow

    return kernels.decode_attention_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale,
                                            window_left, softcap)


def _limits(backend: str, call: DecodeCall) -> Optional[str]:
    if backend == "triton":
        if reason := dense.grid_batch_limit(call):
            return reason
        if call.dtype not in dense.TRITON_DTYPES:
            return f"the Triton kernels take float16, bfloat16 or float32, got {check.dtype_name(call.dtype)}"
        if call.dtype == torch.bfloat16 and triton_interpreter_on():
            return "the Triton interpreter (TRITON_INTERPRET=1) computes tl.dot on bfloat16 wrongly"
        if max(call.head_dim, call.head_dim_v) > dense.TRITON_MAX_HEAD_DIM:
            return (f"the Triton kernels take head_dim up to {dense.TRITON_MAX_HEAD_DIM}, got "
                    f"{call.head_dim} (k) and {call.head_dim_v} (v)")
    if backend == "torch":
        if call.softcap > 0:
            return "F.scaled_dot_product_attention has no softcap"
        if call.return_lse:
            return "F.scaled_dot_product_attention does not return the logsumexp"
    return None


BACKENDS = BackendTable(
    "decode_attention", forward={"naive": _naive_forward, "torch": _torch_forward, "triton": _triton_forward},
    backward={},
    limits=_limits,
)


@torch.library.custom_op("fastattn::decode_attention_fwd", mutates_args=())
def decode_attention_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    scale: float,
    window_left: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return BACKENDS.forward[backend](q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                     scale, window_left, softcap)


@decode_attention_fwd.register_fake
def _decode_attention_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                               scale, window_left, softcap, backend):
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(batch, heads, q_len, v_cache.shape[-1])
    lse = q.new_empty(batch, heads, q_len, dtype=torch.float32)
    return out, lse


def _torch_append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table):
    """Index writes: row t of sequence b goes to position cache_seqlens[b] - q_len + t."""
    q_len = k_new.shape[2]
    positions = cache_seqlens.long()[:, None] - q_len + torch.arange(q_len, device=k_new.device)  # (b, q_len)
    if block_table is None:
        index = (torch.arange(k_new.shape[0], device=k_new.device)[:, None], slice(None), positions)
    else:
        page_size = k_cache.shape[2]
        pages = block_table.long().gather(1, positions // page_size)  # (b, q_len)
        index = (pages, slice(None), positions % page_size)
    for new, cache in ((k_new, k_cache), (v_new, v_cache)):
        cache[index] = new.transpose(1, 2).to(cache.dtype)  # (b, q_len, hk, d) at (b, q_len) rows


def _triton_append(*args):
    from fastattn.kernels import decode as kernels

    kernels.decode_attention_append(*args)


APPEND = {"triton": _triton_append}  # other backends use _torch_append


@torch.library.custom_op("fastattn::decode_attention_append", mutates_args=("k_cache", "v_cache"))
def decode_attention_append(
    k_new: Tensor,
    v_new: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    backend: str,
) -> None:
    APPEND.get(backend, _torch_append)(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)


@decode_attention_append.register_fake
def _decode_attention_append_fake(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, backend):
    return None


def _check_new_kv(k_new, v_new, k_cache, v_cache, batch, q_len, device) -> None:
    """k_new (batch, kv_heads, q_len, head_dim) and v_new (..., head_dim_v), both or neither,
    in the caches' dtype and on their device."""
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or neither)")
    if k_new is None:
        return
    check.tensor("k_new", k_new, ndim=4)
    check.tensor("v_new", v_new, ndim=4)
    check.same_dtype(k_cache=k_cache, k_new=k_new, v_new=v_new)
    check.on_device(device, k_new=k_new, v_new=v_new)
    kv_heads = k_cache.shape[1]
    check.shape("k_new", k_new, (batch, kv_heads, q_len, k_cache.shape[-1]), "(batch, kv_heads, q_len, head_dim)")
    check.shape("v_new", v_new, (batch, kv_heads, q_len, v_cache.shape[-1]),
                "(batch, kv_heads, q_len, head_dim_v)")


def _check_cache_values(seqlens: Tensor, block_table: Optional[Tensor], num_pages: int, page_size: int, q_len: int,
                        capacity: int) -> None:
    """cache_seqlens in [q_len, capacity] and the block_table entries in use in
    [0, num_pages) (this reads them on the host)."""
    lengths = seqlens.tolist()
    if min(lengths) < q_len or max(lengths) > capacity:
        where = "block_table pages × page_size" if block_table is not None else "the cache's max_len"
        raise ValueError(
            f"cache_seqlens must lie in [q_len, capacity] = [{q_len}, {capacity}] ({where}); "
            f"got min {min(lengths)}, max {max(lengths)}"
        )
    if block_table is not None:
        check.block_table_values(block_table, lengths, page_size, num_pages, "k_cache", unit="page")


def check_flagged_inputs(device=None) -> None:
    """Raise the ValueError for the bad cache_seqlens / block_table values that the Triton
    decode kernels on `device` (default: the current CUDA device, else the CPU) met since the last
    check, and clear the flags. It reads the device (a synchronisation): call it outside
    the decoding loop or CUDA graph, or run with FASTATTN_DEBUG=1 to check every call."""
    from fastattn.kernels import decode as kernels

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    flags = kernels.error_flags(device)
    found = int(flags.item())
    flags.zero_()
    problems = []
    if found & kernels.BAD_LENGTH.value:
        problems.append("cache_seqlens outside [q_len, capacity] (clamped)")
    if found & kernels.BAD_PAGE.value:
        problems.append("block_table entries outside 0..num_pages - 1 of k_cache (clamped)")
    if problems:
        raise ValueError(f"decode_attention met bad input since the last check: {'; '.join(problems)}; "
                         f"the outputs of those calls are not meaningful")


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    scale: Optional[float] = None,
    block_table: Optional[Tensor] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    return_lse: bool = False,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    backend: Optional[str] = None,
):
    """Decoding attention over a KV cache (forward only).

    q: (batch, heads, q_len, head_dim), q_len 1..16. Contiguous cache: k_cache, v_cache
    (batch, kv_heads, max_len, head_dim). Paged cache: (num_pages, kv_heads, page_size,
    head_dim) with block_table (batch, max_pages) int32. cache_seqlens (batch,) int32
    counts the valid cache entries including the current q_len tokens (its values, and
    block_table's, are checked on the host except on the triton backend, whose kernels
    never read them back but clamp and flag bad ones: see check_flagged_inputs; there
    FASTATTN_DEBUG=1 checks them on the host too).
    window_size: only the left side applies (the queries are the newest positions). Returns out
    (batch, heads, q_len, head_dim) and, with return_lse, lse (batch, heads, q_len).
    k_new, v_new: optional (batch, kv_heads, q_len, head_dim) keys and values of the q_len
    new tokens, written IN PLACE into k_cache / v_cache at positions cache_seqlens[b] -
    q_len .. cache_seqlens[b] - 1 of each sequence (cache_seqlens still counts them)
    before attending; both or neither; validated before anything is written.
    """
    check.tensor("q", q, ndim=4)
    check.tensor("k_cache", k_cache, ndim=4)
    check.tensor("v_cache", v_cache, ndim=4)
    check.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    device = check.same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    batch, heads, q_len, head_dim = q.shape
    if not 1 <= q_len <= MAX_QUERY_LEN:
        raise ValueError(f"q_len (dim 2 of q, (batch, heads, q_len, head_dim)) must be in 1..{MAX_QUERY_LEN}, got {q_len}")
    if k_cache.shape[-1] != head_dim or head_dim == 0:
        raise ValueError(
            f"k_cache head_dim ({k_cache.shape[-1]}) must equal q's head_dim ({head_dim}) and be > 0"
        )
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise ValueError(
            f"k_cache and v_cache must agree on every dim but head_dim; got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    dense.check_gqa(heads, k_cache.shape[1])
    seqlens = check.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    check.shape("cache_seqlens", seqlens, (batch,), "(batch,)")
    check.same_device(q=q, cache_seqlens=seqlens)
    seqlens = seqlens.contiguous()  # the kernels read entry b at offset b
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"a contiguous k_cache must have shape (batch, kv_heads, max_len, head_dim) with "
                f"batch {batch}, got {tuple(k_cache.shape)} (pass block_table for a paged cache)"
            )
        capacity = k_cache.shape[2]
    else:
        table = check.tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        check.same_device(q=q, block_table=table)
        if table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (batch, max_pages) with batch {batch}, got {tuple(table.shape)}")
        if k_cache.shape[2] == 0:
            raise ValueError(f"a paged k_cache (num_pages, kv_heads, page_size, head_dim) needs page_size >= 1, "
                             f"got shape {tuple(k_cache.shape)}")
        capacity = table.shape[1] * k_cache.shape[2]
    left, _ = check.window("window_size", window_size)
    check.number("softcap", softcap, minimum=0.0)
    check.boolean("return_lse", return_lse)
    scale = dense.check_scale(scale, head_dim)
    slopes = dense.check_alibi_slopes(alibi_slopes, batch, heads, device)
    _check_new_kv(k_new, v_new, k_cache, v_cache, batch, q_len, device)
    call = DecodeCall(q.dtype, head_dim, v_cache.shape[-1], block_table is not None, k_cache.shape[2], softcap,
                      return_lse, batch)
    name = BACKENDS.resolve(backend, device, call)
    # The Triton kernels clamp bad values and flag them on the device (check_flagged_inputs);
    # the other backends would index out of range, so their values are always checked.
    if (check.debug_checks() or name != "triton") and not check.tracing() and batch > 0:
        _check_cache_values(seqlens, block_table, k_cache.shape[0], k_cache.shape[2], q_len, capacity)
    if k_new is not None:
        decode_attention_append(k_new, v_new, k_cache, v_cache, seqlens, block_table, name)
    out, lse = decode_attention_fwd(q, k_cache, v_cache, seqlens, block_table, slopes, scale, left,
                                    float(softcap), name)
    return (out, lse) if return_lse else out
