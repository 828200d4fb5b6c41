"""The pieces every op's benchmark is made of: the op spec, providers, and skips.

An `OpSpec` says, for one op: its sweeps of shapes, how to make inputs for a shape
(random data, never zeros), its fp32 reference (outputs and gradients), and its
providers. A provider is a function `fn(inputs) -> output or tuple of outputs`
(the first output is the one backward starts from) plus an optional `prepare`
that changes the inputs' memory layout, outside the timed region, keeping their
logical shapes. A provider that cannot serve a shape raises `Skip(reason)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from .reference import Reference, RowChunkedReference

# quick-gpu: the shapes of device_run.sh's quick benchmark (fastattn-bench --preset quick-gpu).
SWEEPS = ("full", "quick", "quick-gpu", "cpu", "cpu-quick")

# Column order of providers in tables and plots; names not listed go last.
PROVIDER_ORDER = (
    "naive", "torch", "torch-flash", "torch-efficient", "torch-cudnn", "torch-math",
    "naive-compile", "torch-compile", "gemm-only", "liger", "flash-attn", "triton", "cuda",
)

# The SDPA backends, each on its own (torch.nn.attention.sdpa_kernel).
SDPA_PROVIDERS = {
    "torch-flash": "FLASH_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
    "torch-math": "MATH",
}


class Skip(Exception):
    """A provider cannot run this case; the message says why."""


@dataclass
class Provider:
    name: str
    fn: Callable[[dict], object]
    prepare: Optional[Callable[[dict], dict]] = None
    checked: bool = True  # False: a bound (e.g. the bare GEMMs), not the op: no accuracy check
    note: str = ""
    check_fn: Optional[Callable[[dict], object]] = None  # what is compared, when not fn itself


ProviderFactory = Callable[[Mapping, torch.dtype, torch.device], Provider]


@dataclass
class OpSpec:
    """One op's benchmark. Subclasses fill in the methods."""

    name: str
    modes: tuple[str, ...]
    x_key: str  # the shape key swept along a plot's x axis
    grad_names: tuple[str, ...] = ()
    providers: dict[str, ProviderFactory] = field(default_factory=dict)

    # A self-contained provider's fn is timed as it is (it runs its own backward and
    # optimizer step, or a whole generation); provider.check_fn gives what is checked.
    self_contained = False
    rtol = None  # per-dtype tolerance override, {dtype: rtol} (see harness.RTOL)
    timer = None  # timing.TimerSettings override

    def sweep(self, kind: str) -> list[dict]:
        raise NotImplementedError

    def unavailable(self) -> Optional[str]:
        """Why this op cannot be benchmarked at all here (None = it can)."""
        return None

    def make_inputs(self, shape: Mapping, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> dict:
        raise NotImplementedError

    def output_shape(self, shape: Mapping) -> tuple[int, ...]:
        """The shape of the first output (the one backward starts from)."""
        raise NotImplementedError

    def reference(self, inputs: dict, shape: Mapping, dout: Optional[Tensor]) -> Reference:
        """The fp32 reference of the outputs, and (when dout is given) of the gradients
        of the first output for `grad_names`, from fp32 copies of `inputs`."""
        raise NotImplementedError

    def input_bytes(self, inputs: dict) -> int:
        return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, Tensor))

    def label(self, shape: Mapping) -> str:
        return ", ".join(f"{k}={v}" for k, v in shape.items())

    def group_keys(self) -> tuple[str, ...]:
        """The shape keys (besides x_key) that tell curves of a plot apart."""
        return ()


def randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator,
          scale: float = 1.0, offset: float = 0.0) -> Tensor:
    """Normal random data made in fp32 on the device (never zeros)."""
    t = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    if offset:
        t.add_(offset)
    return t.to(dtype)


def rows_chunked_reference(fn: Callable, inputs: Mapping, row_names: Sequence[str], rows: int,
                           chunk: int, dout: Optional[Tensor], grad_names: Sequence[str]
                           ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """fn(**inputs) in fp32 computed `chunk` rows at a time: (outputs, gradients of the
    first output), materialized (see reference.RowChunkedReference)."""
    chunked = RowChunkedReference(fn, inputs, row_names, rows, chunk, dout, grad_names, n_outputs=0)
    return chunked.materialize()


# ----------------------------------------------------------------------------- providers


def sdpa_backend_context(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory forcing one SDPA backend (CUDA only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_PROVIDERS[name], None)
    if backend is None:
        raise Skip(f"this torch ({torch.__version__}) has no SDPBackend.{SDPA_PROVIDERS[name]}")
    return lambda: sdpa_kernel([backend])


def require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} is benchmarked on CUDA only")


def fastattn_backend_check(op_module, name: str, device: torch.device) -> None:
    """Skip where fastattn's `name` backend cannot run here or has no kernel for the op;
    per-call limits surface as a ValueError from the op itself (see harness)."""
    why = backends.backend_unavailable_reason(name, device)
    if why is not None:
        raise Skip(why)
    table = op_module.BACKENDS
    if name not in table.forward:
        raise Skip(table.reason(name, None))
    if name == "triton" and device.type != "cuda":
        raise Skip("Triton on CPU runs only in the interpreter, whose timings mean nothing: "
                   "triton numbers need a CUDA GPU")


_compile_settings_applied = False


def compile_settings() -> None:
    """Let torch.compile recompile for every benchmark shape instead of silently
    falling back to eager when its recompile limit is hit (and fail loudly if it is)."""
    global _compile_settings_applied
    if _compile_settings_applied:
        return
    import torch._dynamo.config as config

    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096),
                        ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True)):
        if hasattr(config, name):
            setattr(config, name, value)
    _compile_settings_applied = True


def compiled(base: ProviderFactory, name: str) -> ProviderFactory:
    """torch.compile (default mode) of another provider's function."""

    def factory(shape, dtype, device):
        inner = base(shape, dtype, device)
        compile_settings()
        return Provider(name, torch.compile(inner.fn), prepare=inner.prepare, note="torch.compile")

    return factory


def optional_import(module: str):
    """The module, or Skip saying it is not installed."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not importable ({exc})") from None
