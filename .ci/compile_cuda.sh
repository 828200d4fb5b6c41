#!/usr/bin/env bash
# Compile checks of csrc/ that need no GPU and no CUDA build of torch:
#  - the torch glue (csrc/*.cpp): a g++ syntax check against the installed torch's headers
#    (CI's first leg: the CPU torch 2.13 it tests);
#  - with --nvcc (or FASTATTN_CI_NVCC=1): every csrc/**/*.cu for sm_80 and sm_90a with plain
#    nvcc. The kernels include no torch headers; csrc/ffn/gemm_lt.cu needs cublasLt.h, taken
#    where setup.py finds it (the nvidia wheel of a CUDA torch, or the toolkit) and skipped,
#    with a line saying so, where there is none.
# CI's second leg (.ci/gpu_stack.sh) builds the whole extension with setup.py for sm_80 and
# sm_90a, every .cu included, so .ci/run runs the nvcc pass here only when asked.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_pass=${FASTATTN_CI_NVCC:-0}
[ "${1:-}" = "--nvcc" ] && nvcc_pass=1

if python -c "import torch" 2>/dev/null; then
  includes=$(python -c "from torch.utils.cpp_extension import include_paths; import sysconfig; print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
  for src in csrc/*.cpp; do
    g++ -std=c++20 -fsyntax-only $includes -Icsrc "$src"
    echo "C++ syntax check passed: $src"
  done
fi
if [ "$nvcc_pass" != "1" ]; then
  echo "nvcc pass not asked for (--nvcc): CI's GPU-stack leg compiles every .cu for sm_80 and sm_90a"
  exit 0
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: CUDA compile check skipped"
  exit 0
fi
# cuBLASLt's include folder as setup.py finds it (empty when there is none).
cublaslt_include=$(python - <<'EOF' 2>/dev/null || true
import importlib.util
spec = importlib.util.spec_from_file_location("fastattn_setup", "setup.py")
setup_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_py)
toolkit = setup_py.find_cuda_toolkit()
try:
    import torch
    major = int((torch.version.cuda or "").split(".")[0])
except (ImportError, ValueError):
    major = (setup_py.nvcc_version(toolkit) or (0, 0))[0] if toolkit else 0
found = setup_py.find_cublaslt(major, toolkit)
print(found[0] if found else "")
EOF
)
mapfile -t sources < <(find csrc -name '*.cu' | sort)
out=$(mktemp -d)
for src in "${sources[@]}"; do
  extra=()
  if grep -q '#include <cublasLt.h>' "$src"; then
    if [ -z "$cublaslt_include" ]; then
      echo "skipped (no cublasLt.h: neither an nvidia cuBLAS wheel nor a full toolkit here): $src"
      continue
    fi
    extra=(-isystem "$cublaslt_include")
  fi
  for arch in "compute_80,code=sm_80" "compute_90a,code=sm_90a"; do
    nvcc -std=c++20 -O3 -Icsrc "${extra[@]}" -gencode=arch=$arch --expt-relaxed-constexpr \
      -c "$src" -o "$out/$(basename "$src").${arch##*=}.o"
  done
  echo "compiled for sm_80 and sm_90a: $src"
done
rm -rf "$out"
