"""Build script: installs python/fastattn as `fastattn`, kernels/ as `fastattn.kernels`,
and builds the CUDA extension `fastattn._C` from csrc/ where it can be built.

The extension is built when a CUDA build of torch is importable and a CUDA toolkit is
found, or when FASTATTN_BUILD_CUDA=1 forces it; FASTATTN_BUILD_CUDA=0 skips it. torch
must be importable by this script, so install with `--no-build-isolation`:

    pip install --no-build-isolation -e .

Nothing else needs setting by hand:
- the CUDA toolkit is CUDA_HOME (or CUDA_PATH) when set, else the one the nvcc on PATH
  belongs to, found through nvcc's own dry run (so a wrapper script or a symlink outside
  the toolkit's folder leads to the real folder), else /usr/local/cuda;
- cuBLASLt (csrc/ffn/gemm_lt.cu) comes from the nvidia wheel that the installed CUDA
  torch loads (site-packages/nvidia/<package>/include and lib/libcublasLt.so.<major>,
  which has no unversioned .so), else from the toolkit; the library is linked by its
  full path with an rpath to its folder;
- architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"): 9.0 is built as
  9.0a (the Hopper attention forward needs wgmma and setmaxnreg), anything below 8.0
  is refused. The -gencode flags are written here, not by torch;
- `--use_fast_math` applies to the attention kernels (csrc/attention) only: the norm and
  FFN kernels' fp32 results are compared with PyTorch's, where flush-to-zero and
  approximate division do not belong.

MAX_JOBS bounds the parallel nvcc jobs (ninja). `fastattn._C`'s build_info() names the
CUDA toolkit, the torch and the architectures it was built for.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"
MIN_ARCH = (8, 0)
# Sources under these folders are compiled with --use_fast_math; every other source without.
FAST_MATH_DIRS = ("csrc/attention",)
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3", "-std=c++20"]


def _log(message):
    print(f"fastattn setup: {message}", file=sys.stderr)


def _output_of(command):
    """stdout + stderr of a short command, or "" when it cannot run."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout + result.stderr


# ----------------------------------------------------------------------------- toolkit


def find_cuda_toolkit(environ=None, which=shutil.which):
    """The CUDA toolkit's folder (the one holding bin/nvcc), or None.

    CUDA_HOME or CUDA_PATH when set; else the folder of the nvcc on PATH as nvcc itself
    reports it (`nvcc --dryrun` prints `TOP=<toolkit>/bin/..`, also when the nvcc on PATH
    is a wrapper script that execs the real one), else that nvcc's resolved parent
    folder, else /usr/local/cuda.
    """
    environ = os.environ if environ is None else environ
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            return os.path.realpath(environ[name])
    candidates = []
    nvcc = which("nvcc")
    if nvcc is not None:
        dry_run = _output_of([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull])
        top = re.search(r"^#\$ TOP=(.+?)\s*$", dry_run, re.MULTILINE)
        if top is not None:
            candidates.append(top.group(1))
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        folder = os.path.realpath(candidate)
        if os.path.isfile(os.path.join(folder, "bin", "nvcc")):
            return folder
    return None


def nvcc_version(toolkit):
    """(major, minor) of the toolkit's nvcc, from `nvcc --version`, or None."""
    found = re.search(r"release (\d+)\.(\d+)", _output_of([os.path.join(toolkit, "bin", "nvcc"), "--version"]))
    return (int(found.group(1)), int(found.group(2))) if found else None


# ----------------------------------------------------------------------------- cuBLASLt


def _nvidia_wheel_roots():
    """Folders of the nvidia wheels next to the installed torch (site-packages/nvidia)."""
    roots = []
    try:
        import torch

        roots.append(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))
    except ImportError:
        pass
    for entry in sys.path:
        roots.append(os.path.join(entry, "nvidia"))
    return [root for root in dict.fromkeys(os.path.realpath(r) for r in roots) if os.path.isdir(root)]


