"""The benchmark of each op: its sweeps, inputs, fp32 reference and providers."""

from __future__ import annotations

from ..spec import OpSpec

# The --op names; `model` runs two specs, model_train and model_decode.
OPS = ("attention", "decode_attention", "layer_norm", "rms_norm", "ffn", "gated_ffn", "model")


def get_spec(op: str) -> OpSpec:
    """The OpSpec of `op` (imported on demand)."""
    if op == "attention":
        from .attention import SPEC
    elif op == "decode_attention":
        from .decode_attention import SPEC
    elif op == "layer_norm":
        from .norms import LAYER_NORM as SPEC
    elif op == "rms_norm":
        from .norms import RMS_NORM as SPEC
    elif op == "ffn":
        from .ffn import FFN as SPEC
    elif op == "gated_ffn":
        from .ffn import GATED_FFN as SPEC
    elif op == "model_train":
        from .model import TRAIN as SPEC
    elif op == "model_decode":
        from .model import DECODE as SPEC
    else:
        raise ValueError(f"op must be one of {', '.join(OPS[:-1])}, model_train, model_decode; got {op!r}")
    return SPEC
