"""Build script: installs python/fastattn as `fastattn`, kernels/ as `fastattn.kernels`,
and builds the CUDA extension `fastattn._C` from csrc/ where it can be built.

The extension is built when a CUDA build of torch is importable and nvcc is found
(CUDA_HOME), or when FASTATTN_BUILD_CUDA=1 forces it; FASTATTN_BUILD_CUDA=0 skips it.
torch must be importable by this script, so install with `--no-build-isolation`:

    pip install --no-build-isolation -e .

Architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"); MAX_JOBS bounds
the parallel nvcc jobs (ninja).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _log(message):
    print(f"fastattn setup: {message}", file=sys.stderr)


def _cuda_build_wanted():
    """Decide whether to build fastattn._C; returns (wanted, reason)."""
    forced = os.environ.get("FASTATTN_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"FASTATTN_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "FASTATTN_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if forced == "1":
            raise RuntimeError(
                "FASTATTN_BUILD_CUDA=1 but torch is not importable by setup.py; "
                "install torch first and build with `pip install --no-build-isolation .`"
            )
        return False, "torch is not importable (build with --no-build-isolation)"
    if forced == "1":
        return True, "FASTATTN_BUILD_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources = sorted(
        os.path.relpath(path, ROOT)
        for pattern in ("csrc/*.cpp", "csrc/**/*.cpp", "csrc/**/*.cu")
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    sources = list(dict.fromkeys(sources))
    return CUDAExtension(
        name="fastattn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        libraries=["cublasLt"],  # csrc/ffn/gemm_lt.cu
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr"],
        },
    )


def main():
    ext_modules, cmdclass = [], {}
    wanted, reason = _cuda_build_wanted()
    if wanted:
        from torch.utils.cpp_extension import BuildExtension

        _log(f"building fastattn._C ({reason}; archs {os.environ.get('TORCH_CUDA_ARCH_LIST', DEFAULT_ARCH_LIST)})")
        ext_modules = [_cuda_extension()]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    else:
        _log(f"not building fastattn._C: {reason}")

    setup(
        packages=["fastattn", "fastattn.kernels"]
        + ["fastattn." + name for name in find_packages(os.path.join(ROOT, "python", "fastattn"))],
        package_dir={"fastattn": "python/fastattn", "fastattn.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


main()
