"""pytest-benchmark suites: benchmarks/bench_<op>.py (`pytest benchmarks/ --benchmark-only`).

The suites are named bench_*.py, which pytest does not collect by default; this
hook collects them. Every case is skipped without a CUDA device.
"""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
