"""The reference Transformer: a GPT-style decoder (encoder with causal=False) built
from fastattn.nn modules, with named presets.

    from fastattn.models import GPT, TransformerConfig
    model = GPT(TransformerConfig.from_preset("gpt2-small"), backend="triton")
"""

from .config import PRESETS, TransformerConfig
from .gpt import GPT, IGNORE_INDEX, Block

__all__ = ["GPT", "Block", "IGNORE_INDEX", "PRESETS", "TransformerConfig"]
