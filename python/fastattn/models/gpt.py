"""The reference Transformer: a GPT-style decoder built from fastattn.nn modules.

Pre-norm blocks (GPT-2) carry the residual stream beside the branch output and let
the fused residual + norm op add them, as in FlashAttention's Block:

    normed, residual = norm1(hidden, residual, prenorm=True)   # residual = hidden + residual
    hidden = attn(normed)
    normed, residual = norm2(hidden, residual, prenorm=True)
    hidden = mlp(normed)
    ... final: norm_f(hidden, residual)

which is x + attn(norm1(x)), then + mlp(norm2(·)), computed with one pass per norm.
Post-norm blocks (the original Transformer) are H = norm1(X + Attn(X)),
out = norm2(H + MLP(H)), each one fused norm(branch, residual=X) call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fnn
from .config import TransformerConfig

IGNORE_INDEX = -100


def sinusoidal_embedding(positions: Tensor, dim: int) -> Tensor:
    """The fixed positional encoding of Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/dim)),
    PE[p, 2i+1] = cos(...). positions (T,) -> (T, dim) fp32."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq  # (T, dim / 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(positions.shape[0], dim)  # (T, dim)


class Block(nn.Module):
    """One Transformer layer: attention then MLP, each with a norm and a residual."""

    def __init__(self, config: TransformerConfig, *, backend: Optional[str], device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = _norm(config, backend, factory)
        self.attn = fnn.Attention(
            config.d_model, config.n_heads, config.kv_heads, bias=config.bias, causal=config.causal,
            dropout=config.dropout, backend=backend, **factory,
        )
        self.norm2 = _norm(config, backend, factory)
        if config.mlp == "swiglu":
            self.mlp = fnn.GatedFeedForward(config.d_model, config.hidden_dim, activation="silu",
                                            backend=backend, **factory)
        else:
            self.mlp = fnn.FeedForward(config.d_model, config.hidden_dim, activation="gelu",
                                       bias=config.bias, backend=backend, **factory)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden: Tensor,
        residual: Optional[Tensor],
        *,
        key_padding_mask: Optional[Tensor] = None,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        kv_cache: Optional[fnn.LayerKVCache] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """hidden, residual: (B, T, d_model). Pre-norm: the residual stream is
        hidden + residual (residual None in the first layer). Post-norm: hidden is the
        stream and residual stays None."""
        attend = lambda x: self.drop(
            self.attn(x, key_padding_mask=key_padding_mask, rotary=rotary, kv_cache=kv_cache)
        )
        if self.pre_norm:
            normed, residual = self.norm1(hidden, residual=residual, prenorm=True)
            hidden = attend(normed)
            normed, residual = self.norm2(hidden, residual=residual, prenorm=True)
            return self.drop(self.mlp(normed)), residual
        hidden = self.norm1(attend(hidden), residual=hidden)  # H = LN(X + Attn(X))
        return self.norm2(self.drop(self.mlp(hidden)), residual=hidden), None


def _norm(config: TransformerConfig, backend: Optional[str], factory: dict) -> nn.Module:
    if config.norm == "rmsnorm":
        return fnn.RMSNorm(config.d_model, eps=config.norm_eps, backend=backend, **factory)
    return fnn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias, backend=backend, **factory)


class GPT(nn.Module):
    """Token embedding, positions, `n_layers` Blocks, a final norm (pre-norm only)
    and a language-model head (tied to the embedding when config.tie_embeddings).

    backend: the fastattn backend every op of the model runs on (None = the current
    default). Parameters do not depend on it: a state_dict moves between backends, and
    `model.backend = name` switches in place.
    """

    def __init__(self, config: TransformerConfig, *, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(config.vocab_size, config.d_model, **factory)
        self.pos_embed = (
            nn.Embedding(config.max_seq_len, config.d_model, **factory) if config.positions == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, backend=backend, **factory) for _ in range(config.n_layers)
        )
        self.norm_f = _norm(config, backend, factory) if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.backend = backend
        self.reset_parameters()

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = fnn.check_backend(name)
        for module in self.modules():
            if isinstance(module, fnn._BackendMixin):
                module.backend = name

    def reset_parameters(self) -> None:
        """GPT-2's initialization: N(0, init_std) weights, zero biases, unit norms, and
        the projections into the residual stream scaled by 1/sqrt(2·n_layers)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (fnn.LayerNorm, fnn.RMSNorm)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            out = block.mlp.down_proj if isinstance(block.mlp, fnn.GatedFeedForward) else block.mlp.fc2
            for linear in (block.attn.out_proj, out):
                nn.init.normal_(linear.weight, mean=0.0, std=residual_std)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for table in (self.embed, self.pos_embed):
                if table is not None:
                    params.pop(id(table.weight), None)
        return sum(p.numel() for p in params.values())

    def new_kv_cache(self, batch: int, capacity: int, *, page_size: int = 0) -> fnn.KVCache:
        """An empty KV cache for `batch` sequences of up to `capacity` positions
        (page_size > 0: a paged cache with pages of that many positions)."""
        if not self.config.causal:
            raise ValueError("a KV cache needs a causal model (config.causal=True)")
        if self.config.positions == "learned" and capacity > self.config.max_seq_len:
            raise ValueError(
                f"capacity ({capacity}) exceeds max_seq_len ({self.config.max_seq_len}) of learned positions"
            )
        return fnn.KVCache(self.config.n_layers, batch, capacity, page_size)

    def forward(
        self,
        idx: Tensor,
        targets: Optional[Tensor] = None,
        *,
        attention_mask: Optional[Tensor] = None,
        kv_cache: Optional[fnn.KVCache] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """idx: (B, T) token ids. targets: (B, T) ids, IGNORE_INDEX (-100) where no loss
        is taken. attention_mask: (B, T), 1/True for real tokens, 0/False for padding
        (keys only; a padded query's output is meaningless). kv_cache: from
        new_kv_cache; idx then holds the positions after those cached.
        Returns (logits (B, T, vocab_size), mean cross-entropy or None)."""
        config = self.config
        batch, seqlen = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if config.positions == "learned" and start + seqlen > config.max_seq_len:
            raise ValueError(
                f"sequence of {start + seqlen} positions exceeds max_seq_len ({config.max_seq_len})"
            )
        positions = torch.arange(start, start + seqlen, device=idx.device)  # (T,)
        hidden = self.embed(idx)  # (B, T, d_model)
        rotary = None
        if config.positions == "learned":
            hidden = hidden + self.pos_embed(positions)  # (B, T, d_model)
        elif config.positions == "sinusoidal":
            hidden = hidden + sinusoidal_embedding(positions, config.d_model).to(hidden.dtype)
        else:
            rotary = fnn.rotary_cos_sin(positions, config.head_dim, config.rope_base)  # 2 × (T, D)
        hidden = self.drop(hidden)
        residual = None
        for i, block in enumerate(self.blocks):
            hidden, residual = block(
                hidden, residual, key_padding_mask=attention_mask, rotary=rotary,
                kv_cache=None if kv_cache is None else kv_cache[i],
            )
        if self.norm_f is not None:
            hidden = self.norm_f(hidden, residual=residual)  # (B, T, d_model)
        logits = self.lm_head(hidden)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, config.vocab_size),  # (B T, vocab_size)
                targets.reshape(-1),  # (B T,)
                ignore_index=IGNORE_INDEX,
            )
        return logits, loss
