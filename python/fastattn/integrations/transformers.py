"""Hugging Face transformers integration: attn_implementation="fastattn".

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()                      # once; register(backend="triton") pins a backend
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    fa_hf.patch_modules(model)            # optional: norms and MLPs on fastattn too

register() adds `attention_forward` to transformers' AttentionInterface and, under
the same name, its SDPA-style mask builder to AttentionMaskInterface: the model then
hands us a boolean (batch, 1, q_len, kv_len) mask (True = attend) where padding or a
cache offset needs one, and None where causality alone (or nothing) masks, exactly as
it does for "sdpa". (Versions before transformers.masking_utils pass their additive
float "eager" mask instead, which works as well.) Keys and values arrive with their own kv_heads (GQA runs natively,
no repeat). This module imports transformers only inside its functions.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
from .. import reference
from ..ops.attention import attention

DEFAULT_NAME = "fastattn"


def make_attention_forward(backend: Optional[str] = None) -> Callable:
    """An AttentionInterface function running fastattn.attention on `backend`."""
    fnn.check_backend(backend)

    def attention_forward(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        is_causal: Optional[bool] = None,
        position_bias: Optional[Tensor] = None,
        softcap: Optional[float] = None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        """query (B, H, Tq, D), key/value (B, Hk, Tk, D); attention_mask None, bool
        (True = attend) or additive float, broadcastable to (B, H, Tq, Tk).
        Returns (out (B, Tq, H, D), None): attention weights are never materialized."""
        cache = kwargs.get("cache")
        if cache is not None and type(cache).__name__ == "PagedAttentionCache":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal,
                                          position_bias=position_bias, **kwargs)
        q_len = query.shape[2]
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # As in transformers' SDPA path: without a mask, causality is the only masking,
        # and a single query needs none.
        causal = bool(is_causal) and attention_mask is None and q_len > 1
        if causal and key.shape[2] > q_len:
            # Prefill into an empty static cache: the slots past q_len are unwritten.
            key, value = key[:, :, :q_len], value[:, :, :q_len]  # (B, Hk, Tq, D)
            if position_bias is not None:
                position_bias = position_bias[..., :q_len]
        bias = attention_mask
        if position_bias is not None:
            if bias is None:
                bias = position_bias
            elif bias.dtype == torch.bool:
                bias = position_bias.masked_fill(~bias, float("-inf"))
            else:
                bias = position_bias + bias
            if causal:
                visible = reference.attention_visibility(q_len, key.shape[2], -1, 0, True, query.device)
                bias = bias.masked_fill(~visible, float("-inf"))
                causal = False
        out = attention(
            query, key, value, causal=causal, scale=scaling, attn_bias=bias, dropout_p=float(dropout),
            softcap=float(softcap) if softcap else 0.0, backend=backend,
        )  # (B, H, Tq, Dv)
        return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, Dv)

    return attention_forward


MIN_TRANSFORMERS = (4, 48)  # the first release with AttentionInterface


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string like "4.47.1" or "5.0.0.dev0"; () if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else ()


def _attention_interface():
    """transformers.AttentionInterface, or an ImportError that says why not: transformers
    missing, too old, or failing to import (the error it raised, not a version guess)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"fastattn.integrations.transformers.register() needs transformers, which cannot be imported: {error}"
        ) from error
    version = getattr(transformers, "__version__", "unknown")
    try:
        from transformers import AttentionInterface
    except ImportError as error:
        release = _release(version)
        if release and release < MIN_TRANSFORMERS:
            raise ImportError(
                f"fastattn.integrations.transformers.register() needs transformers with the AttentionInterface "
                f"API ({'.'.join(map(str, MIN_TRANSFORMERS))} or newer); this is transformers {version}"
            ) from error
        raise ImportError(
            f"importing AttentionInterface from transformers {version} failed: {type(error).__name__}: {error}"
        ) from error
    return AttentionInterface


def register(name: str = DEFAULT_NAME, *, backend: Optional[str] = None) -> None:
    """Make attn_implementation=`name` run fastattn.attention (on `backend`; None = the
    current default at call time). Needs the transformers package."""
    AttentionInterface = _attention_interface()
    AttentionInterface.register(name, make_attention_forward(backend))
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        # Before masking_utils, models hand a custom implementation the additive float
        # mask they build for "eager", which attention_forward takes as it is.
        return
    AttentionMaskInterface.register(name, sdpa_mask)


# ----------------------------------------------------------------------------- module swap


def _probe(module: nn.Module, width: int) -> Optional[Tensor]:
    """A small random input on the module's device and dtype (None on meta tensors)."""
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    generator = torch.Generator(device=param.device).manual_seed(0)
    return torch.randn(2, 3, width, generator=generator, device=param.device).to(param.dtype)


