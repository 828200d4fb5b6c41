"""Enumerating the Triton kernel variants of fastattn's ops without a GPU (for
fastattn.kernels.aot).

Each case of a matrix (kernels/_aot_cases.py) is run through the public fastattn
function with the triton backend, on stand-in CUDA tensors (kernels/_aot_standins.py):
validation, backend dispatch, the op's Triton implementation and the launchers all run
as on a GPU. Two things are intercepted:

- the registered custom ops (fastattn::<op>_fwd / _bwd / decode_attention_append),
  called from the op modules, run their real implementation directly (the dispatcher
  would route meta tensors to their fake implementation), and are recorded; for a
  backward case, each recorded forward op with an autograd formula then runs its
  setup_context and backward as autograd would, with zero-filled gradients for every
  output (autograd's default, materialize_grads);
- every Triton launch (JITFunction.run): Triton's own binder specialises the
  arguments for the target GPU (integers == 1 and divisible by 16, pointer alignment,
  do_not_specialize honoured) and _pack_args builds the signature, constexprs, attrs
  and options that JITFunction would compile; nothing is compiled or launched. The
  grid is evaluated and checked against CUDA's limits. An Autotuner runs its pruning
  and records every config it would benchmark (what a real first call compiles).

A variant is one distinct (kernel, signature, constexprs, attrs, options): one compile.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import _aot_cases
from ._aot_standins import index_tensor, standin_cuda

GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid dimension limits x, y, z
_RUN_OPTIONS = ("num_warps", "num_stages")  # always part of a variant's name


@dataclass
class Variant:
    """One compile: what triton.compile gets, where it came from, and a readable name."""

    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # the backend options (CUDAOptions.__dict__)
    kernel: str
    dtype: str
    launch: str
    flags: str
    specialised: str
    cases: list = field(default_factory=list)
    autotuned: bool = False  # came from an Autotuner's config list

    @property
    def name(self) -> str:
        return " ".join(part for part in (self.kernel, self.dtype, self.launch, self.flags, self.specialised) if part)


@dataclass
class Enumeration:
    variants: dict = field(default_factory=dict)  # key -> Variant, in first-seen order
    launches: int = 0
    errors: list = field(default_factory=list)  # (case, message)


class Recorder:
    """Collects the variants launched while it is installed (see the module docstring)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.default_options = self.backend.parse_options({}).__dict__
        self.result = Enumeration()
        self.case: Optional[str] = None
        self.autotuning = False
        self._binders = {}

    @contextlib.contextmanager
    def installed(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder = self
        saved = JITFunction.run, Autotuner.run

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder.launch(fn, args, kwargs, grid, warmup)

        def autotuner_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            recorder.autotuning = True
            try:
                for config in configs:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                recorder.autotuning = False
                tuner.nargs = None

        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = saved

    def launch(self, fn, args, kwargs, grid, warmup):
        """What JITFunction.run does up to the compile (triton 3.6), for the target GPU."""
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = self._binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        self.result.launches += 1
        if not warmup:
            dims = tuple(grid(bound_args) if callable(grid) else grid)
            dims = dims + (1,) * (3 - len(dims))
            if any(not 0 <= int(n) <= limit for n, limit in zip(dims, GRID_LIMITS)):
                self.result.errors.append((self.case, f"{fn.__name__}: grid {dims} exceeds CUDA's limits "
                                                      f"{GRID_LIMITS}"))
        key = json.dumps([fn.__module__, fn.__name__, signature, _keyed(constexprs), _keyed(attrs),
                          _jsonable(options.__dict__)], sort_keys=True, default=str)
        variant = self.result.variants.get(key)
        if variant is None:
            variant = self.result.variants[key] = self._describe(fn, signature, constexprs, attrs, options.__dict__)
        variant.autotuned |= self.autotuning
        if self.case not in variant.cases:
            variant.cases.append(self.case)

    def _describe(self, fn, signature, constexprs, attrs, options) -> Variant:
        names = list(signature)
        pointers = [n for n in names if signature[n].startswith("*")]
        dtype = signature[pointers[0]][1:] if pointers else "-"
        flags, specialised, unaligned = [], [], []
        for i, (name, param) in enumerate(zip(names, fn.params)):
            kind = signature[name]
            if param.is_constexpr:
                value = constexprs[(i,)]
                if value is True:
                    flags.append(name)
                elif value not in (False, None, 0):
                    flags.append(f"{name}={value}")
            elif kind == "constexpr":
                if constexprs[(i,)] is not None:
                    specialised.append(f"{name}={constexprs[(i,)]}")
            elif kind.startswith("*") and kind[1:] != dtype:
                specialised.append(f"{name}:{kind[1:]}")
            pointer, integer = kind.startswith("*"), kind[:1] in "iu" and kind != "u1"
            exempt = param.do_not_specialize_on_alignment if pointer else param.do_not_specialize
            if (pointer or integer) and not exempt and not attrs.get((i,)):
                unaligned.append(name)
        if unaligned:
            specialised.append("!16:" + ",".join(unaligned))
        launch = [f"w{options['num_warps']}", f"s{options['num_stages']}"]
        launch += [f"{k}={v}" for k, v in sorted(options.items())
                   if k not in _RUN_OPTIONS and _jsonable(v) != _jsonable(self.default_options.get(k))]
        kernel = fn.__name__.lstrip("_")
        kernel = kernel[:-len("_kernel")] if kernel.endswith("_kernel") else kernel
        return Variant(fn, signature, constexprs, attrs, options, kernel, dtype, " ".join(launch), " ".join(flags),
                       " ".join(specialised))


def _keyed(paths: dict) -> list:
    return sorted([list(path), _jsonable(value)] for path, value in paths.items())


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


# ----------------------------------------------------------------------------- running the ops


class _Ctx:
    """What setup_context and backward of a custom op's autograd use of autograd's ctx."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        self.materialize_grads = value


def _custom_ops():
    """(module, attribute name, CustomOpDef) of every custom op the fastattn.ops modules
    hold as a module global."""
    import fastattn.ops
    from torch._library.custom_ops import CustomOpDef

    found = []
    for info in pkgutil.iter_modules(fastattn.ops.__path__):
        module = importlib.import_module(f"fastattn.ops.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, CustomOpDef):
                found.append((module, name, value))
    return found


@contextlib.contextmanager
def _direct_custom_ops(calls: list):
    """Module globals naming a custom op call its implementation directly, recording
    (op, inputs, output) into `calls`."""
    patched = []

    def direct(op):
        schema = op._opoverload._schema

        def call(*args, **kwargs):
            inputs = list(args)
            for argument in schema.arguments[len(args):]:
                inputs.append(kwargs[argument.name] if argument.name in kwargs else argument.default_value)
            output = op._init_fn(*inputs)
            calls.append((op, tuple(inputs), output))
            return output

        return call

    try:
        for module, name, op in _custom_ops():
            patched.append((module, name, op))
            setattr(module, name, direct(op))
        yield
    finally:
        for module, name, op in patched:
            setattr(module, name, op)


def _backward(op, inputs, output, returned) -> None:
    """op's registered setup_context + backward, as autograd runs them when the caller
    uses what the public call returned (`returned`): a zero gradient for each output,
    except None for an output the call did not return where the op's setup_context asked
    for no materialised gradients."""
    ctx = _Ctx(tuple(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs))
    if not any(ctx.needs_input_grad):
        return
    op._setup_context_fn(ctx=ctx, inputs=inputs, output=output)
    outputs = output if isinstance(output, tuple) else (output,)
    used = {id(t) for t in returned}
    op._backward_fn(ctx, *(torch.zeros_like(o) if ctx.materialize_grads or id(o) in used else None
                           for o in outputs))


def _standin(shape, dtype, requires_grad=False):
    return torch.empty(shape, dtype=dtype, device="cuda", requires_grad=requires_grad)


def enumerate_variants(cases, arch: int) -> Enumeration:
    """Every variant the cases compile for compute capability `arch` (80 or 90)."""
    previous = os.environ.get("FASTATTN_TRITON_ARCH")
    os.environ["FASTATTN_TRITON_ARCH"] = str(arch)
    recorder = Recorder(arch)
    calls: list = []
    try:
        with recorder.installed(), standin_cuda(arch), _direct_custom_ops(calls):
            for case in cases:
                calls.clear()
                recorder.case = str(case)
                torch.manual_seed(0)  # the dropout seed is drawn on the host: the same every run
                try:
                    fn, args, kwargs = _aot_cases.build_call(case, _standin, index_tensor)
                    result = fn(*args, **kwargs)
                    returned = result if isinstance(result, tuple) else (result,)
                    if case.backward:
                        for op, inputs, output in list(calls):
                            if op._backward_fn is not None:
                                _backward(op, inputs, output, returned)
                except Exception as error:  # noqa: BLE001 - reported per case, the run goes on
                    recorder.result.errors.append((str(case), f"{type(error).__name__}: {error}"))
    finally:
        if previous is None:
            os.environ.pop("FASTATTN_TRITON_ARCH", None)
        else:
            os.environ["FASTATTN_TRITON_ARCH"] = previous
    return recorder.result

