"""The benchmark loop: for each shape, mode and provider, check then time.

For one shape of one op:
1. make the inputs (random, never zeros), with extra copies to rotate through when
   they fit in L2; compute the fp32 reference once (outputs, and the gradients of
   the first output for a random upstream gradient dout);
2. for each mode (fwd: forward under no_grad; bwd: the backward alone, through
   torch.autograd.grad with retain_graph, from one recorded forward per input copy;
   full: forward + backward) and each provider: build it (a `Skip` says why it
   cannot serve this case), run it once and compare every output / gradient with the
   reference; a provider outside tolerance is reported as failed and not timed;
3. time it (timing.time_fn) and write a row with TFLOP/s or GB/s and the fraction of
   the measured ceiling.

Tolerance per tensor (relative to the reference's largest magnitude, so that it
holds at every size): max|out - ref| <= RTOL[dtype]·max|ref|, or, where the naive
provider ran, <= FACTOR × naive's own error against the same reference (GRAD_FACTOR
for gradients): the tests' rule, loosened so that naive itself never decides.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import timing
from .reference import Reference
from .spec import OpSpec, Provider, ProviderFactory, Skip

RTOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
FACTOR, GRAD_FACTOR = 2.0, 3.0
ROTATE_MAX = 8


@dataclass
class RunConfig:
    device: torch.device
    dtype: torch.dtype
    sweep: str
    providers: Optional[Sequence[str]] = None  # None: every provider of the op
    modes: Optional[Sequence[str]] = None
    max_cases: Optional[int] = None
    timer: Optional[timing.TimerSettings] = None
    progress: bool = True
    seed: int = 0
    extra_providers: dict = field(default_factory=dict)  # op -> {name: factory}, e.g. for tests


@dataclass
class Outcome:
    status: str  # ok | failed | skipped | error
    reason: Optional[str] = None
    timing: Optional[timing.Timing] = None
    max_abs_err: Optional[float] = None
    rel_err: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    note: str = ""
    errors: dict = field(default_factory=dict)  # reference key -> max abs error


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception raised while building or running a provider."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, Skip):
        return "skipped", text
    if isinstance(exc, torch.OutOfMemoryError):
        return "skipped", "out of memory"
    if isinstance(exc, NotImplementedError):
        return "skipped", f"not implemented: {text}"
    if isinstance(exc, ValueError) and "cannot serve" in text:
        return "skipped", text
    if isinstance(exc, RuntimeError) and ("No available kernel" in text or "No viable backend" in text):
        return "skipped", text
    return "error", f"{type(exc).__name__}: {text}"


def rotation_count(input_bytes: int, device: torch.device) -> int:
    """How many input copies to rotate through: enough to overflow L2 twice, when
    one copy fits in it (1 off CUDA or when the inputs are larger than L2)."""
    l2 = timing.l2_cache_bytes(device)
    if not l2 or input_bytes >= l2:
        return 1
    return max(1, min(ROTATE_MAX, math.ceil(2 * l2 / max(input_bytes, 1))))


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@dataclass
class Case:
    """One shape, set up: inputs (copies to rotate through), dout, fp32 reference, and
    the naive provider's errors per mode once it has run (for the tolerance)."""

    shape: dict
    input_sets: list
    reference: Reference
    dout: Optional[Tensor]
    naive_errors: dict = field(default_factory=dict)


class DeviceLost(RuntimeError):
    """A CUDA error that leaves the context unusable (illegal address, device assert):
    nothing more can be measured in this process."""


STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "illegal instruction", "misaligned address", "an illegal", "CUDA error: launch failure")


def _sticky_cuda_error(reason: Optional[str]) -> bool:
    return bool(reason) and any(s in reason for s in STICKY_CUDA_ERRORS)


BUDGET_REASON = "the run's time budget was used up (--time-budget)"
CPU_COMPILE_REASON = ("torch.compile on CPU takes tens of seconds per shape; CPU sweeps skip it unless "
                      "it is named in --providers")


