"""How fastattn._C is built (setup.py) and what the built extension holds.

The first half checks setup.py's decisions on any machine: the CUDA toolkit behind a
wrapper nvcc, cuBLASLt from the nvidia wheel a CUDA torch depends on, the architecture
list (9.0 built as 9.0a, nothing below 8.0), fast math for the attention sources only,
and that pyproject declares the torch CI tests.

The second half needs the built extension, which a CPU torch cannot build: it runs in
CI's "GPU machine's stack" leg (.ci/gpu_stack.sh: torch 2.11 CUDA build, nvcc 13.0, no
GPU), which sets FASTATTN_EXPECT_EXTENSION=1 so that a missing extension fails there
instead of skipping. It imports fastattn._C without a GPU and checks every fastattn_cuda
op's registration, build_info(), the libraries it links, and its GPU code: the Hopper
kernel's body only in the sm_90a code (a trap elsewhere) and flush-to-zero arithmetic
(--use_fast_math) only in the attention kernels.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastattn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() runs only as __main__
    return module


setup_py = _load_setup()


# ----------------------------------------------------------------------------- setup.py's decisions


def test_arch_list_builds_9_0_as_9_0a_and_keeps_the_rest():
    assert setup_py.parse_arch_list("8.0;9.0a") == ["8.0", "9.0a"]
    assert setup_py.parse_arch_list("8.0;9.0") == ["8.0", "9.0a"]
    assert setup_py.parse_arch_list(" 8.6 9.0+PTX,10.0 ") == ["8.6", "9.0a+PTX", "10.0"]
    assert setup_py.parse_arch_list("9.0;9.0a") == ["9.0a"]


@pytest.mark.parametrize("spec", ["7.5;8.0", "6.1", "7.0+PTX"])
def test_arch_list_refuses_archs_below_8_0(spec):
    with pytest.raises(ValueError, match=r"compute capability 8\.0 or newer .*TORCH_CUDA_ARCH_LIST"):
        setup_py.parse_arch_list(spec)


@pytest.mark.parametrize("spec", ["Hopper", "sm_90", "9", ""])
def test_arch_list_refuses_what_it_cannot_read(spec):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup_py.parse_arch_list(spec)


def test_gencode_flags_give_a_cubin_per_arch_and_ptx_when_asked():
    assert setup_py.gencode_flags(["8.0", "9.0a+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
    ]


def _fake_toolkit(tmp_path):
    """A toolkit folder whose nvcc answers --dryrun and --version like nvcc 13.0, and a
    wrapper script elsewhere that execs it (as /usr/local/bin/nvcc does on the CI machine)."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--dryrun*) echo "#\\$ _HERE_={toolkit}/bin"; echo "#\\$ TOP={toolkit}/bin/.." ;;\n'
        '  *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88" ;;\n'
        "esac\n"
    )
    wrapper = tmp_path / "wrappers" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for script in (nvcc, wrapper):
        script.chmod(0o755)
    return toolkit, wrapper


def test_toolkit_is_found_behind_a_wrapper_nvcc(tmp_path):
    toolkit, wrapper = _fake_toolkit(tmp_path)
    # torch's own guess is the wrapper's grandparent folder, which has no lib64/libcudart.
    assert setup_py.find_cuda_toolkit(environ={}, which=lambda name: str(wrapper)) == str(toolkit)
    assert setup_py.nvcc_version(str(toolkit)) == (13, 0)


def test_cuda_home_wins_over_the_nvcc_on_path(tmp_path):
    toolkit, wrapper = _fake_toolkit(tmp_path)
    other = tmp_path / "elsewhere"
    assert setup_py.find_cuda_toolkit(environ={"CUDA_HOME": str(other)}, which=lambda name: str(wrapper)) == str(other)


