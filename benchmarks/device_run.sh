#!/usr/bin/env bash
# The one script to run on the GPU machine (no network there; torch, triton, nvcc,
# pytest, pytest-benchmark, matplotlib are preinstalled). Usage:
#     bash benchmarks/device_run.sh [OUT_DIR]        (default: $OUT)
# It installs fastattn with the CUDA extension, records the machine, runs the GPU tests
# (bf16 included) and the whole test suite, runs the benchmarks, and leaves at most
# eight files in OUT_DIR (the device tool returns no more): device.txt, install.log,
# tests.log, bench.log, pytest-bench.log and results.tar.gz (JSONL, tables, plots).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:?give an output folder or set OUT}}
mkdir -p "$out"
work=$(mktemp -d)
status=0

{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
  nvcc --version | tail -n 2
} > "$out/device.txt" 2>&1

MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 || status=1
python3 -c "import fastattn; print('backends:', fastattn.available_backends())" >> "$out/install.log" 2>&1

# GPU tests first (they are the point of this run), then everything else.
{
  python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
  python3 -m pytest tests -m "not gpu" -q -p no:cacheprovider
} > "$out/tests.log" 2>&1 || status=1

if python3 -c "import fastattn.bench.cli" 2>/dev/null; then
  python3 -m fastattn.bench --op all --out "$work/bench" > "$out/bench.log" 2>&1 || status=1
  python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$work/bench/pytest-benchmark.json" > "$out/pytest-bench.log" 2>&1 || status=1
else
  echo "fastattn.bench does not exist yet: no benchmark run" > "$out/bench.log"
fi

[ -d "$work/bench" ] && tar -czf "$out/results.tar.gz" -C "$work" bench
rm -rf "$work"
exit $status
