"""The correctness smoke of a GPU run (stage 2 of benchmarks/device_run.sh): every op ×
{triton, cuda} × {fp16, bf16}, forward and backward, at the shapes of
fastattn.bench.smoke.SMOKE, each output and gradient against the float64 reference with
the tests' rule (helpers.assert_within_naive_error), default configs only.

    python -m pytest tests/test_gpu_smoke.py -m gpu_smoke -n 8      # on the GPU machine

On CPU these tests run only when FASTATTN_SMOKE_MATRIX is set (the dry run of
device_run.sh sets it to `tiny`: the Triton kernels in the interpreter, the cuda
backend recorded as skipped); otherwise they are skipped. Each test records its
errors with record_property, which fastattn.bench.pytest_jsonl writes out.
"""

from __future__ import annotations

import os

import pytest

from fastattn.bench import smoke
from helpers import DEVICE, FACTOR, GRAD_FACTOR, assert_within_naive_error, max_error

pytestmark = [
    pytest.mark.gpu_smoke,
    pytest.mark.skipif(DEVICE.type != "cuda" and not os.environ.get(smoke.MATRIX_ENV),
                       reason="the smoke matrix runs on a GPU, or on CPU in the dry run of "
                              "benchmarks/device_run.sh (tests/test_device_run.py)"),
]

MATRIX = smoke.MATRICES[smoke.matrix_name(DEVICE)]


@pytest.mark.parametrize("case,backend,dtype", [
    pytest.param(case, backend, dtype, id=f"{case.id}-{backend}-{dtype}")
    for case, backend, dtype in smoke.params(MATRIX)
])
def test_smoke(case, backend, dtype, record_property):
    record_property("smoke", {"op": case.op, "case": case.name, "backend": backend, "dtype": dtype,
                              "sizes": dict(case.sizes), "device": str(DEVICE)})
    try:
        results = smoke.run_case(case, backend, dtype, DEVICE)
    except smoke.SmokeSkip as exc:
        pytest.skip(str(exc))
    errors, failures = {}, []
    for name, (ours, naive, ref) in results.items():
        errors[name] = {"err": max_error(ours, ref) if ours is not None and ours.shape == ref.shape else None,
                        "naive_err": max_error(naive, ref)}
        try:
            assert ours is not None, f"{name}: missing"
            assert_within_naive_error(ours, naive, ref, factor=GRAD_FACTOR if name.startswith("d") else FACTOR,
                                      what=name)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    record_property("errors", errors)
    assert not failures, "; ".join(failures)