def test_cublaslt_comes_from_the_nvidia_wheel_then_the_toolkit(tmp_path):
    site = tmp_path / "site-packages" / "nvidia"
    (site / "cu13" / "include").mkdir(parents=True)
    (site / "cu13" / "lib").mkdir()
    (site / "cu13" / "include" / "cublasLt.h").write_text("")
    (site / "cu13" / "lib" / "libcublasLt.so.13").write_text("")  # no unversioned .so, as in the wheel
    (site / "cudnn" / "include").mkdir(parents=True)
    toolkit = tmp_path / "toolkit"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "lib64").mkdir()
    (toolkit / "include" / "cublasLt.h").write_text("")
    (toolkit / "lib64" / "libcublasLt.so").write_text("")

    found = setup_py.find_cublaslt(13, str(toolkit), wheel_roots=[str(site)])
    assert found == (str(site / "cu13" / "include"), str(site / "cu13" / "lib" / "libcublasLt.so.13"))
    assert setup_py.find_cublaslt(12, str(toolkit), wheel_roots=[str(site)]) == (
        str(toolkit / "include"), str(toolkit / "lib64" / "libcublasLt.so"))
    assert setup_py.find_cublaslt(12, None, wheel_roots=[str(site)]) is None


def test_fast_math_only_for_the_attention_sources():
    sources = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").rglob("*.cu"))
    fast = [source for source in sources if setup_py.uses_fast_math(source)]
    assert fast and all(source.startswith("csrc/attention/") for source in fast)
    assert {"csrc/layer_norm/layer_norm_fwd.cu", "csrc/ffn/ffn_activation.cu", "csrc/ffn/gemm_lt.cu"} <= (
        set(sources) - set(fast))


def test_pyproject_declares_the_lowest_torch_ci_tests():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    gpu_stack = (ROOT / ".ci" / "gpu_stack.sh").read_text()
    tested = re.search(r"^TORCH_VERSION=([\d.]+)$", gpu_stack, re.MULTILINE).group(1)
    assert tuple(map(int, declared.split("."))) == tuple(map(int, tested.split(".")))[: len(declared.split("."))]
    installed = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "install.sh").read_text()).group(1)
    assert tuple(map(int, installed.split("."))) >= tuple(map(int, tested.split(".")))


# ----------------------------------------------------------------------------- the built extension

TENSOR_OPS = ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "ffn_fwd", "ffn_bwd",
              "gated_ffn_fwd", "gated_ffn_bwd")
INTROSPECTION_OPS = ("build_info", "attention_head_dims", "attention_last_forward", "attention_forward_counts")


@pytest.fixture(scope="module")
def extension():
    try:
        import fastattn._C as module
    except ImportError as exc:
        if os.environ.get("FASTATTN_EXPECT_EXTENSION") == "1":
            pytest.fail(f"FASTATTN_EXPECT_EXTENSION=1 but fastattn._C does not import: {exc}")
        pytest.skip(f"fastattn._C is not built here ({exc}); CI's GPU-stack leg builds it")
    return module


def test_every_fastattn_cuda_op_is_registered_with_a_cuda_kernel(extension):
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fastattn_cuda::")}
    assert registered == set(TENSOR_OPS + INTROSPECTION_OPS)
    for name in TENSOR_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn_cuda::{name}", "CUDA"), name


def test_build_info_names_the_cuda_torch_and_archs_it_was_built_for(extension):
    info = torch.ops.fastattn_cuda.build_info()
    found = re.fullmatch(r"fastattn\._C cuda=(\d+\.\d+) torch=(\d+\.\d+\.\d+) torch_cuda=(\d+\.\d+) "
                         r"archs=(sm_\d+a?(?:,sm_\d+a?)*)", info)
    assert found, info
    assert torch.__version__.startswith(found.group(2)), (info, torch.__version__)
    assert found.group(3) == torch.version.cuda, (info, torch.version.cuda)
    expected_archs = os.environ.get("FASTATTN_EXPECT_ARCHS")
    if expected_archs:
        assert found.group(4) == expected_archs, info


def test_introspection_answers_without_a_gpu(extension):
    assert torch.ops.fastattn_cuda.attention_last_forward() == "none"
    outcomes, counts = torch.ops.fastattn_cuda.attention_forward_counts()
    assert outcomes[0] == "sm90" and all(o.startswith("sm80: ") for o in outcomes[1:]) and len(outcomes) == 8
    assert list(counts) == [0] * len(outcomes)
    assert tuple(torch.ops.fastattn_cuda.attention_head_dims()) == (64, 128)


