"""Stand-in CUDA tensors for the ahead-of-time compile check (fastattn.kernels.aot).

The check runs the real ops (validation, backend dispatch, launchers) on tensors that
look like CUDA tensors to them but hold no data, on a machine without a GPU and with a
CPU-only torch. `standin_cuda(arch)` is a context in which:

- every tensor placed on "cuda" is a meta tensor (shapes, strides, storage offsets and
  dtypes, no data); `t.device`, `t.is_cuda` and `t.get_device()` say cuda:0;
- `torch.cuda` answers device queries (capability, SM count, the device context) as the
  target GPU would (STANDIN_GPUS);
- small integer tensors made from known values (`index_tensor`: cu_seqlens,
  cache_seqlens, block tables) carry those values along, so that host reads of them
  (`tolist`, `item`, `int`) give the values a real call would see; a host read of any
  other stand-in raises HostReadError.

Meta tensors report data_ptr() = storage_offset * element_size (as from an allocation
at address 0), so Triton's 16-byte alignment specialisation sees what a real CUDA
tensor would (the caching allocator aligns every allocation to 512 bytes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

_VALUE = "_fastattn_aot_value"  # attribute of a meta tensor holding its real CPU values
_CUDA = torch.device("cuda", 0)
_META = torch.device("meta")
_SMALL = 1 << 16  # most elements whose values are carried along


@dataclass(frozen=True)
class StandinGpu:
    """What torch.cuda.get_device_properties reports for the target GPU (the fields a
    launcher may read)."""

    name: str
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int
    L2_cache_size: int
    shared_memory_per_block: int
    shared_memory_per_block_optin: int  # the per-block limit a kernel may opt in to
    shared_memory_per_multiprocessor: int
    regs_per_multiprocessor: int = 65536
    max_threads_per_multi_processor: int = 2048
    warp_size: int = 32


STANDIN_GPUS = {
    80: StandinGpu("stand-in A100 (sm_80)", 8, 0, 108, 80 * 2**30, 40 * 2**20, 49152, 166912, 167936),
    90: StandinGpu("stand-in H200 (sm_90)", 9, 0, 132, 141 * 10**9, 60 * 2**20, 49152, 232448, 233472),
}


class HostReadError(RuntimeError):
    """A launcher read device data on the host (a sync on a real GPU) from a stand-in
    tensor whose values are unknown."""


def index_tensor(values, dtype=torch.int32) -> torch.Tensor:
    """A stand-in CUDA tensor holding `values` (nested lists), readable on the host."""
    real = torch.tensor(values, dtype=dtype)
    return _mirror(real)


def _mirror(real: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=_META)
    setattr(meta, _VALUE, real)
    return meta


def _value(t: torch.Tensor) -> Optional[torch.Tensor]:
    return getattr(t, _VALUE, None) if t.is_meta else t


def _is_cuda_device(x) -> bool:
    if isinstance(x, torch.device):
        return x.type == "cuda"
    return isinstance(x, str) and (x == "cuda" or x.startswith("cuda:"))


# creation functions whose results hold defined values worth carrying along
_VALUE_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.tensor, torch.as_tensor}
_NO_VALUES = {torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty,
              torch.Tensor.new_empty_strided, torch.rand, torch.randn, torch.randint, torch.rand_like,
              torch.randn_like, torch.randint_like}
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
               torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}


class _CudaOnMeta(TorchFunctionMode):
    """Runs every torch function with "cuda" replaced by "meta", reports meta as cuda,
    and carries the values of small known tensors along (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:  # a device object names cuda as on a GPU machine
            return func(*args, **kwargs)
        if func in _HOST_READS:
            return self._host_read(func, args, kwargs)
        if getattr(func, "__self__", None) is torch._C.TensorBase.is_cuda and args[0].is_meta:
            return True
        if func is torch.Tensor.get_device and args[0].is_meta:
            return 0
        if func is torch.Tensor.data_ptr and args[0].is_meta:  # never a carried value's CPU address
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        on_cuda = any(_is_cuda_device(x) for x in leaves)
        if (func not in _NO_VALUES and (on_cuda or any(t.is_meta for t in tensors))
                and all(_value(t) is not None for t in tensors)
                and (tensors or func in _VALUE_FACTORIES)):
            result = self._on_values(func, args, kwargs)
            if result is not None:
                return result
        to_meta = lambda x: ("meta" if isinstance(x, str) else _META) if _is_cuda_device(x) else x  # noqa: E731
        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(lambda x: _CUDA if isinstance(x, torch.device) and x.type == "meta" else x, out)

    @staticmethod
    def _on_values(func, args, kwargs):
        """func on the real values (cuda -> cpu), mirrored into meta tensors that keep
        them; None when a result is too large to carry."""
        by_id = {}

        def to_value(x):
            if isinstance(x, torch.Tensor) and x.is_meta:
                real = _value(x)
                by_id[id(real)] = x
                return real
            return torch.device("cpu") if _is_cuda_device(x) else x

        out = func(*tree_map(to_value, args), **tree_map(to_value, kwargs))
        results = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if any(x.numel() > _SMALL for x in results if id(x) not in by_id):
            return None

        def to_standin(x):
            if isinstance(x, torch.Tensor):
                return by_id[id(x)] if id(x) in by_id else _mirror(x)
            return _CUDA if isinstance(x, torch.device) and x.type == "cpu" else x

        return tree_map(to_standin, out)

    @staticmethod
    def _host_read(func, args, kwargs):
        t = args[0]
        if not t.is_meta:
            return func(*args, **kwargs)
        real = _value(t)
        if real is None:
            raise HostReadError(
                f"{func.__name__}() of a stand-in CUDA tensor {tuple(t.shape)} {t.dtype} whose values are "
                f"unknown: the launcher reads device data on the host (a device sync on a GPU)")
        return func(real, *args[1:], **kwargs)


class _NoDevice:
    """torch.cuda.device(...) stand-in: selecting the one stand-in GPU does nothing."""

    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@contextlib.contextmanager
def standin_cuda(arch: int) -> Iterator[StandinGpu]:
    """The context described in the module docstring, for compute capability `arch`."""
    gpu = STANDIN_GPUS[arch]
    patches = {
        "get_device_capability": lambda device=None: (gpu.major, gpu.minor),
        "get_device_properties": lambda device=None: gpu,
        "get_device_name": lambda device=None: gpu.name,
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "device": _NoDevice,
    }
    saved = {name: getattr(torch.cuda, name) for name in patches}
    try:
        for name, value in patches.items():
            setattr(torch.cuda, name, value)
        with _CudaOnMeta():
            yield gpu
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
