#!/usr/bin/env bash
# Install fastattn and what its tests and benchmarks need, on a fresh machine.
# torch is pinned first so pip never swaps in a CUDA build on the CPU machines; on a
# machine that already has a CUDA torch, set FASTATTN_KEEP_TORCH=1 to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
if [ "${FASTATTN_KEEP_TORCH:-0}" != "1" ]; then
  $PIP "torch==2.13.0"
fi
# numpy<2.4: the Triton interpreter (CPU tests) breaks on numpy 2.4.
# transformers: the releases the integration tests have run on, 5.17 (the GPU machine's)
# to 5.25; widen the range only after running tests/test_integrations.py on the new end.
$PIP "triton==3.6.0" "numpy<2.4" setuptools wheel ninja pytest pytest-benchmark matplotlib tqdm \
  "transformers>=5.17,<5.26"
# --no-build-isolation: setup.py must see the installed torch to decide on the CUDA build.
$PIP --no-build-isolation -e .
python -c "import fastattn; print('fastattn', fastattn.__version__, 'backends:', fastattn.available_backends())"