def _tool(name):
    """A CUDA binary tool: on PATH, in the toolkit, or shipped in the triton wheel."""
    found = shutil.which(name)
    if found is None:
        toolkit = setup_py.find_cuda_toolkit()
        for folder in ([pathlib.Path(toolkit) / "bin", pathlib.Path(toolkit) / "nvvm" / "bin"] if toolkit else []):
            if (folder / name).is_file():
                return str(folder / name)
        triton = importlib.util.find_spec("triton")
        if triton is not None:
            candidate = pathlib.Path(triton.origin).parent / "backends" / "nvidia" / "bin" / name
            if candidate.is_file():
                return str(candidate)
        pytest.fail(f"{name} not found (PATH, the CUDA toolkit, the triton wheel)")
    return found


def test_extension_links_cublaslt_by_its_versioned_name(extension):
    dynamic = subprocess.run(["readelf", "-d", extension.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", dynamic)
    assert any(re.fullmatch(r"libcublasLt\.so\.\d+", name) for name in needed), needed
    symbols = subprocess.run(["nm", "-DC", "--defined-only", extension.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "fastattn::gemm_lt(" in symbols


@pytest.fixture(scope="module")
def kernel_names(extension):
    """Every kernel in fastattn._C (cuobjdump's resource usage: quick, names only)."""
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", extension.__file__], capture_output=True,
                           text=True, check=True).stdout
    return sorted(set(re.findall(r"Function (\S+?):", usage)))


@pytest.fixture(scope="module")
def sass_of(extension):
    """sass_of(names) -> {(arch, name): SASS} of those kernels. The arch is as cuobjdump's
    SASS dump names it: "sm_90" for the sm_90a code (the build holds no plain sm_90 code:
    see test_build_info_names_the_cuda_torch_and_archs_it_was_built_for)."""

    def dump(names):
        text = subprocess.run([_tool("cuobjdump"), "--dump-sass", "--function", ",".join(names), extension.__file__],
                              capture_output=True, text=True, check=True).stdout
        kernels = {}
        sections = re.split(r"\n\s*code for (sm_\w+)", text)
        for arch, section in zip(sections[1::2], sections[2::2]):
            for block in re.split(r"\n\s*Function : ", section)[1:]:
                name, _, body = block.partition("\n")
                kernels[(arch.rstrip("a"), name.strip())] = body
        return kernels

    return dump


def _pick(names, pattern, count=None):
    found = [name for name in names if re.search(pattern, name)]
    assert found, f"no kernel matches {pattern}"
    return found[:count]


def test_the_hopper_kernel_has_a_body_only_in_the_sm90a_code(kernel_names, sass_of):
    hopper = _pick(kernel_names, r"attention_fwd_kernel_sm90")
    assert len(hopper) == 8  # (64, 128) x (fp16, bf16) x (causal, not)
    sass = sass_of(hopper)
    for name in hopper:
        assert "HGMMA" in sass[("sm_90", name)] and "UTMALDG" in sass[("sm_90", name)], f"{name}: sm_90a code"
        assert "BPT.TRAP" in sass[("sm_80", name)] and "HGMMA" not in sass[("sm_80", name)], f"{name}: sm_80 code"


def test_fast_math_reaches_the_attention_kernels_only(kernel_names, sass_of):
    """--use_fast_math makes ordinary fp32 multiplies flush denormals to zero (FMUL.FTZ,
    FFMA.FTZ): present in the attention kernels, absent from the norm and FFN kernels (the
    FADD.FTZ inside an IEEE division's reciprocal sequence is there either way). A sample:
    the fp32 kernels of each norm / FFN source and the sm80 attention forwards."""
    others = [name for source in ("layer_norm_fwd", "layer_norm_bwd", "ffn_activation")
              for name in _pick(kernel_names, rf"_{source}_cu_\w+?_kernelIf", 2)]
    attention = _pick(kernel_names, r"attention_fwd_kernel_sm80", 2)
    sass = sass_of(others + attention)
    flush = re.compile(r"\b(FMUL|FFMA)\.FTZ\b")
    for arch in ("sm_80", "sm_90"):
        for name in attention:
            assert flush.search(sass[(arch, name)]), f"{arch} {name}: no FMUL/FFMA.FTZ (fast math)"
        for name in others:
            assert not flush.search(sass[(arch, name)]), f"{arch} {name}: FMUL/FFMA.FTZ (fast math) in a norm/FFN kernel"
