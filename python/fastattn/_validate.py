"""Argument checks shared by the public ops.

Every message names the argument, what it got and what it needs. All checks run
before any kernel launch; none of them reads tensor data except the ones named
`*_values`, which are skipped while torch.compile traces (data is not known then).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
) -> Tensor:
    """`value` is a Tensor with an allowed rank and dtype."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            wanted = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must be {wanted}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {dtype_name(value.dtype)}")
    return value


def optional_tensor(name: str, value: object, **kwargs) -> Optional[Tensor]:
    return None if value is None else tensor(name, value, **kwargs)


def same_device(**named: Optional[Tensor]) -> torch.device:
    """All given tensors live on one device; returns it."""
    present = {name: t for name, t in named.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )
    return first.device


def on_device(device: torch.device, **named: Optional[Tensor]) -> None:
    """Each given tensor lives on `device` (the device of q)."""
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; all tensors must be on one device")


def same_dtype(**named: Optional[Tensor]) -> torch.dtype:
    """All given tensors share one dtype; returns it."""
    present = {name: t for name, t in named.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {dtype_name(t.dtype)} but {first_name} has "
                f"{dtype_name(first.dtype)}; they must match"
            )
    return first.dtype


def shape(name: str, value: Tensor, expected: Sequence[int], meaning: str) -> None:
    """value.shape == expected; `meaning` spells the dims, e.g. '(batch, heads)'."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}"
        )


def broadcastable(name: str, value: Tensor, target: Sequence[int], meaning: str) -> None:
    """value broadcasts to `target` (trailing-aligned; each dim 1 or equal)."""
    ok = value.dim() <= len(target) and all(
        got in (1, want) for got, want in zip(reversed(value.shape), reversed(target))
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} is not broadcastable to {meaning} = "
            f"{tuple(target)}"
        )


def choice(name: str, value: object, options: Sequence[object]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def number(
    name: str,
    value: object,
    *,
    minimum: Optional[float] = None,
    below: Optional[float] = None,
    positive: bool = False,
) -> float:
    """A finite real number, optionally in [minimum, below) or > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def window(name: str, value: object) -> tuple[int, int]:
    """A (left, right) pair of ints, each -1 (unbounded) or >= 0."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be a pair of ints (left, right), got {value!r}")
    left, right = value
    if left < -1 or right < -1:
        raise ValueError(f"{name} sides must be -1 (unbounded) or >= 0, got {tuple(value)}")
    return left, right


def tracing() -> bool:
    """True while torch.compile traces: tensor data cannot be read then."""
    return torch.compiler.is_compiling()


DEBUG_ENV = "FASTATTN_DEBUG"


def debug_checks() -> bool:
    """Whether FASTATTN_DEBUG=1 asks for the value checks that read GPU tensors on the
    host: each is a device-to-host sync, which stalls the launch queue and breaks CUDA
    graph capture, so the Triton paths skip them by default."""
    value = os.environ.get(DEBUG_ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{DEBUG_ENV} must be 0 or 1; got {value!r}")
    return value == "1"


def cu_seqlens(name: str, value: object, device: torch.device) -> Tensor:
    """A (batch + 1,) int32 cu_seqlens on `device`, contiguous (kernels read entry b at
    offset b)."""
    cu = tensor(name, value, ndim=1, dtypes=(torch.int32,))
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    on_device(device, **{name: cu})
    return cu.contiguous()


def cu_seqlens_values(name: str, cu_seqlens: Tensor, total: Optional[int] = None, total_name: str = "") -> list[int]:
    """cu_seqlens starts at 0, never decreases, and ends at `total` (unless None); returns
    the list."""
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {values[-1]}")
    return values


def block_table_values(table: Tensor, lengths: Sequence[int], page: int, num_blocks: int, paged_name: str,
                       unit: str = "block") -> None:
    """The block_table entries in use (sequence b's first ceil(lengths[b] / page) columns)
    index `unit`s 0..num_blocks - 1 of the paged `paged_name`; the entries past a
    sequence's length may hold anything. One read of the device (a flag)."""
    needed = torch.tensor([-(-n // page) for n in lengths], dtype=torch.long, device=table.device)  # (b,) in use
    columns = torch.arange(table.shape[1], device=table.device)
    bad = (columns[None, :] < needed[:, None]) & ((table < 0) | (table >= num_blocks))  # (b, max_blocks)
    if bool(bad.any()):
        b, column = bad.nonzero()[0].tolist()
        raise ValueError(f"block_table entries in use must index {unit}s 0..{num_blocks - 1} of {paged_name}, got "
                         f"block_table[{b}, {column}] = {int(table[b, column])} (sequence {b} has {lengths[b]} "
                         f"positions, {int(needed[b])} {unit}s of {page})")