def find_cublaslt(cuda_major, toolkit, wheel_roots=None):
    """(include folder, library file) of cuBLASLt for CUDA `cuda_major`, or None.

    First the nvidia wheel that a CUDA torch depends on (nvidia/cu13/{include,lib} for
    CUDA 13, nvidia/cublas/{include,lib} for CUDA 12: the library it loads at run time),
    then the toolkit's include/ and lib64/.
    """
    wheel_roots = _nvidia_wheel_roots() if wheel_roots is None else wheel_roots
    for root in wheel_roots:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            library = os.path.join(os.path.dirname(include), "lib", f"libcublasLt.so.{cuda_major}")
            if os.path.isfile(os.path.join(include, "cublasLt.h")) and os.path.isfile(library):
                return include, library
    if toolkit is not None:
        include = os.path.join(toolkit, "include")
        if os.path.isfile(os.path.join(include, "cublasLt.h")):
            for folder in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
                for name in (f"libcublasLt.so.{cuda_major}", "libcublasLt.so"):
                    library = os.path.join(toolkit, folder, name)
                    if os.path.isfile(library):
                        return include, library
    return None


# ----------------------------------------------------------------------------- architectures


def parse_arch_list(spec):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.0 9.0+PTX", ...) -> the list this build uses.

    9.0 becomes 9.0a (the Hopper forward's wgmma and setmaxnreg exist only there; the
    kernel of any other sm_90 build traps). Raises ValueError for an entry below 8.0 or
    one that is not MAJOR.MINOR[a|f][+PTX].
    """
    archs = []
    for entry in re.split(r"[;\s,]+", spec.strip()):
        if not entry:
            continue
        found = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if found is None:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not MAJOR.MINOR[a][+PTX] (e.g. 8.0, 9.0a, 8.6+PTX); "
                f"got TORCH_CUDA_ARCH_LIST={spec!r}"
            )
        major, minor, suffix, ptx = int(found.group(1)), int(found.group(2)), found.group(3), found.group(4) or ""
        if (major, minor) < MIN_ARCH:
            raise ValueError(
                f"fastattn's CUDA kernels need compute capability {MIN_ARCH[0]}.{MIN_ARCH[1]} or newer "
                f"(mma.sync bf16, cp.async); TORCH_CUDA_ARCH_LIST={spec!r} asks for {entry}. "
                f"Drop it, or set FASTATTN_BUILD_CUDA=0 to skip the extension"
            )
        if (major, minor) == (9, 0) and suffix == "":
            suffix = "a"
        arch = f"{major}.{minor}{suffix}{ptx}"
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={spec!r} names no architecture")
    return archs


def gencode_flags(archs):
    """nvcc -gencode flags: a cubin per arch, plus PTX for the entries with +PTX."""
    flags = []
    for arch in archs:
        number = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def uses_fast_math(source):
    relative = os.path.relpath(os.path.join(ROOT, source), ROOT).replace(os.sep, "/")
    return any(relative.startswith(folder + "/") for folder in FAST_MATH_DIRS)


# ----------------------------------------------------------------------------- the build


def _cuda_build_wanted(toolkit):
    """Decide whether to build fastattn._C; returns (wanted, reason)."""
    forced = os.environ.get("FASTATTN_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"FASTATTN_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "FASTATTN_BUILD_CUDA=0"
    try:
        import torch
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
    if toolkit is None:
        return False, "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, CUDA toolkit at {toolkit}"


def _version_defines(toolkit, archs):
    """-D flags naming what the build is for, for csrc/ops.cpp (its build_info() prints
    them; the .cu files do not see them, so a torch upgrade recompiles ops.cpp alone)."""
    import torch

    cuda = nvcc_version(toolkit) or (0, 0)
    torch_version = re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__)
    torch_cuda = re.match(r"(\d+)\.(\d+)", torch.version.cuda or "0.0")
    defines = {
        "FASTATTN_BUILT_CUDA_MAJOR": cuda[0],
        "FASTATTN_BUILT_CUDA_MINOR": cuda[1],
        "FASTATTN_BUILT_TORCH_MAJOR": torch_version.group(1),
        "FASTATTN_BUILT_TORCH_MINOR": torch_version.group(2),
        "FASTATTN_BUILT_TORCH_PATCH": torch_version.group(3),
        "FASTATTN_BUILT_TORCH_CUDA_MAJOR": torch_cuda.group(1),
        "FASTATTN_BUILT_TORCH_CUDA_MINOR": torch_cuda.group(2),
        # identifiers (sm_80,sm_90a), stringized by ops.cpp
        "FASTATTN_BUILT_GPU_TARGETS": ",".join("sm_" + a.replace("+PTX", "").replace(".", "") for a in archs),
    }
    return [f"-D{name}={value}" for name, value in defines.items()]


def _cuda_extension(toolkit):
    import torch
    from torch.utils.cpp_extension import CUDAExtension

    archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    cuda_major = int((torch.version.cuda or str((nvcc_version(toolkit) or (0, 0))[0])).split(".")[0])
    cublaslt = find_cublaslt(cuda_major, toolkit)
    if cublaslt is None:
        raise RuntimeError(
            f"fastattn setup: cuBLASLt (cublasLt.h and libcublasLt.so.{cuda_major}) was found neither in an "
            f"nvidia wheel next to torch nor in the CUDA toolkit at {toolkit}; csrc/ffn/gemm_lt.cu needs it"
        )
    cublaslt_include, cublaslt_library = cublaslt
    _log(f"archs {';'.join(archs)}; cuBLASLt from {cublaslt_include} and {cublaslt_library}")

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
        extra_compile_args={
            "cxx": CXX_FLAGS + _version_defines(toolkit, archs),
            # -isystem: searched after the toolkit's own headers, so only what the toolkit
            # lacks (cublasLt.h) comes from the wheel.
            "nvcc": NVCC_FLAGS + gencode_flags(archs) + ["-isystem", cublaslt_include],
        },
        extra_link_args=[cublaslt_library, "-Wl,-rpath," + os.path.dirname(cublaslt_library)],
    )


def _build_extension_class():
    """torch's BuildExtension, compiling FAST_MATH_DIRS' sources in a pass of their own
    with --use_fast_math (nvcc takes one set of flags per invocation)."""
    from torch.utils.cpp_extension import BuildExtension

    class FastattnBuildExtension(BuildExtension):
        def build_extension(self, ext):
            fast = [source for source in ext.sources if uses_fast_math(source)]
            if fast:
                args = {key: list(value) for key, value in ext.extra_compile_args.items()}
                args["nvcc"].append("--use_fast_math")
                objects = self.compiler.compile(
                    fast,
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=args,
                    depends=ext.depends,
                )
                ext.sources = [source for source in ext.sources if source not in fast]
                ext.depends = list(ext.depends) + fast
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return FastattnBuildExtension.with_options(use_ninja=True)


def main():
    ext_modules, cmdclass = [], {}
    toolkit = find_cuda_toolkit()
    wanted, reason = _cuda_build_wanted(toolkit)
    if wanted:
        if toolkit is None:
            raise RuntimeError("FASTATTN_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        # torch.utils.cpp_extension reads CUDA_HOME when imported (and guesses it from the
        # nvcc on PATH otherwise, wrongly for a wrapper script): set it to the real folder.
        os.environ["CUDA_HOME"] = toolkit
        import torch.utils.cpp_extension as cpp_extension

        cpp_extension.CUDA_HOME = toolkit
        _log(f"building fastattn._C ({reason})")
        ext_modules = [_cuda_extension(toolkit)]
        cmdclass = {"build_ext": _build_extension_class()}
    else:
        _log(f"not building fastattn._C: {reason}")

    setup(
        packages=["fastattn", "fastattn.kernels"]
        + ["fastattn." + name for name in find_packages(os.path.join(ROOT, "python", "fastattn"))],
        package_dir={"fastattn": "python/fastattn", "fastattn.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
