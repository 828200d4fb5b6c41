"""Test set-up: the Triton interpreter on machines without CUDA, markers, seeding.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here,
at conftest import, from a check that does not import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