def _same_function(original: nn.Module, replacement: nn.Module, width: int) -> bool:
    x = _probe(original, width)
    if x is None:
        return False
    modes = original.training, replacement.training
    original.eval(), replacement.eval()
    try:
        with torch.no_grad():
            expected, got = original(x), replacement(x)
    finally:
        original.train(modes[0]), replacement.train(modes[1])
    if not isinstance(expected, Tensor) or expected.shape != got.shape:
        return False
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    return torch.allclose(got.float(), expected.float(), atol=tol, rtol=tol)


def _activation_name(act: Callable, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Which fastattn activation `act` is, by evaluating it."""
    x = torch.linspace(-6, 6, 97, device=device).to(dtype)
    with torch.no_grad():
        y = act(x).float()
        for name in reference.ACTIVATIONS:
            if torch.allclose(reference.activation(x.float(), name), y, atol=1e-4, rtol=1e-3):
                return name
    return None


def _replacement(module: nn.Module, backend: Optional[str]) -> Optional[tuple[nn.Module, int]]:
    """A fastattn module computing what `module` computes, with its weights, and the
    input width to check it on; None if `module` is not one we know."""
    param = next(module.parameters(), None)
    if param is None:
        return None
    factory = {"device": param.device, "dtype": param.dtype}
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.weight is not None:
        new = fnn.LayerNorm(module.normalized_shape, eps=module.eps, bias=module.bias is not None,
                            backend=backend, **factory)
        new.load_state_dict(module.state_dict())
        return new, module.normalized_shape[0]
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if type(module).__name__.endswith("RMSNorm") and isinstance(weight, Tensor) and weight.dim() == 1 \
            and isinstance(eps, float):
        new = fnn.RMSNorm(weight.shape[0], eps=eps, backend=backend, **factory)
        new.weight.data.copy_(weight.data)
        return new, weight.shape[0]
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
            and callable(getattr(module, "act_fn", None)) \
            and all(getattr(module, n).bias is None for n in ("gate_proj", "up_proj", "down_proj")):
        act = _activation_name(module.act_fn, param.dtype, param.device)
        if act is None:
            return None
        d_model, d_hidden = module.gate_proj.in_features, module.gate_proj.out_features
        new = fnn.GatedFeedForward(d_model, d_hidden, module.down_proj.out_features, activation=act,
                                   backend=backend, **factory)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(new, n).weight.data.copy_(getattr(module, n).weight.data)
        return new, d_model
    c_fc, c_proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    gpt2_mlp = type(c_fc).__name__ == "Conv1D" and type(c_proj).__name__ == "Conv1D"
    if gpt2_mlp and callable(getattr(module, "act", None)):
        # GPT-2's Conv1D keeps its weight as (in_features, out_features): transposed nn.Linear.
        act = _activation_name(module.act, param.dtype, param.device)
        if act is None:
            return None
        d_model, d_hidden = c_fc.weight.shape
        ffn = fnn.FeedForward(d_model, d_hidden, c_proj.weight.shape[1], activation=act, backend=backend,
                              **factory)
        ffn.fc1.weight.data.copy_(c_fc.weight.data.t())
        ffn.fc1.bias.data.copy_(c_fc.bias.data)
        ffn.fc2.weight.data.copy_(c_proj.weight.data.t())
        ffn.fc2.bias.data.copy_(c_proj.bias.data)
        dropout = getattr(module, "dropout", None)
        new = nn.Sequential(ffn, dropout) if isinstance(dropout, nn.Dropout) else ffn
        return new, d_model
    return None


def patch_modules(model: nn.Module, *, backend: Optional[str] = None) -> dict[str, str]:
    """Swap, in place, the norms (nn.LayerNorm, Llama-style RMSNorm) and the MLPs
    (Llama-style gate/up/down, GPT-2's Conv1D pair) of a transformers model for
    fastattn.nn modules holding the same weights. A module is swapped only if ours
    gives the same output on a random input; others are left alone. Call it after
    loading weights (the swapped modules' state_dict keys are fastattn's). Returns
    {qualified name: replacement class name} of what was swapped."""
    fnn.check_backend(backend)
    swapped: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, (fnn.LayerNorm, fnn.RMSNorm, fnn.FeedForward, fnn.GatedFeedForward)):
            continue
        found = _replacement(module, backend)
        if found is None:
            continue
        new, width = found
        new.train(module.training)
        if not _same_function(module, new, width):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped[name] = type(new).__name__
    return swapped
