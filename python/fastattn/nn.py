"""torch.nn modules built on the fastattn ops.

| module           | op                                   | parameters (state_dict keys)            |
|------------------|--------------------------------------|-----------------------------------------|
| LayerNorm        | fastattn.layer_norm                  | weight, bias (as torch.nn.LayerNorm)    |
| RMSNorm          | fastattn.rms_norm                    | weight (as torch.nn.RMSNorm)            |
| FeedForward      | fastattn.ffn                         | fc1.{weight,bias}, fc2.{weight,bias}    |
| GatedFeedForward | fastattn.gated_ffn                   | gate_proj, up_proj, down_proj .weight   |
| Attention        | fastattn.attention, decode_attention | qkv_proj.{weight,bias}, out_proj...     |

Every module takes `backend=` at construction (None = the current default, see
fastattn.set_backend); the parameters do not depend on it, so a state_dict moves
between backends, and `module.backend = name` switches one in place. The linear
layers are plain nn.Linear modules (FeedForward's and GatedFeedForward's weights are
read by the fused ops, in nn.Linear's (out_features, in_features) layout).

Under torch.autocast the FFN modules cast their input and weights to the autocast
dtype, as autocast does for F.linear (a custom op is not autocast by torch itself);
the norms keep their input's dtype and form x + residual in the residual's dtype.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import backends as _backends
from .ops.attention import attention
from .ops.decode_attention import MAX_QUERY_LEN, decode_attention
from .ops.ffn import ffn
from .ops.gated_ffn import gated_ffn
from .ops.layer_norm import layer_norm
from .ops.rms_norm import rms_norm

__all__ = [
    "Attention",
    "FeedForward",
    "GatedFeedForward",
    "KVCache",
    "LayerKVCache",
    "LayerNorm",
    "RMSNorm",
    "apply_rotary",
    "rotary_cos_sin",
]

_ShapeLike = Union[int, Sequence[int], torch.Size]


def check_backend(backend: Optional[str]) -> Optional[str]:
    """None (the current default) or one of fastattn.backends.BACKENDS."""
    if backend is not None and backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be None or one of {', '.join(_backends.BACKENDS)}; got {backend!r}")
    return backend


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for x's device type, or None."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(dtype: Optional[torch.dtype], *tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    if dtype is None:
        return list(tensors)
    return [None if t is None else t.to(dtype) for t in tensors]


class _BackendMixin:
    """The `backend` attribute every module has, validated on assignment."""

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = check_backend(name)


# ----------------------------------------------------------------------------- norms


def _normalized_shape(normalized_shape: _ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(n) for n in normalized_shape)


class _Norm(_BackendMixin, nn.Module):
    """The common part of LayerNorm and RMSNorm: normalized_shape may span several
    trailing dims (as in torch.nn); they are flattened into one hidden dim."""

    def _flatten(self, t: Tensor) -> Tensor:
        dims = len(self.normalized_shape)
        if dims == 1:
            return t
        if tuple(t.shape[-dims:]) != self.normalized_shape:
            raise ValueError(
                f"input must end with the normalized_shape {self.normalized_shape}, got shape {tuple(t.shape)}"
            )
        return t.reshape(*t.shape[:-dims], -1)  # (..., prod(normalized_shape))

    def _weight(self, param: Optional[Tensor]) -> Optional[Tensor]:
        return None if param is None else param.reshape(-1)  # (hidden,)

    def _finish(self, x: Tensor, result, prenorm: bool):
        if prenorm:
            y, summed = result
            return y.reshape(x.shape), summed.reshape(x.shape)  # (..., *normalized_shape) each
        return result.reshape(x.shape)  # (..., *normalized_shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"backend={self.backend!r}")


class LayerNorm(_Norm):
    """torch.nn.LayerNorm on fastattn.layer_norm, with a fused residual add.

    forward(x, residual=None, prenorm=False): normalizes s = x + residual (x alone
    without a residual); prenorm=True returns (y, s) so that s feeds the next
    residual branch. y has x's dtype; s has the residual's.
    """

    def __init__(
        self,
        normalized_shape: _ShapeLike,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, prenorm: bool = False):
        result = layer_norm(
            self._flatten(x), self._weight(self.weight), self._weight(self.bias), self.eps,
            residual=None if residual is None else self._flatten(residual), prenorm=prenorm,
            backend=self.backend,
        )
        return self._finish(x, result, prenorm)


class RMSNorm(_Norm):
    """torch.nn.RMSNorm on fastattn.rms_norm, with a fused residual add.

    eps=None means torch.finfo(x.dtype).eps, as in torch.nn.RMSNorm. forward as in
    LayerNorm.
    """

    def __init__(
        self,
        normalized_shape: _ShapeLike,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, prenorm: bool = False):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        result = rms_norm(
            self._flatten(x), self._weight(self.weight), eps,
            residual=None if residual is None else self._flatten(residual), prenorm=prenorm,
            backend=self.backend,
        )
        return self._finish(x, result, prenorm)


# ----------------------------------------------------------------------------- FFN


class FeedForward(_BackendMixin, nn.Module):
    """act(x·W1ᵀ + b1)·W2ᵀ + b2 on fastattn.ffn; fc1 and fc2 are nn.Linear.

    activation: gelu, gelu_tanh, relu, silu. recompute=True keeps only x for the
    backward (the hidden activations are recomputed).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        d_out: Optional[int] = None,
        *,
        activation: str = "gelu",
        bias: bool = True,
        recompute: bool = False,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(d_model, d_hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(d_hidden, d_model if d_out is None else d_out, bias=bias, **factory)
        self.activation = activation
        self.recompute = recompute
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        x, w1, b1, w2, b2 = _cast(
            _autocast_dtype(x), x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        )
        return ffn(x, w1, b1, w2, b2, activation=self.activation, recompute=self.recompute,
                   backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend!r}"


class GatedFeedForward(_BackendMixin, nn.Module):
    """(act(x·W_gateᵀ) ⊙ x·W_upᵀ)·W_downᵀ on fastattn.gated_ffn (SwiGLU with silu,
    GeGLU with gelu). gate_proj, up_proj, down_proj are bias-free nn.Linear, named as
    in Llama's MLP so its state_dict loads as is."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        d_out: Optional[int] = None,
        *,
        activation: str = "silu",
        recompute: bool = False,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False, **factory)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False, **factory)
        self.down_proj = nn.Linear(d_hidden, d_model if d_out is None else d_out, bias=False, **factory)
        self.activation = activation
        self.recompute = recompute
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        x, w_gate, w_up, w_down = _cast(
            _autocast_dtype(x), x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        )
        return gated_ffn(x, w_gate, w_up, w_down, activation=self.activation, recompute=self.recompute,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- rotary


def rotary_cos_sin(
    positions: Tensor, head_dim: int, base: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles positions · base^(-2i/head_dim), fp32,
    each (*positions.shape, head_dim) with the half-dim angles repeated twice (the
    rotate-half layout of GPT-NeoX and Llama)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin in fp32, back in x's dtype. x: (B, H, T, D);
    cos, sin: (T, D) or (B, 1, T, D)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)  # (B, H, T, D)
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------- KV cache


class LayerKVCache:
    """One layer's keys and values for decoding, contiguous or paged.

    Contiguous: k, v (batch, kv_heads, capacity, head_dim). Paged: k, v (num_pages,
    kv_heads, page_size, head_dim) and block_table (batch, pages_per_seq) int32, where
    sequence b's position p lives in page block_table[b, p // page_size] at offset
    p % page_size. Storage is allocated on the first write, in the dtype and on the
    device of the keys written. All sequences have the same length (they advance in
    lockstep); `length` is how many positions are filled.
    """

    def __init__(self, batch: int, capacity: int, page_size: int = 0) -> None:
        if page_size < 0:
            raise ValueError(f"page_size must be >= 0 (0 = contiguous), got {page_size}")
        self.batch = batch
        self.capacity = capacity
        self.page_size = page_size
        self.length = 0
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.block_table: Optional[Tensor] = None

    def _allocate(self, k: Tensor, v: Tensor) -> None:
        kv_heads, head_dim, head_dim_v = k.shape[1], k.shape[3], v.shape[3]
        factory = {"dtype": k.dtype, "device": k.device}
        if self.page_size == 0:
            self.k = torch.zeros(self.batch, kv_heads, self.capacity, head_dim, **factory)
            self.v = torch.zeros(self.batch, kv_heads, self.capacity, head_dim_v, **factory)
            return
        pages_per_seq = -(-self.capacity // self.page_size)
        num_pages = self.batch * pages_per_seq
        self.k = torch.zeros(num_pages, kv_heads, self.page_size, head_dim, **factory)
        self.v = torch.zeros(num_pages, kv_heads, self.page_size, head_dim_v, **factory)
        # Pages are handed out in reverse so that a test of the paged path cannot pass by
        # reading the pool as if it were contiguous.
        pages = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=k.device)
        self.block_table = pages.reshape(self.batch, pages_per_seq)  # (batch, pages_per_seq)

    def reserve(self, k: Tensor, v: Tensor) -> None:
        """Claim positions length..length+T for k, v (batch, kv_heads, T, head_dim)
        without writing them (decode_attention's k_new/v_new writes them in place)."""
        new = k.shape[2]
        if self.length + new > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.capacity} positions; {self.length} are used and {new} more "
                "were written"
            )
        if self.k is None:
            self._allocate(k, v)
        self.length += new

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write k, v (batch, kv_heads, T, head_dim) at positions length..length+T."""
        self.reserve(k, v)
        start, end = self.length - k.shape[2], self.length
        if self.page_size == 0:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        else:
            positions = torch.arange(start, end, device=k.device)  # (T,)
            pages = self.block_table[:, positions // self.page_size].long()  # (batch, T)
            offsets = (positions % self.page_size).expand_as(pages)  # (batch, T)
            self.k[pages, :, offsets] = k.transpose(1, 2)  # (batch, T, kv_heads, head_dim)
            self.v[pages, :, offsets] = v.transpose(1, 2)  # (batch, T, kv_heads, head_dim_v)

    def dense(self) -> tuple[Tensor, Tensor]:
        """The filled keys and values, each (batch, kv_heads, length, head_dim)."""
        if self.page_size == 0:
            return self.k[:, :, : self.length], self.v[:, :, : self.length]
        pages = -(-self.length // self.page_size)
        table = self.block_table[:, :pages].long()  # (batch, pages)
        out = []
        for cache in (self.k, self.v):
            gathered = cache[table]  # (batch, pages, kv_heads, page_size, d)
            gathered = gathered.transpose(1, 2)  # (batch, kv_heads, pages, page_size, d)
            gathered = gathered.reshape(self.batch, cache.shape[1], -1, cache.shape[3])  # (b, hk, pages·page, d)
            out.append(gathered[:, :, : self.length])  # (batch, kv_heads, length, d)
        return out[0], out[1]

    def seqlens(self) -> Tensor:
        """(batch,) int32: the filled length of every sequence."""
        return torch.full((self.batch,), self.length, dtype=torch.int32, device=self.k.device)


class KVCache:
    """A LayerKVCache per layer, for `batch` sequences of up to `capacity` positions."""

    def __init__(self, n_layers: int, batch: int, capacity: int, page_size: int = 0) -> None:
        self.layers = [LayerKVCache(batch, capacity, page_size) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)


# ----------------------------------------------------------------------------- attention


class Attention(_BackendMixin, nn.Module):
    """Multi-head self-attention with grouped-query heads on fastattn.attention.

    qkv_proj projects d_model to (n_heads + 2·n_kv_heads)·head_dim (queries, then
    keys, then values); out_proj projects n_heads·head_dim back to d_model.
    causal=True masks future keys; with a KV cache, queries attend to the cached
    positions too (decode_attention for up to 16 new tokens a step, dense attention
    over the cache for a longer prefill).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        *,
        head_dim: Optional[int] = None,
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
            head_dim = d_model // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal = causal
        self.dropout = dropout
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **factory)

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Optional[Tensor] = None,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        kv_cache: Optional[LayerKVCache] = None,
    ) -> Tensor:
        """x: (B, T, d_model). key_padding_mask: (B, T) bool, True = a real token.
        rotary: (cos, sin) for the T positions, (T, head_dim) or (B, 1, T, head_dim).
        kv_cache: this layer's cache; x holds the positions after those cached."""
        batch, seqlen, _ = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (H + 2 Hk) D)
        q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
        q = q.reshape(batch, seqlen, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(batch, seqlen, kv_heads, head_dim).transpose(1, 2)  # (B, Hk, T, D)
        v = v.reshape(batch, seqlen, kv_heads, head_dim).transpose(1, 2)  # (B, Hk, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        bias = None
        if key_padding_mask is not None:
            bias = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None:
            out = attention(q, k, v, causal=self.causal, attn_bias=bias, dropout_p=dropout_p,
                            backend=self.backend)  # (B, H, T, D)
        else:
            out = self._attend_with_cache(q, k, v, bias, kv_cache)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seqlen, heads * head_dim)  # (B, T, H D)
        return self.out_proj(out)  # (B, T, d_model)

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                           kv_cache: LayerKVCache) -> Tensor:
        if not self.causal:
            raise ValueError("a KV cache is for causal (decoder) attention; this module has causal=False")
        if bias is not None:
            raise ValueError("key_padding_mask cannot be combined with a KV cache")
        if q.shape[2] <= MAX_QUERY_LEN:
            # decode_attention writes the new keys and values into the cache itself.
            kv_cache.reserve(k, v)
            return decode_attention(q, kv_cache.k, kv_cache.v, kv_cache.seqlens(), block_table=kv_cache.block_table,
                                    k_new=k, v_new=v, backend=self.backend)
        # A long prefill: write the cache, then dense attention over all of it, bottom-right causal.
        kv_cache.append(k, v)
        k_all, v_all = kv_cache.dense()  # (B, Hk, L, D)
        return attention(q, k_all, v_all, causal=True, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, backend={self.backend!r}")
