"""pytest-benchmark suite of fastattn.attention: the cases of `fastattn-bench --op attention --quick`,
one test per shape, mode and provider, checked against the fp32 reference before
being timed. CUDA only."""

import pytest

from fastattn.bench import suite

pytestmark = suite.PYTEST_MARKS


@pytest.mark.parametrize("spec_name, shape, mode, provider", suite.params("attention"))
def test_attention(benchmark, spec_name, shape, mode, provider):
    suite.run(benchmark, spec_name, shape, mode, provider)
