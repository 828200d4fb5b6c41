"""pytest-benchmark suite of fastattn.layer_norm: the cases of `fastattn-bench --op layer_norm --quick`,
one test per shape, mode and provider, checked against the fp32 reference before
being timed. CUDA only."""

import pytest

from fastattn.bench import suite

pytestmark = suite.PYTEST_MARKS


@pytest.mark.parametrize("spec_name, shape, mode, provider", suite.params("layer_norm"))
def test_layer_norm(benchmark, spec_name, shape, mode, provider):
    suite.run(benchmark, spec_name, shape, mode, provider)
