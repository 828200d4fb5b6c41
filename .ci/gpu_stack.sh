#!/usr/bin/env bash
# CI leg "the GPU machine's stack" (no GPU needed): Python 3.12, the registry's torch 2.11.0
# (a CUDA 13.0 build that imports and runs on CPU), triton 3.6.0, numpy<2.4, transformers
# 5.17.0, in a venv of its own made here from scratch. Builds fastattn._C for 8.0;9.0a with
# the project's setup.py and nothing else set by hand (nvcc 13.0 on PATH), imports it,
# checks every fastattn_cuda op's CUDA kernel, build_info(), the libraries it links and its
# GPU code (tests/test_build.py), then runs the op-contract and compile tests under torch
# 2.11. Every step's wall-clock and CPU time (its processes' user + system) is printed at
# the end: on a machine shared with other work the CPU time is what a dedicated one would
# spend (the build runs two nvcc jobs at a time, the op contract two pytest workers).
#
#   bash .ci/gpu_stack.sh            # venv in a fresh temporary folder
#   GPU_STACK_VENV=/path bash .ci/gpu_stack.sh   # reuse (or create) that venv
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
ARCHS="8.0;9.0a"
timings=()
step_start=0
step_cpu=0
times_file=$(mktemp)
# CPU seconds of every finished child process so far: bash's `times`, second line (run in
# this shell, not in a $(...) subshell, which would count its own children only).
children_cpu() {
  times > "$times_file"
  tail -n 1 "$times_file" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }'
}
step() {
  local now cpu
  now=$(date +%s)
  children_cpu > "$times_file.cpu"
  cpu=$(cat "$times_file.cpu")
  if [ "$step_start" -ne 0 ]; then
    timings+=("$(printf '%5ds wall %5ds CPU  %s' $(( now - step_start )) $(( cpu - step_cpu )) "$step_name")")
  fi
  step_name="$1"
  step_start=$now
  step_cpu=$cpu
  [ -n "$step_name" ] && echo "== gpu stack: $step_name =="
  return 0
}
created_venv_dir=""
report() {
  step ""
  echo "== gpu stack: time per step =="
  printf '%s\n' "${timings[@]}"
  rm -f "$times_file" "$times_file.cpu"
  [ -z "$created_venv_dir" ] || rm -rf "$created_venv_dir"  # a few GB of CUDA wheels
}
trap report EXIT

step "find Python 3.12"
python312=""
for candidate in "${FASTATTN_PYTHON312:-}" "$(command -v python3.12 || true)" \
                 "$(pyenv which python3.12 2>/dev/null || true)" \
                 "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)"; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    python312=$candidate
    break
  fi
done
if [ -z "$python312" ]; then
  echo "no Python 3.12 found (PATH, pyenv, \$FASTATTN_PYTHON312): the GPU-stack leg needs it" >&2
  exit 1
fi
echo "Python 3.12: $python312"

step "create the venv and install torch==$TORCH_VERSION (CUDA build), triton, numpy, transformers"
if [ -n "${GPU_STACK_VENV:-}" ]; then
  venv=$GPU_STACK_VENV
else
  created_venv_dir=$(mktemp -d)
  venv=$created_venv_dir/venv
fi
[ -x "$venv/bin/python" ] || "$python312" -m venv "$venv"
python="$venv/bin/python"
PIP="$python -m pip install --disable-pip-version-check -q"
$PIP --upgrade pip
# --no-compile: no .pyc for all of torch up front (imports write what they use).
$PIP --no-compile "torch==$TORCH_VERSION" "triton==3.6.0" "numpy<2.4" "transformers==5.17.0" \
  pytest pytest-xdist setuptools wheel ninja
"$python" -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "build fastattn._C for $ARCHS (setup.py, nothing set by hand)"
env -u CUDA_HOME -u CUDA_PATH TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-2}" \
  $PIP --no-build-isolation --no-deps -e .

step "import fastattn._C and check its ops and build_info"
"$python" - <<'EOF'
import re
import torch
import fastattn._C
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastattn_cuda::"))
info = torch.ops.fastattn_cuda.build_info()
print(info)
print(len(ops), "fastattn_cuda ops:", ", ".join(o.split("::")[1] for o in ops))
assert re.search(r"cuda=\d+\.\d+ torch=\d+\.\d+\.\d+ torch_cuda=\d+\.\d+ archs=sm_80,sm_90a$", info), info
EOF

export FASTATTN_EXPECT_EXTENSION=1 FASTATTN_EXPECT_ARCHS="sm_80,sm_90a" CI="${CI:-true}"
step "tests: the built extension and setup.py (test_build.py), backends"
"$python" -m pytest tests/test_build.py tests/test_backends.py -m "not slow and not gpu" -q -p no:cacheprovider

step "tests: the op contract under torch $TORCH_VERSION (opcheck and torch.compile, every op x backend)"
"$python" -m pytest tests/test_ops.py -m "not slow and not gpu" -k "opcheck or compile" -n 2 -q -p no:cacheprovider

step "tests: every other torch.compile(fullgraph=True) test under torch $TORCH_VERSION"
"$python" -m pytest tests/test_attention.py tests/test_varlen_attention.py tests/test_decode_attention.py \
  tests/test_ffn.py tests/test_gated_ffn.py tests/test_layer_norm.py tests/test_rms_norm.py tests/test_models.py \
  -m "not slow and not gpu" -k "compile_fullgraph or compile_with_inductor or compiled_model" -q -p no:cacheprovider
