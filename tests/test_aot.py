"""The ahead-of-time compile check (python -m fastattn.kernels.aot): the variant counts of
the named case matrices, the sm_90 compile of the CI matrix against the committed table,
and the stand-in CUDA tensors it runs the ops on."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn.kernels import _aot_cases
from fastattn.kernels._aot_standins import HostReadError, index_tensor, standin_cuda
from helpers import require_module

# Issue 15: the GPU run's smoke matrix compiles about a minute's worth of variants at most
# (16 cores, 2-5 s each).
SMOKE_VARIANT_LIMIT = 150
TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_sm90.tsv"
SUMMARY = re.compile(r"^(\d+) distinct Triton kernel variants for sm_(\d+) \(matrix ([\w-]+), \d+ cases, "
                     r"\d+ launches, (\d+) from autotune config lists", re.MULTILINE)


def _aot(*args, timeout):
    """python -m fastattn.kernels.aot in its own process, without the interpreter."""
    require_module("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastattn.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _counts(matrices):
    """matrix -> (variants, of which from autotune config lists), for sm_90."""
    done = _aot("--count", "--arch", "90", "--matrix", ",".join(matrices), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    counts = {m.group(3): (int(m.group(1)), int(m.group(4))) for m in SUMMARY.finditer(done.stdout)}
    assert set(counts) == set(matrices), done.stdout
    return counts


def test_variant_counts_of_the_case_matrices():
    """Prints how many distinct Triton variants each matrix compiles (the GPU run's smoke
    matrix must stay under SMOKE_VARIANT_LIMIT)."""
    counts = _counts(["smoke", "gpu-tests", "ci", "all"])
    for matrix, (variants, autotuned) in counts.items():
        print(f"aot variant count: {matrix}: {variants} ({autotuned} from autotune config lists)")
    for matrix, (variants, autotuned) in counts.items():
        assert variants and not autotuned, f"matrix {matrix}: {variants} variants, {autotuned} from autotune lists"
    assert counts["smoke"][0] <= SMOKE_VARIANT_LIMIT, f"the smoke matrix compiles {counts['smoke'][0]} variants"


def test_ci_matrix_compiles_for_sm90_without_spills_and_matches_the_table():
    """Every variant of the CI matrix compiles for sm_90 with Triton's ptxas, without
    register spills and within 227 KiB of shared memory, and its registers, spills,
    shared memory and mma kind are the committed table's (benchmarks/triton_sm90.tsv)."""
    done = _aot("--arch", "90", "--matrix", "ci", "--check", "--table", str(TABLE), timeout=1500)
    failing = [line for line in done.stdout.splitlines()
               if line.startswith(("ERROR", "CHECK", "compiled", "attention forward"))
               or line.count("\t") >= 7 and not line.endswith(("\tok", "\tcheck"))
               and "allowed spill" not in line]
    print("\n".join(failing))
    assert done.returncode == 0, "\n".join(failing) + "\n" + done.stderr[-4000:]


def test_standin_cuda_tensors():
    """Stand-ins say cuda, hold no data, carry the values of index tensors through torch
    ops (what the ops' host-side checks read) and refuse host reads of anything else."""
    with standin_cuda(90) as gpu:
        q = torch.empty(2, 4, 37, 64, dtype=torch.float16, device="cuda")
        assert q.device == torch.device("cuda", 0) and q.is_cuda and q.new_empty(3).device.type == "cuda"
        assert torch.cuda.get_device_properties(0).multi_processor_count == gpu.multi_processor_count == 132
        assert q[:, :, 1:].data_ptr() == 64 * 2  # storage offset in bytes: unaligned to 16, as on a GPU
        seqlens = index_tensor([2, 300, 4097])
        assert seqlens.tolist() == [2, 300, 4097] and int(seqlens.max()) == 4097
        table = index_tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
        pages = (seqlens.long() + 2047) // 2048
        used = table[torch.arange(3, device=q.device)[None, :] < pages[:, None]]
        assert used.tolist() == [0, 3, 6, 7, 8] and used.device.type == "cuda"
        with pytest.raises(HostReadError, match="values are unknown"):
            q.sum().item()
    assert not torch.empty(1).is_meta  # the context is gone


def test_case_matrices_name_each_case_once_and_smoke_covers_every_op():
    for name in _aot_cases.MATRICES:
        names = [str(c) for c in _aot_cases.matrix(name)]
        assert len(names) == len(set(names)), f"matrix {name} repeats a case"
    smoke = {(c.op, c.dtype) for c in _aot_cases.matrix("smoke")}
    for op in set(_aot_cases.OPS) - {"sdpa"}:
        assert {(op, "float16"), (op, "bfloat16")} <= smoke, op
    with pytest.raises(ValueError, match="matrix must be one of"):
        _aot_cases.matrix("nope")


def test_only_the_named_spill_is_allowed():
    """ALLOWED_SPILLS excuses fp32 dK/dV at head-dim bucket 256 and nothing else: the same
    spill in 16-bit, in another kernel or at another head dim fails the check."""
    from types import SimpleNamespace

    from fastattn.kernels import aot

    spilled = {"spill_stores": 700, "spill_loads": 600, "smem": 66560}

    def variant(kernel, dtype, block_d):
        name = f"{kernel} {dtype} w8 s1 D={block_d} DV={block_d} BLOCK_D={block_d} BLOCK_DV={block_d}"
        return SimpleNamespace(kernel=kernel, dtype=dtype, name=name)

    assert aot.failures(spilled, 90, variant("attention_bwd_dkdv", "fp32", 256)) == []
    for other in (variant("attention_bwd_dkdv", "bf16", 256), variant("attention_bwd_dkdv", "fp32", 128),
                  variant("attention_bwd_dq", "fp32", 256)):
        assert aot.failures(spilled, 90, other) == ["spills 700 B stores / 600 B loads"], other.name
    assert aot.failures(dict(spilled, smem=300000), 90, variant("attention_bwd_dkdv", "fp32", 256)) == [
        "shared memory 300000 B > 232448 B"]
