"""Drop-in integrations: patch_sdpa (torch.nn.functional.scaled_dot_product_attention
-> fastattn) and transformers (attn_implementation="fastattn"). Neither imports
transformers until it is used."""

from . import transformers
from .sdpa import make_sdpa, patch_sdpa

__all__ = ["make_sdpa", "patch_sdpa", "transformers"]
