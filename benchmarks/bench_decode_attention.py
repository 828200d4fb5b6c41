"""pytest-benchmark suite of fastattn.decode_attention: the cases of `fastattn-bench --op decode_attention --quick`,
one test per shape, mode and provider, checked against the fp32 reference before
being timed. CUDA only."""

import pytest

from fastattn.bench import suite

pytestmark = suite.PYTEST_MARKS


@pytest.mark.parametrize("spec_name, shape, mode, provider", suite.params("decode_attention"))
def test_decode_attention(benchmark, spec_name, shape, mode, provider):
    suite.run(benchmark, spec_name, shape, mode, provider)