class OpRunner:
    """Runs one op's sweep with a RunConfig; calls `emit(row_fields)` per measurement."""

    def __init__(self, spec: OpSpec, config: RunConfig, emit: Callable[[dict], None],
                 deadline: Optional[float] = None):
        self.spec, self.config, self.emit = spec, config, emit
        self.deadline = deadline
        self.device, self.dtype = config.device, config.dtype

    # ------------------------------------------------------------------ plan

    def shapes(self) -> list[dict]:
        shapes = self.spec.sweep(self.config.sweep)
        return shapes[: self.config.max_cases] if self.config.max_cases else shapes

    def modes(self) -> list[str]:
        wanted = self.config.modes
        return [m for m in self.spec.modes if wanted is None or m in wanted]

    def providers(self) -> dict[str, ProviderFactory]:
        table = dict(self.spec.providers)
        table.update(self.config.extra_providers.get(self.spec.name, {}))
        wanted = self.config.providers
        if wanted is not None:
            table = {name: f for name, f in table.items() if name in wanted}
        return table

    def planned(self) -> int:
        return len(self.shapes()) * len(self.modes()) * len(self.providers())

    # ------------------------------------------------------------------ run

    def run(self, progress=None) -> None:
        """Every shape × mode × provider of the sweep, one emitted row each."""
        for shape in self.shapes():
            self._run_shape(shape, progress)
            if self.device.type == "cuda":
                gc.collect()  # slow (0.1 s+), so once per shape, where memory matters
                torch.cuda.empty_cache()

    def _over_budget(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _run_shape(self, shape: dict, progress) -> None:
        modes, providers = self.modes(), self.providers()
        if self._over_budget():
            self._emit_all(shape, Outcome("skipped", BUDGET_REASON), progress)
            return
        try:
            case = self.setup_case(shape)
        except Exception as exc:  # noqa: BLE001 - reported on every row of the shape
            status, reason = classify(exc)
            del exc
            self._emit_all(shape, Outcome(status, f"could not set up the case: {reason}"), progress)
            return
        for mode in modes:
            for name, factory in providers.items():
                if progress is not None:
                    progress.set_postfix_str(f"{mode} {name} {self.spec.label(shape)}", refresh=False)
                if self._over_budget():
                    outcome = Outcome("skipped", BUDGET_REASON)
                elif self._compile_on_cpu_unasked(name):
                    outcome = Outcome("skipped", CPU_COMPILE_REASON)
                else:
                    outcome = self.measure(case, mode, name, factory)
                self._emit(shape, mode, name, outcome)
                _tick(progress)
                if outcome.status == "error" and self.device.type == "cuda" and _sticky_cuda_error(outcome.reason):
                    raise DeviceLost(f"{self.spec.name} {mode} {name} {self.spec.label(shape)}: {outcome.reason}")
        del case

    def _compile_on_cpu_unasked(self, name: str) -> bool:
        return self.device.type == "cpu" and name.endswith("-compile") and name not in (self.config.providers or ())

    def _emit_all(self, shape, outcome: Outcome, progress) -> None:
        for mode in self.modes():
            for name in self.providers():
                self._emit(shape, mode, name, outcome)
                _tick(progress)

    def _emit(self, shape, mode, provider, outcome: Outcome) -> None:
        self.emit({"op": self.spec.name, "mode": mode, "provider": provider, "shape": dict(shape),
                   "outcome": outcome})

    # ------------------------------------------------------------------ one case

    def setup_case(self, shape: dict) -> "Case":
        """Inputs (and the copies to rotate through), dout, and the fp32 reference."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        inputs = self.spec.make_inputs(shape, self.dtype, self.device, generator)
        copies = rotation_count(self.spec.input_bytes(inputs), self.device)
        input_sets = [inputs] + [self.spec.make_inputs(shape, self.dtype, self.device, generator)
                                 for _ in range(copies - 1)]
        dout = None
        if not self.spec.self_contained and any(m != "fwd" for m in self.modes()):
            dout = torch.randn(self.spec.output_shape(shape), generator=generator, device=self.device,
                               dtype=torch.float32).to(self.dtype)
        reference = self.spec.reference(inputs, shape, dout)
        return Case(shape, input_sets, reference, dout)

    def measure(self, case: "Case", mode: str, name: str, factory: ProviderFactory) -> Outcome:
        """Check the provider on the case, then time it if it is right."""
        outcome, state = self.check(case, mode, name, factory)
        if state is None:
            return outcome
        try:
            settings = self.spec.timer or self.config.timer
            base = self._memory_mark()
            outcome.timing = timing.time_fn(state.run, state.args, self.device, settings)
            outcome.peak_mem_mb = self._peak_since(base)
            return outcome
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            failure = Outcome(*classify(exc))
        finally:
            del state
        self._release_memory()
        return failure

    def check(self, case: "Case", mode: str, name: str, factory: ProviderFactory):
        """(outcome, runnable): build the provider and compare its result with the
        reference; runnable is None unless the outcome is ok (ready to be timed)."""
        state = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    provider = factory(case.shape, self.dtype, self.device)
                    prepared = [provider.prepare(s) if provider.prepare else s for s in case.input_sets]
                    state = _Runnable(self.spec, mode, provider, prepared, case.dout)
                    result = state.check_result()
                    timing.synchronize(self.device)
                except RuntimeError as exc:
                    unavailable = "No available kernel" in str(exc) or "No viable backend" in str(exc)
                    if unavailable and _warning_reasons(caught):
                        raise Skip(f"no available kernel: {_warning_reasons(caught)}") from None
                    raise
            outcome = self._check(provider, mode, result, case.reference, case.naive_errors.get(mode))
            del result
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            failure, plain_skip = Outcome(*classify(exc)), isinstance(exc, Skip)
        else:
            if name == "naive" and outcome.status == "ok":
                case.naive_errors[mode] = outcome.errors
            return outcome, (state if outcome.status == "ok" else None)
        state = None
        if not plain_skip:
            self._release_memory()  # after the except block, which held the traceback's frames
        return failure, None

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _check(self, provider: Provider, mode, result, reference: Reference, naive_errors) -> Outcome:
        if not provider.checked:
            return Outcome("ok", note=provider.note or "not checked: not the op itself")
        outs, grads = result
        values = {f"out{i}": t for i, t in enumerate(outs)}
        values.update((f"grad_{n}", g) for n, g in grads.items())
        wanted = sorted(k for k in reference.keys
                        if (k.startswith("out") and mode in ("fwd", "full"))
                        or (k.startswith("grad_") and mode in ("bwd", "full")))
        compared = reference.compare({k: values.get(k) for k in wanted})  # missing: None, an error
        errors, worst, worst_rel, failures = {}, 0.0, 0.0, []
        for key, (err, scale) in compared.items():
            errors[key] = err
            worst = max(worst, err)
            worst_rel = max(worst_rel, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
            factor = GRAD_FACTOR if key.startswith("grad_") else FACTOR
            tol = (self.spec.rtol or RTOL)[self.dtype] * scale
            if naive_errors and key in naive_errors and math.isfinite(naive_errors[key]):
                tol = max(tol, factor * naive_errors[key])
            if not err <= tol:
                what = ("wrong shape or non-finite values" if math.isinf(err)
                        else f"max error {err:.3g} > tolerance {tol:.3g}")
                failures.append(f"{_tensor_name(key)}: {what}")
        return Outcome("ok" if not failures else "failed",
                       reason=("wrong result vs the fp32 reference: " + "; ".join(failures)) if failures else None,
                       max_abs_err=worst if math.isfinite(worst) else None,
                       rel_err=worst_rel if math.isfinite(worst_rel) else None, note=provider.note,
                       errors=errors)

    def _memory_mark(self) -> Optional[int]:
        """Start tracking the peak of allocated memory (CUDA); returns the baseline."""
        if self.device.type != "cuda":
            return None
        timing.flush_l2(self.device)  # allocate the flush buffer before the baseline
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _peak_since(self, base: Optional[int]) -> Optional[float]:
        """MiB allocated beyond the baseline at the peak of the timed calls: what one
        call needs on top of its inputs (and, in bwd mode, of the recorded forward)."""
        if base is None:
            return None
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20


class _Runnable:
    """A provider made runnable in one mode over the rotated input copies.

    run(arg) returns (outputs, {grad_name: gradient}); `args` are what to rotate."""

    def __init__(self, spec: OpSpec, mode: str, provider: Provider, input_sets: Sequence[dict], dout):
        # A copy of dout per provider: some backwards write into their incoming gradient
        # (Liger's RMSNorm does, in place), which must not reach the next provider.
        self.mode, self.provider = mode, provider
        self.dout = dout.clone() if dout is not None and mode != "fwd" else None
        self.self_contained = spec.self_contained
        self.grad_names = [n for n in spec.grad_names if input_sets[0].get(n) is not None]
        if mode == "fwd" or self.self_contained:
            self.args = list(input_sets)
        elif mode == "full":
            self.args = [self._with_leaves(s) for s in input_sets]
        else:
            self.args = []
            for s in input_sets:
                leaves = self._with_leaves(s)
                with torch.enable_grad():
                    outs = _as_tuple(provider.fn(leaves))
                self.args.append((leaves, outs))

    def _with_leaves(self, inputs: dict) -> dict:
        out = dict(inputs)
        for n in self.grad_names:
            out[n] = inputs[n].detach().requires_grad_()
        return out

    def check_result(self):
        """What the accuracy check compares: run(args[0]), or the provider's check_fn."""
        if self.provider.check_fn is not None:
            return _as_tuple(self.provider.check_fn(self.args[0])), {}
        return self.run(self.args[0])

    def run(self, arg):
        if self.self_contained:
            return _as_tuple(self.provider.fn(arg)), {}
        if self.mode == "fwd":
            with torch.no_grad():
                return _as_tuple(self.provider.fn(arg)), {}
        if self.mode == "full":
            with torch.enable_grad():
                outs = _as_tuple(self.provider.fn(arg))
                grads = torch.autograd.grad(outs[0], [arg[n] for n in self.grad_names], self.dout,
                                            allow_unused=True)
            return outs, dict(zip(self.grad_names, grads))
        leaves, outs = arg
        grads = torch.autograd.grad(outs[0], [leaves[n] for n in self.grad_names], self.dout,
                                    retain_graph=True, allow_unused=True)
        return outs, dict(zip(self.grad_names, grads))


def _warning_reasons(caught) -> str:
    texts = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in texts:
            texts.append(text)
    return "; ".join(texts)[:400]


def _tensor_name(key: str) -> str:
    if key.startswith("grad_"):
        return "d" + key[5:]
    return "output" if key == "out0" else f"output {int(key[3:]) + 1}"


def _tick(progress) -> None:
    if progress is not None:
        progress.update(1)

