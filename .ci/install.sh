#!/usr/bin/env bash
# Install fastattn with what its tests and benchmarks need, into the active Python
# (make and activate a virtual environment first; see README.md).
# An installed torch is kept, whatever its build (a CUDA torch stays a CUDA torch);
# torch==2.13.0 is installed only where none is importable (on these machines that is
# a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
if python -c "import sys; sys.exit(sys.prefix != sys.base_prefix)" 2>/dev/null; then
  echo "install.sh: not in a virtual environment: installing into $(python -c 'import sys; print(sys.prefix)')"
fi
if torch_version=$(python -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "install.sh: keeping the installed torch $torch_version"
else
  echo "install.sh: no torch importable: installing torch==2.13.0"
  $PIP "torch==2.13.0"
fi
# numpy<2.4: the Triton interpreter (CPU tests) breaks on numpy 2.4.
# transformers: the releases the integration tests have run on, 5.17 (the GPU machine's)
# to 5.25; widen the range only after running tests/test_integrations.py on the new end.
$PIP "triton==3.6.0" "numpy<2.4" setuptools wheel ninja pytest pytest-benchmark matplotlib tqdm \
  "transformers>=5.17,<5.26"
# --no-build-isolation: setup.py must see the installed torch to decide on the CUDA build.
# Not -q: setup.py's decision ("building fastattn._C ..." or "not building fastattn._C:
# <why>") is shown; pip only shows a build's output with -v, so the log is filtered.
log=$(mktemp)
if ! python -m pip install --disable-pip-version-check -v --no-build-isolation -e ".[test]" >"$log" 2>&1; then
  tail -n 40 "$log"
  echo "install.sh: pip install failed; the whole log is $log" >&2
  exit 1
fi
grep -E "fastattn setup: |^Successfully installed" "$log" | sed -e 's/^ *//' | awk '!seen[$0]++' || true
rm -f "$log"
python -c "import fastattn; print('fastattn', fastattn.__version__, 'backends:', fastattn.available_backends())"
