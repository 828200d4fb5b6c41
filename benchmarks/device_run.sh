#!/usr/bin/env bash
# The one script to run on the GPU machine (no network there; torch, triton, nvcc,
# pytest, pytest-benchmark, matplotlib are preinstalled). Usage:
#
#     FASTATTN_GIT_COMMIT=<sha> bash benchmarks/device_run.sh OUT_DIR [STAGE ...]
#
# STAGE is any of: install tests bench pytest-bench (default: all four, in order).
# A device command is limited to 10 minutes, so a session runs the stages as separate
# commands (install + tests, then bench, then pytest-bench); each stage after install
# re-installs only if fastattn._C is missing (a fresh machine). .git does not travel
# to the device machine: pass the commit being measured in FASTATTN_GIT_COMMIT.
#
# It leaves at most eight files in OUT_DIR (the device tool returns no more):
# device.txt, install.log, tests.log, bench.log, pytest-bench.log and results.tar.gz
# (the fastattn-bench JSONL, Markdown tables and plots under bench/<device>/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?give an output folder}
shift
stages=${*:-install tests bench pytest-bench}
mkdir -p "$out"
export FASTATTN_GIT_COMMIT=${FASTATTN_GIT_COMMIT:-$(git rev-parse --short=10 HEAD 2>/dev/null || echo unknown)}
status=0

install() {
  {
    echo "date: $(date -u +%FT%TZ)  commit: $FASTATTN_GIT_COMMIT"
    nvidia-smi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
    nvcc --version | tail -n 2
  } > "$out/device.txt" 2>&1
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 || status=1
  python3 -c "import fastattn; print('backends:', fastattn.available_backends())" >> "$out/install.log" 2>&1
}

ensure_installed() {
  python3 -c "import fastattn._C" 2>/dev/null || install
}

for stage in $stages; do
  case $stage in
    install) install ;;
    tests)
      ensure_installed
      # GPU tests first (they are the point of this run), then everything else.
      {
        python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
        python3 -m pytest tests -m "not gpu" -q -p no:cacheprovider
      } > "$out/tests.log" 2>&1 || status=1
      ;;
    bench)
      ensure_installed
      python3 -m fastattn.bench --op all --out "$out/bench" > "$out/bench.log" 2>&1 || status=1
      ;;
    pytest-bench)
      ensure_installed
      mkdir -p "$out/bench"
      python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$out/bench/pytest-benchmark.json" > "$out/pytest-bench.log" 2>&1 || status=1
      ;;
    *) echo "unknown stage $stage (install tests bench pytest-bench)" >&2; exit 2 ;;
  esac
done

if [ -d "$out/bench" ]; then
  tar -czf "$out/results.tar.gz" -C "$out" bench && rm -rf "$out/bench"
fi
exit $status
