"""Helpers for tests that look at how Triton kernels are launched rather than at what
they compute: a launch recorder, the compile-variant key of a launch, and views whose
strides pass 2**31 elements without the memory behind them."""

from __future__ import annotations

import inspect

import torch


class LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](**kwargs)` records (grid, kwargs),
    with a callable grid resolved against kwargs, and runs the kernel if `run`."""

    def __init__(self, kernel, run: bool = True):
        self.kernel, self.run, self.launches = kernel, run, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert not args, "fastattn's launchers pass kernel arguments by name"
            self.launches.append((grid(kwargs) if callable(grid) else tuple(grid), kwargs))
            if self.run:
                return self.kernel[grid](**kwargs)

        return launch


def record_launches(monkeypatch, module, name: str, run: bool = True) -> LaunchRecorder:
    """Replace the kernel `module.name` by a LaunchRecorder for the rest of the test."""
    recorder = LaunchRecorder(getattr(module, name), run)
    monkeypatch.setattr(module, name, recorder)
    return recorder


def _jit_option(kernel, name: str) -> set:
    """A triton.jit option (do_not_specialize ...) of a compiled or interpreted kernel."""
    value = getattr(kernel, name, None)
    if value is None:
        value = getattr(kernel, "kwargs", {}).get(name)
    return set(value or ())


def variant_key(kernel, kwargs: dict) -> tuple:
    """What Triton keys a compiled variant on, for one launch of `kernel` with `kwargs`:
    constexprs and launch options by value, tensors by dtype, floats not at all, and
    runtime integers by Triton's specialisation (== 1, divisible by 16, 64-bit), none
    for do_not_specialize, only == 1 for do_not_specialize_on_alignment."""
    params = inspect.signature(kernel.fn).parameters
    no_specialize = _jit_option(kernel, "do_not_specialize")
    alignment_free = _jit_option(kernel, "do_not_specialize_on_alignment")
    key = []
    for name, value in sorted(kwargs.items()):
        constexpr = name not in params or "constexpr" in str(params[name].annotation)
        if isinstance(value, torch.Tensor):
            key.append((name, value.dtype))
        elif constexpr or value is None:
            key.append((name, value))
        elif isinstance(value, float):
            key.append((name, "float"))
        elif name in no_specialize:
            key.append((name, "int"))
        elif name in alignment_free:
            key.append((name, value == 1))
        else:
            key.append((name, value == 1, value % 16 == 0, -(2**31) <= value < 2**31))
    return tuple(key)


def sparse_storage(tmp_path, elements: int, device: torch.device) -> torch.Tensor:
    """A 1-D float32 tensor of `elements`, for as_strided views with huge strides: on the
    CPU backed by a sparse file (untouched pages take no memory); on a GPU plain memory."""
    if device.type != "cpu":
        return torch.empty(elements, dtype=torch.float32, device=device)
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(elements * 4)
    return torch.from_file(str(path), shared=True, size=elements, dtype=torch.float32)
