"""fastattn: fused Triton and CUDA kernels for attention, layer norm / RMSNorm and the
feed-forward block, registered as torch ops (autograd, fake tensors, torch.compile).

Importing fastattn does no work: Triton kernels and the CUDA extension load on first use.
"""

from . import integrations, models, nn
from .backends import available_backends, get_backend, set_backend, use_backend
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .integrations import patch_sdpa
from .ops.attention import attention, scaled_dot_product_attention
from .ops.decode_attention import decode_attention
from .ops.ffn import ffn
from .ops.gated_ffn import gated_ffn
from .ops.layer_norm import layer_norm
from .ops.rms_norm import rms_norm
from .ops.varlen_attention import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "available_backends",
    "decode_attention",
    "ffn",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "gated_ffn",
    "get_backend",
    "integrations",
    "layer_norm",
    "models",
    "nn",
    "patch_sdpa",
    "rms_norm",
    "scaled_dot_product_attention",
    "set_backend",
    "use_backend",
    "varlen_attention",
]
