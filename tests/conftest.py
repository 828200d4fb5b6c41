"""Test set-up: the Triton interpreter on machines without CUDA, markers, seeding,
a private inductor cache, and the prerequisite check (helpers.check_prerequisites: a
test that needs Triton skips where it is missing, and fails instead under CI=true).

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here,
at conftest import, from a check that does not import triton.
"""

import atexit
import os
import shutil
import tempfile

# A fresh inductor cache per test run: cached compiled graphs are keyed on the graph,
# not on a custom op's fake implementation, so an old cache can replay stale strides.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastattn-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import helpers  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_triton: runs the triton backend on tests/helpers.DEVICE (skipped where Triton is "
                   "missing; fails under CI=true)")


def pytest_runtest_setup(item):
    helpers.check_prerequisites(item)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    """Every test starts from the same RNG state and the default backend."""
    import fastattn

    torch.manual_seed(0)
    fastattn.set_backend("auto")
    yield
    fastattn.set_backend("auto")
