"""pytest-benchmark suite of fastattn.gated_ffn: the cases of `fastattn-bench --op gated_ffn --quick`,
one test per shape, mode and provider, checked against the fp32 reference before
being timed. CUDA only."""

import pytest

from fastattn.bench import suite

pytestmark = suite.PYTEST_MARKS


@pytest.mark.parametrize("spec_name, shape, mode, provider", suite.params("gated_ffn"))
def test_gated_ffn(benchmark, spec_name, shape, mode, provider):
    suite.run(benchmark, spec_name, shape, mode, provider)
