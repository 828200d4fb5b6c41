"""The reference Transformer's configuration and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class TransformerConfig:
    """A GPT-style decoder (or, with causal=False, an encoder).

    norm: layernorm | rmsnorm. norm_position: pre (GPT-2: x + f(norm(x)), and a final
    norm) or post (the original Transformer: norm(x + f(x)), no final norm).
    mlp: gelu (Linear, GELU, Linear) | swiglu (gated, no biases). positions: learned |
    sinusoidal (added to the token embeddings) | rope (rotary, on queries and keys).
    n_kv_heads < n_heads gives grouped-query attention (None = n_heads). d_ff None =
    4·d_model for gelu, 8·d_model/3 rounded up to a multiple of 256 for swiglu.
    causal=False: bidirectional attention, for encoders with a key-padding mask.
    """

    vocab_size: int = 320
    max_seq_len: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    positions: str = "learned"
    rope_base: float = 10000.0
    dropout: float = 0.0
    causal: bool = True
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name, options in (("norm", NORMS), ("norm_position", NORM_POSITIONS), ("mlp", MLPS),
                              ("positions", POSITIONS)):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"positions='rope' needs an even head_dim, got {self.head_dim}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"positions='sinusoidal' needs an even d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """The FFN's hidden width."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return round_up(8 * self.d_model // 3, 256)
        return 4 * self.d_model

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> "TransformerConfig":
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
        return PRESETS[name].replace(**changes)


PRESETS: dict[str, TransformerConfig] = {
    # For tests and smoke runs: a GPT-2-shaped model small enough for the Triton interpreter.
    "tiny": TransformerConfig(),
    # GPT-2 124M and 350M (Radford et al. 2019): learned positions, pre-norm, GELU, tied head.
    "gpt2-small": TransformerConfig(
        vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12,
    ),
    "gpt2-medium": TransformerConfig(
        vocab_size=50257, max_seq_len=1024, d_model=1024, n_layers=24, n_heads=16,
    ),
    # Llama-3.2-1B's shape: RMSNorm, SwiGLU, RoPE (base 500000), 32 query heads on 8 KV heads.
    "llama-1b": TransformerConfig(
        vocab_size=128256, max_seq_len=8192, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        d_ff=8192, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", positions="rope", rope_base=500000.0,
        bias=False,
    ),
}
