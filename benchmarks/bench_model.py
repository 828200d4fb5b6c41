"""pytest-benchmark suite of the reference Transformer's training step and decoding (fastattn.models): the cases of `fastattn-bench --op model --quick`,
one test per shape, mode and provider, checked against the fp32 reference before
being timed. CUDA only."""

import pytest

from fastattn.bench import suite

pytestmark = suite.PYTEST_MARKS


@pytest.mark.parametrize("spec_name, shape, mode, provider", suite.params("model"))
def test_model(benchmark, spec_name, shape, mode, provider):
    suite.run(benchmark, spec_name, shape, mode, provider)
