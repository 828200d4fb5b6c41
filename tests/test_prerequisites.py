"""The prerequisite mechanism of the test suite (tests/helpers.py, conftest.py): a test
that cannot run because a package, tool or header is missing skips on a developer's
machine and fails under CI=true; the triton backend's cases are collected even where
Triton is missing; and the CUDA emulator builds from the headers pip packages carry.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from types import SimpleNamespace

import pytest
import torch

import conftest
import helpers
from fastattn import backends
from fastattn.ops import attention as attention_op
from fastattn.ops import layer_norm as layer_norm_op


@pytest.fixture
def outside_ci(monkeypatch):
    monkeypatch.delenv(helpers.CI_ENV, raising=False)


@pytest.fixture
def under_ci(monkeypatch):
    monkeypatch.setenv(helpers.CI_ENV, "true")


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("TRUE", True), ("", False),
                                            ("false", False), ("0", False)])
def test_in_ci_reads_the_ci_variable(monkeypatch, value, expected):
    monkeypatch.setenv(helpers.CI_ENV, value)
    assert helpers.in_ci() is expected


def test_missing_prerequisite_skips_outside_ci(outside_ci):
    with pytest.raises(pytest.skip.Exception, match="the frobnicator is missing"):
        helpers.missing_prerequisite("the frobnicator is missing")


def test_missing_prerequisite_fails_under_ci(under_ci):
    with pytest.raises(pytest.fail.Exception, match="CI=true.*the frobnicator is missing"):
        helpers.missing_prerequisite("the frobnicator is missing")


def test_require_and_require_module(under_ci):
    helpers.require(None)
    assert helpers.require_module("math").sqrt(4.0) == 2.0
    with pytest.raises(pytest.fail.Exception, match="no_such_module_here cannot be imported"):
        helpers.require_module("no_such_module_here")
    with pytest.raises(pytest.fail.Exception, match="gone"):
        helpers.require("gone")


def _item(backend=None, marked=False):
    """A stand-in for a collected test: parametrized with `backend`, marked requires_triton."""
    callspec = None if backend is None else SimpleNamespace(params={"backend": backend, "dtype": torch.float32})
    return SimpleNamespace(
        callspec=callspec,
        get_closest_marker=lambda name: object() if marked and name == "requires_triton" else None)


@pytest.mark.parametrize("item", [_item(backend="triton"), _item(marked=True)], ids=["backend-param", "marked"])
def test_triton_cases_fail_under_ci_where_triton_is_missing(item, under_ci, monkeypatch):
    """Through conftest's pytest_runtest_setup, as pytest calls it before each test."""
    monkeypatch.setattr(helpers, "triton_missing_reason", lambda: "the triton package is not installed")
    with pytest.raises(pytest.fail.Exception, match="the triton package is not installed"):
        conftest.pytest_runtest_setup(item)


def test_triton_cases_skip_outside_ci_where_triton_is_missing(outside_ci, monkeypatch):
    monkeypatch.setattr(helpers, "triton_missing_reason", lambda: "the triton package is not installed")
    with pytest.raises(pytest.skip.Exception):
        conftest.pytest_runtest_setup(_item(backend="triton"))


def test_other_cases_need_no_triton(under_ci, monkeypatch):
    monkeypatch.setattr(helpers, "triton_missing_reason", lambda: "the triton package is not installed")
    for item in (_item(backend="naive"), _item(backend="cuda"), _item()):
        conftest.pytest_runtest_setup(item)


def test_triton_present_passes_under_ci(under_ci, monkeypatch):
    monkeypatch.setattr(helpers, "triton_missing_reason", lambda: None)
    conftest.pytest_runtest_setup(_item(backend="triton"))


def test_backends_of_keeps_the_triton_cases_where_triton_is_missing(monkeypatch):
    """Otherwise its parametrized cases would vanish from the run without a word."""
    real = backends.backend_unavailable_reason

    def no_triton(name, device=None):
        return "the triton package is not installed" if name == "triton" else real(name, device)

    monkeypatch.setattr(backends, "backend_unavailable_reason", no_triton)
    for table in (attention_op.BACKENDS, layer_norm_op.BACKENDS):
        listed = helpers.backends_of(table, helpers.DEVICE)
        assert "triton" in listed and "naive" in listed
        if helpers.DEVICE.type == "cpu":
            assert "cuda" not in listed  # the cuda backend never runs CPU tensors: not a prerequisite


# ----------------------------------------------------------------------------- the emulator's headers

_HALF_PROBE = textwrap.dedent("""
    #include <cstdio>
    #include <cuda_bf16.h>
    #include <cuda_fp16.h>
    int main() {
      const float values[] = {1.5f, -0.333333f, 65504.0f, 3.0e-8f};
      for (float v : values) {
        std::printf("%.9g %.9g\\n", __half2float(__float2half(v)), __bfloat162float(__float2bfloat16(v)));
      }
      return 0;
    }
""")


def test_cuda_half_headers_of_pip_packages_build_on_the_host(tmp_path):
    """The emulator's header search reaches the CUDA headers in Triton's wheel, which come
    without CCCL's <nv/target> (the host-only one in tests/cuda_emulation stands in): the
    fp16/bf16 conversions the emulator uses build with the host compiler and round as
    torch rounds."""
    from test_cuda_attention import _pip_cuda_include_dirs, emulator_include_dirs

    compiler = shutil.which("g++")
    if compiler is None:
        helpers.missing_prerequisite("g++ is not on PATH")
    found = [d for d in _pip_cuda_include_dirs() if (d / "cuda_fp16.h").is_file()]
    if not found:
        helpers.missing_prerequisite("no pip package carries cuda_fp16.h (Triton's wheel does)")
    source = tmp_path / "half_probe.cpp"
    source.write_text(_HALF_PROBE)
    values = torch.tensor([1.5, -0.333333, 65504.0, 3.0e-8])
    expected = torch.stack([values.half().float(), values.bfloat16().float()], dim=1)
    for include in found:
        binary = tmp_path / "half_probe"
        flags = [f"-I{d}" for d in emulator_include_dirs(include)]
        build = subprocess.run([compiler, "-std=c++20", *flags, str(source), "-o", str(binary)], capture_output=True,
                               text=True, timeout=300)
        assert build.returncode == 0, f"{include}:\n{build.stderr[-3000:]}"
        run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60, check=True)
        got = torch.tensor([[float(x) for x in line.split()] for line in run.stdout.splitlines()])
        assert torch.equal(got, expected), f"{include}: {got} != {expected}"
