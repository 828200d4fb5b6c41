"""fastattn.decode_attention on the Triton backend (split-KV flash-decoding).

Each call is checked against the float64 reference (FlashAttention's rule, helpers.py),
output and lse: ragged cache lengths (1, page boundaries, lengths that are not a
multiple of the page size), contiguous and paged caches (page sizes 16, 24, 5, pages in
random order), GQA 1:1, 4:1, 8:1, q_len 1..16, the options (window, softcap, ALiBi,
scale), the number of splits (one split, more splits than tiles), any strides, the
in-place append of new keys/values, opcheck, torch.compile, and the Triton path's
refusals and pinned configs. Bad input shared by every backend is in test_api.py.

The tests run on the GPU where there is one (the kernels compiled, a pinned config unless
a test autotunes), else on CPU in the interpreter (fp32 and fp16; bf16 tl.dot is broken
there); the `gpu` tests add bf16/fp16 over long caches with the autotuned kernel.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import backends, reference
from fastattn._validate import DEBUG_ENV
from fastattn.ops import decode_attention as decode_op
from helpers import (
    DEVICE, R, U, all_residues, assert_within_naive_error, every_residue_once, forward_is_reference, huge_strided,
    requires_triton,
)

CONFIG_ENV = "FASTATTN_DECODE_ATTENTION_CONFIG"
# Every test here runs the Triton kernels: skipped where Triton is missing, failed under CI=true.
pytestmark = requires_triton
# On a GPU, tests that do not autotune on purpose use this config (no tuning per case).
GPU_TEST_CONFIG = "BLOCK_N=32,num_warps=4,num_stages=2"
ON_GPU = DEVICE.type == "cuda" and not backends.triton_interpreter_on()


def _pin(monkeypatch, config: str = "") -> None:
    """Pin `config` (plus GPU_TEST_CONFIG on a GPU) in FASTATTN_DECODE_ATTENTION_CONFIG."""
    value = ",".join(part for part in (GPU_TEST_CONFIG if ON_GPU else "", config) if part)
    if value:
        monkeypatch.setenv(CONFIG_ENV, value)


@pytest.fixture(autouse=True)
def _pinned_config_on_gpu(monkeypatch):
    _pin(monkeypatch)


def _caches(batch, kv_heads, capacity, head_dim, page_size=None, head_dim_v=None, device=DEVICE, spare_pages=3):
    """(k_cache, v_cache, block_table): contiguous (batch, kv_heads, capacity, d) when
    page_size is None, else pages in random order with a few unused ones."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    if page_size is None:
        return (torch.randn(batch, kv_heads, capacity, head_dim, device=device),
                torch.randn(batch, kv_heads, capacity, head_dim_v, device=device), None)
    pages = -(-capacity // page_size)
    num_pages = batch * pages + spare_pages
    table = torch.randperm(num_pages, device=device)[: batch * pages].reshape(batch, pages).to(torch.int32)
    return (torch.randn(num_pages, kv_heads, page_size, head_dim, device=device),
            torch.randn(num_pages, kv_heads, page_size, head_dim_v, device=device), table)


def _seqlens(values, device=DEVICE):
    return torch.tensor(values, dtype=torch.int32, device=device)


def check_decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, dtype=torch.float32, **options):
    """fastattn.decode_attention(backend='triton') against the float64 reference, out and lse."""
    def reference_fn(cast):
        slopes = options.get("alibi_slopes")
        ref_options = dict(options, alibi_slopes=None if slopes is None else slopes.to(cast))
        return reference.decode_attention(q.to(cast), k_cache.to(cast), v_cache.to(cast), cache_seqlens,
                                          block_table=block_table, return_lse=True, **ref_options)

    ref_out, ref_lse = reference_fn(torch.float64)
    naive_out, naive_lse = reference_fn(dtype)
    out, lse = fastattn.decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens,
                                         block_table=block_table, return_lse=True, backend="triton", **options)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_within_naive_error(out, naive_out, ref_out, what="out")
    assert torch.isfinite(lse).all()
    assert_within_naive_error(lse, naive_lse.float(), ref_lse, atol=1e-5, what="lse")
    return out, lse


# ----------------------------------------------------------------------------- caches, GQA, dtypes

# (batch, heads, kv_heads, q_len, head_dim, capacity, page_size or None, cache_seqlens)
CASES = {
    "mha-contiguous": (3, 2, 2, 1, 40, 70, None, [1, 70, 33]),
    "gqa4-paged16": (3, 4, 1, 1, 32, 64, 16, [1, 16, 49]),
    "gqa8-paged24": (2, 8, 1, 2, 24, 72, 24, [2, 71]),
    "gqa4-qlen3-contiguous": (2, 8, 2, 3, 64, 45, None, [3, 45]),
    "mha-qlen5-paged5": (2, 2, 2, 5, 16, 33, 5, [7, 33]),       # a page smaller than a key tile
    "gqa8-qlen16-rowblocks": (1, 8, 1, 16, 16, 20, None, [20]),   # 128 query rows: two programs per kv head
}
FP16_CASES = ("gqa8-paged24", "mha-contiguous")


def _case_params():
    params = [pytest.param(name, torch.float32, id=f"{name}-fp32") for name in CASES]
    params += [pytest.param(name, torch.float16, id=f"{name}-fp16") for name in FP16_CASES]
    return params


@pytest.mark.parametrize("name,dtype", _case_params())
def test_caches_gqa_and_lengths(name, dtype):
    batch, heads, kv_heads, q_len, head_dim, capacity, page_size, seqlens = CASES[name]
    k_cache, v_cache, table = _caches(batch, kv_heads, capacity, head_dim, page_size)
    q = R(batch, heads, q_len, head_dim)
    check_decode(q, k_cache, v_cache, _seqlens(seqlens), block_table=table, dtype=dtype)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_number_of_splits(splits, monkeypatch):
    """One split (the first kernel writes the output), several, and more splits than a
    sequence has tiles (empty splits: lse -inf partials) give the same result."""
    _pin(monkeypatch, f"NUM_SPLITS={splits}")
    k_cache, v_cache, table = _caches(2, 1, 80, 32, page_size=16)
    q = R(2, 4, 2, 32)
    check_decode(q, k_cache, v_cache, _seqlens([2, 75]), block_table=table)


@pytest.mark.parametrize("option", ["window", "softcap-alibi-batch", "alibi-heads-scale-window0"])
def test_options(option, monkeypatch):
    _pin(monkeypatch, "NUM_SPLITS=2")
    batch, heads, kv_heads, q_len = 2, 4, 2, 3
    options = {
        "window": dict(window_size=(17, -1)),
        "softcap-alibi-batch": dict(softcap=2.5, alibi_slopes=U(batch, heads)),
        "alibi-heads-scale-window0": dict(alibi_slopes=U(heads), scale=0.3, window_size=(0, 0)),
    }[option]
    k_cache, v_cache, table = _caches(batch, kv_heads, 70, 32, page_size=16 if option == "window" else None)
    q = R(batch, heads, q_len, 32)
    check_decode(q, k_cache, v_cache, _seqlens([5, 66]), block_table=table, **options)


def test_head_dim_v_differs():
    k_cache, v_cache, table = _caches(2, 1, 40, 32, page_size=16, head_dim_v=24)
    check_decode(R(2, 2, 1, 32), k_cache, v_cache, _seqlens([17, 40]), block_table=table)


def test_any_strides_without_copies():
    """q and the caches as transposed (b, s, h, d) / (pages, page_size, h, d) views and a
    sliced head_dim give bitwise what contiguous tensors give."""
    q_bshd = R(2, 3, 2, 16)
    k_wide = R(6, 16, 1, 32)  # (pages, page_size, hk, 2d)
    v_bshd = R(6, 16, 1, 16)
    q, k_cache, v_cache = q_bshd.transpose(1, 2), k_wide.transpose(1, 2)[..., ::2], v_bshd.transpose(1, 2)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32, device=DEVICE)
    seqlens = _seqlens([3, 41])
    got = fastattn.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, return_lse=True,
                                    backend="triton")
    expected = fastattn.decode_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), seqlens,
                                         block_table=table, return_lse=True, backend="triton")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    check_decode(q, k_cache, v_cache, seqlens, block_table=table)  # the strided views against the reference


# ----------------------------------------------------------------------------- in-place append


@pytest.mark.parametrize("backend", ["triton", "naive"])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
def test_append_new_kv_in_place(backend, page_size):
    """k_new/v_new land at positions cache_seqlens - q_len .. cache_seqlens - 1, nothing
    else changes, and the output is that of the updated cache."""
    batch, heads, kv_heads, q_len, d = 2, 4, 2, 3, 16
    k_cache, v_cache, table = _caches(batch, kv_heads, 48, d, page_size)
    seqlens = _seqlens([3, 35])
    q = R(batch, heads, q_len, d)
    k_new, v_new = R(batch, kv_heads, q_len, d), R(batch, kv_heads, q_len, d)
    expected_k, expected_v = _appended(k_cache, v_cache, k_new, v_new, seqlens, table)
    out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new, v_new=v_new,
                                    backend=backend)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    if not forward_is_reference(backend):  # the naive output is the reference on the cache just checked
        reference_out = reference.decode_attention(q.double(), expected_k.double(), expected_v.double(), seqlens,
                                                   block_table=table)
        torch.testing.assert_close(out.double(), reference_out, atol=1e-5, rtol=1e-5)


def _appended(k_cache, v_cache, k_new, v_new, seqlens, block_table):
    """Copies of the caches with k_new/v_new written at positions cache_seqlens - q_len ..
    cache_seqlens - 1, position by position (independently of the kernels' append)."""
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q_len = k_new.shape[2]
    for b, length in enumerate(seqlens.tolist()):
        for t in range(q_len):
            pos = length - q_len + t
            if block_table is None:
                expected_k[b, :, pos], expected_v[b, :, pos] = k_new[b, :, t], v_new[b, :, t]
            else:
                page_size = k_cache.shape[2]
                page = block_table[b, pos // page_size]
                expected_k[page, :, pos % page_size] = k_new[b, :, t]
                expected_v[page, :, pos % page_size] = v_new[b, :, t]
    return expected_k, expected_v


@pytest.mark.parametrize("bad,error,match", [
    (lambda k, v: dict(k_new=k), ValueError, "k_new and v_new must be given together"),
    (lambda k, v: dict(k_new=k[:, :, :1], v_new=v), ValueError,
     r"k_new must have shape \(batch, kv_heads, q_len, head_dim\) = \(2, 2, 3, 16\)"),
    (lambda k, v: dict(k_new=k, v_new=v.double()), TypeError, "v_new has dtype float64"),
    (lambda k, v: dict(k_new=k, v_new=v[..., :8]), ValueError, r"v_new must have shape"),
], ids=["only-k", "k-shape", "v-dtype", "v-head-dim"])
def test_append_bad_input_leaves_the_cache_untouched(bad, error, match):
    k_cache, v_cache, _ = _caches(2, 2, 48, 16)
    before = (k_cache.clone(), v_cache.clone())
    k_new, v_new = R(2, 2, 3, 16), R(2, 2, 3, 16)
    with pytest.raises(error, match=match):
        fastattn.decode_attention(R(2, 4, 3, 16), k_cache, v_cache, _seqlens([3, 30]), backend="triton",
                                  **bad(k_new, v_new))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ----------------------------------------------------------------------------- registered ops, compile


def test_opcheck_with_every_option(monkeypatch):
    _pin(monkeypatch, "NUM_SPLITS=2")
    k_cache, v_cache, table = _caches(2, 1, 32, 16, page_size=16)
    q = R(2, 2, 2, 16)
    seqlens = _seqlens([2, 27])
    slopes = U(2, 2)
    args = (q, k_cache, v_cache, seqlens, table, slopes, 0.3, 20, 3.0, "triton")
    torch.library.opcheck(torch.ops.fastattn.decode_attention_fwd.default, args)
    check_decode(q, k_cache, v_cache, seqlens, block_table=table, alibi_slopes=slopes, scale=0.3,
                 window_size=(20, -1), softcap=3.0)
    append_args = (R(2, 1, 2, 16), R(2, 1, 2, 16), k_cache, v_cache, seqlens, table, "triton")
    torch.library.opcheck(torch.ops.fastattn.decode_attention_append.default, append_args)


def test_compile_fullgraph_with_append_and_lse():
    torch._dynamo.reset()
    k_cache, v_cache, table = _caches(2, 2, 40, 16, page_size=16)
    q = R(2, 4, 1, 16)
    seqlens = _seqlens([1, 30])
    k_new, v_new = R(2, 2, 1, 16), R(2, 2, 1, 16)

    def step(k_cache_, v_cache_):
        out, lse = fastattn.decode_attention(q, k_cache_, v_cache_, seqlens, block_table=table, k_new=k_new,
                                             v_new=v_new, softcap=5.0, return_lse=True, backend="triton")
        return out, lse

    eager_caches = (k_cache.clone(), v_cache.clone())
    expected = step(*eager_caches)
    compiled_caches = (k_cache.clone(), v_cache.clone())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_caches)
    torch.testing.assert_close(got, expected)
    assert torch.equal(compiled_caches[0], eager_caches[0]) and torch.equal(compiled_caches[1], eager_caches[1])
    appended = _appended(k_cache, v_cache, k_new, v_new, seqlens, table)
    assert torch.equal(eager_caches[0], appended[0]) and torch.equal(eager_caches[1], appended[1])
    check_decode(q, *eager_caches, seqlens, block_table=table, softcap=5.0)


# ----------------------------------------------------------------------------- refusals and configs


def test_triton_refuses_what_it_cannot_serve():
    k_cache, v_cache, _ = _caches(1, 1, 8, 264)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot serve .*head_dim up to 256, got 264"):
        fastattn.decode_attention(R(1, 2, 1, 264), k_cache, v_cache, _seqlens([4]), backend="triton")
    k_cache, v_cache, _ = _caches(1, 1, 8, 16)
    q = R(1, 2, 1, 16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got float64"):
        fastattn.decode_attention(q.double(), k_cache.double(), v_cache.double(), _seqlens([4]), backend="triton")
    assert fastattn.decode_attention(q.double(), k_cache.double(), v_cache.double(), _seqlens([4])).dtype == \
        torch.float64  # auto still serves it


def test_bad_pinned_config_is_refused(monkeypatch):
    k_cache, v_cache, _ = _caches(1, 1, 8, 16)
    q = R(1, 2, 1, 16)
    for value, match in (("BLOCK_N=24", "BLOCK_N must be a power of 2"), ("NUM_SPLITS=1000", "NUM_SPLITS must be <="),
                         ("BLOCK_M=16", "must be comma-separated")):
        monkeypatch.setenv(CONFIG_ENV, value)
        with pytest.raises(ValueError, match=match):
            fastattn.decode_attention(q, k_cache, v_cache, _seqlens([4]), backend="triton")


def test_split_heuristic_and_autotune_space():
    from fastattn.kernels import _config

    # few programs and a long cache: many splits, capped; many programs: one split
    assert _config.decode_attention_num_splits(programs=8, keys=131072, sm_count=132) == 66
    assert _config.decode_attention_num_splits(programs=1, keys=1 << 20, sm_count=132) == \
        _config.DECODE_ATTENTION_MAX_SPLITS
    assert _config.decode_attention_num_splits(programs=64 * 8, keys=131072, sm_count=132) == 2
    assert _config.decode_attention_num_splits(programs=4, keys=20, sm_count=132) == 1
    assert _config.decode_attention_block_m(8) == 16 and _config.decode_attention_block_m(128) == 64
    space = _config.decode_attention_configs()
    sizes = {}
    for block_m, head_dim, dtype in ((16, 64, torch.float16), (16, 128, torch.bfloat16), (64, 256, torch.float32)):
        kept = _config.decode_attention_prune(space, {}, Q=torch.empty(0, dtype=dtype), BLOCK_M=block_m,
                                              BLOCK_D=head_dim, BLOCK_DV=head_dim, split_keys_bucket=4096)
        sizes[head_dim] = len(kept)
        assert 1 <= len(kept) <= len(space)
        assert all(_config.decode_attention_keep(block_m, c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                                                 head_dim, head_dim, dtype.itemsize) for c in kept)
    assert sizes[256] < sizes[128] <= sizes[64]
    short = _config.decode_attention_prune(space, {}, Q=torch.empty(0, dtype=torch.float16), BLOCK_M=16, BLOCK_D=64,
                                           BLOCK_DV=64, split_keys_bucket=32)
    assert {c.kwargs["BLOCK_N"] for c in short} == {32}


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [  # (batch, heads, kv_heads, q_len, head_dim, capacity, page_size)
    (1, 32, 4, 1, 128, 16384, None),
    (4, 32, 4, 1, 128, 4096, 256),
    (8, 8, 8, 1, 64, 2048, None),
    (2, 32, 4, 4, 128, 8192, 16),
    (3, 16, 2, 16, 128, 3000, 48),
    (16, 32, 1, 1, 256, 1024, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "x".join(map(str, s[:6])) + f"-page{s[6]}")
def test_gpu_autotuned(dtype, shape, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    batch, heads, kv_heads, q_len, head_dim, capacity, page_size = shape
    k_cache, v_cache, table = _caches(batch, kv_heads, capacity, head_dim, page_size, device="cuda")
    lengths = torch.randint(q_len, capacity + 1, (batch,)).tolist()
    lengths[0] = capacity
    q = torch.randn(batch, heads, q_len, head_dim, device="cuda")
    check_decode(q, k_cache, v_cache, _seqlens(lengths, "cuda"), block_table=table, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_options_and_append(dtype):
    k_cache, v_cache, table = _caches(4, 4, 5000, 128, 256, device="cuda")
    q = torch.randn(4, 32, 2, 128, device="cuda")
    seqlens = _seqlens([2, 300, 4097, 5000], "cuda")
    check_decode(q, k_cache, v_cache, seqlens, block_table=table, dtype=dtype, window_size=(1000, -1),
                 softcap=30.0, alibi_slopes=torch.rand(4, 32, device="cuda"))
    k_new, v_new = (torch.randn(4, 4, 2, 128, device="cuda", dtype=dtype) for _ in range(2))
    k_c, v_c = k_cache.to(dtype), v_cache.to(dtype)
    expected_k, expected_v = _appended(k_c, v_c, k_new, v_new, seqlens, table)  # before the op writes k_c, v_c
    out = fastattn.decode_attention(q.to(dtype), k_c, v_c, seqlens, block_table=table, k_new=k_new, v_new=v_new,
                                    backend="triton")
    assert torch.equal(k_c, expected_k) and torch.equal(v_c, expected_v)
    ref_out = reference.decode_attention(q.double(), expected_k.double(), expected_v.double(), seqlens,
                                         block_table=table)
    naive_out = reference.decode_attention(q.to(dtype), expected_k, expected_v, seqlens, block_table=table)
    assert_within_naive_error(out, naive_out, ref_out, what="out after the append")


# ----------------------------------------------------------------------------- tile edges

# The split-KV kernel cuts each sequence's keys into NUM_SPLITS ranges of whole BLOCK_N
# tiles and runs the tiles every query sees whole without the mask: bounds computed from
# L - q_len, L - 1 - window_left (L = cache_seqlens) modulo BLOCK_N and from the tile count
# modulo NUM_SPLITS (kernels/decode.py). Each case is one call with one sequence per value
# of L - q_len: with one split every residue of pinned 16-key tiles in two periods; with
# several (a launch costs NUM_SPLITS times more) every residue once, over 1 to 3 tiles, so
# the tile count also takes every residue modulo the splits.
EDGE_BLOCK = 16
EDGE_CASES = {  # name: (q_len, NUM_SPLITS, window_size, page_size or None, values of L - q_len)
    "qlen3-one-split": (3, 1, (-1, -1), None, all_residues(EDGE_BLOCK)),
    "qlen1-three-splits": (1, 3, (-1, -1), None, every_residue_once(EDGE_BLOCK)),
    "qlen2-two-splits-window-20-paged5": (2, 2, (20, -1), 5, every_residue_once(EDGE_BLOCK)),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_tile_edges_every_residue(case, monkeypatch):
    q_len, splits, window, page_size, offsets = EDGE_CASES[case]
    _pin(monkeypatch, f"BLOCK_N={EDGE_BLOCK},NUM_SPLITS={splits}")
    lengths = [q_len + offset for offset in offsets]
    k_cache, v_cache, table = _caches(len(lengths), 1, max(lengths), 16, page_size)
    q = R(len(lengths), 2, q_len, 16)
    check_decode(q, k_cache, v_cache, _seqlens(lengths), block_table=table, window_size=window)


# ----------------------------------------------------------------------------- no host reads


def _forbid_host_reads(monkeypatch):
    """Make every way of reading a tensor's value on the host raise."""
    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"decode read a tensor value on the host (Tensor.{name})")
        return read

    for name in ("item", "tolist", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


@pytest.mark.parametrize("page_size,splits", [(None, 1), (16, 3), (5, 2)], ids=["contiguous", "paged16", "paged5"])
def test_triton_path_never_reads_the_device(page_size, splits, monkeypatch):
    """The whole Triton call, the in-place append included, runs with Tensor.item,
    tolist, __int__ and __bool__ raising: no value goes to the host, so a decoding step
    never waits for the GPU and can be captured in a CUDA graph."""
    _pin(monkeypatch, f"NUM_SPLITS={splits}")
    batch, heads, kv_heads, q_len, d = 2, 4, 2, 2, 16
    k_cache, v_cache, table = _caches(batch, kv_heads, 48, d, page_size)
    q = R(batch, heads, q_len, d)
    k_new, v_new = R(batch, kv_heads, q_len, d), R(batch, kv_heads, q_len, d)
    seqlens = _seqlens([2, 37])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    decode_op._torch_append(k_new, v_new, expected_k, expected_v, seqlens, table)
    expected = reference.decode_attention(q.double(), expected_k.double(), expected_v.double(), seqlens,
                                          block_table=table, return_lse=True)
    with monkeypatch.context() as patched:
        _forbid_host_reads(patched)
        out, lse = fastattn.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new,
                                             v_new=v_new, return_lse=True, backend="triton")
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    torch.testing.assert_close(out.double(), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected[1].double(), atol=1e-5, rtol=1e-5)


def test_debug_checks_read_the_values(monkeypatch):
    """FASTATTN_DEBUG=1 checks cache_seqlens and block_table on the host, before any
    launch (these reads are exactly what the default path must not do)."""
    k_cache, v_cache, table = _caches(2, 1, 32, 16, page_size=16)
    q = R(2, 2, 1, 16)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[q_len, capacity\] = \[1, 32\]"):
        fastattn.decode_attention(q, k_cache, v_cache, _seqlens([3, 33]), block_table=table, backend="triton")
    with monkeypatch.context() as patched:
        _forbid_host_reads(patched)
        with pytest.raises(AssertionError, match="host"):
            fastattn.decode_attention(q, k_cache, v_cache, _seqlens([3, 30]), block_table=table, backend="triton")
    monkeypatch.setenv(DEBUG_ENV, "yes")
    with pytest.raises(ValueError, match="FASTATTN_DEBUG must be 0 or 1"):
        fastattn.decode_attention(q, k_cache, v_cache, _seqlens([3, 30]), block_table=table, backend="triton")


@pytest.mark.parametrize("bad", ["length-beyond-capacity", "length-below-q_len", "page-out-of-range"])
def test_bad_values_are_clamped_and_flagged(bad, monkeypatch):
    """Without FASTATTN_DEBUG the kernels keep every access inside the caches on bad
    cache_seqlens / block_table values: the append writes nothing for that sequence, the
    output stays finite, the good sequence is right, and check_flagged_inputs() raises
    (once: it clears the flags)."""
    from fastattn.kernels import decode as kernels

    _pin(monkeypatch, "NUM_SPLITS=2")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    kernels.error_flags(DEVICE).zero_()
    batch, heads, kv_heads, q_len, d, page_size = 2, 2, 1, 2, 16, 16
    k_cache, v_cache, table = _caches(batch, kv_heads, 32, d, page_size, spare_pages=0)
    lengths = {"length-beyond-capacity": [40, 20], "length-below-q_len": [1, 20],
               "page-out-of-range": [30, 20]}[bad]
    if bad == "page-out-of-range":
        table[0, 1] = k_cache.shape[0] + 7
    seqlens = _seqlens(lengths)
    q, k_new, v_new = R(batch, heads, q_len, d), R(batch, kv_heads, q_len, d), R(batch, kv_heads, q_len, d)
    before = (k_cache.clone(), v_cache.clone())
    out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new, v_new=v_new,
                                    backend="triton")
    assert torch.isfinite(out).all()
    good = slice(1, 2)  # sequence 1 is valid: its rows landed and its output is right
    expected_k, expected_v = before[0].clone(), before[1].clone()
    decode_op._torch_append(k_new[good], v_new[good], expected_k, expected_v, seqlens[good], table[good])
    expected = reference.decode_attention(q[good].double(), expected_k.double(), expected_v.double(), seqlens[good],
                                          block_table=table[good])
    torch.testing.assert_close(out[good].double(), expected, atol=1e-5, rtol=1e-5)
    pages_of_0 = table[0][(table[0] >= 0) & (table[0] < k_cache.shape[0])].long()
    assert torch.equal(k_cache[pages_of_0], before[0][pages_of_0])  # nothing written for sequence 0
    with pytest.raises(ValueError, match="page" if bad == "page-out-of-range" else "cache_seqlens"):
        decode_op.check_flagged_inputs(DEVICE)
    decode_op.check_flagged_inputs(DEVICE)  # cleared


@pytest.mark.parametrize("page_size", [1, 2, 32, 3, 12])
def test_page_sizes_powers_of_two_and_not(page_size, monkeypatch):
    """Power-of-two page sizes take the shift-and-mask look-up, the others the division:
    both give the float64 reference's result."""
    _pin(monkeypatch, "NUM_SPLITS=2")
    k_cache, v_cache, table = _caches(2, 1, 40, 16, page_size)
    check_decode(R(2, 2, 2, 16), k_cache, v_cache, _seqlens([2, 37]), block_table=table)


def test_cache_offsets_past_2_to_the_31():
    """Page and sequence offsets past 2³¹ elements (a page stride of 2²⁶ + 16 times page
    index 40, a sequence stride above 2³¹) stay exact: the row offsets are int64."""
    d, page_size, page_stride = 16, 16, (1 << 26) + 16
    pages = 41
    k_cache = huge_strided((pages, 1, page_size, d), (page_stride, page_size * d, d, 1))
    v_cache = huge_strided((pages, 1, page_size, d), (page_stride, page_size * d, d, 1))
    table = torch.tensor([[40, 3, 39], [0, 38, 1]], dtype=torch.int32, device=DEVICE)
    q = R(2, 2, 1, d).half()
    check_decode(q, k_cache, v_cache, _seqlens([45, 20]), block_table=table, dtype=torch.float16)
    del k_cache, v_cache
    seq_stride = (1 << 31) + 64
    k_cache = huge_strided((2, 1, 40, d), (seq_stride, 40 * d, d, 1))
    v_cache = huge_strided((2, 1, 40, d), (seq_stride, 40 * d, d, 1))
    check_decode(q, k_cache, v_cache, _seqlens([5, 40]), dtype=torch.float16)


def test_head_dim_strides_past_2_to_the_31():
    """A k_cache whose head dim is its outermost stride (a transposed view, 2^27 + 2^26
    elements between neighbouring channels, so channel 15 lies past 2^31) is read at the
    right places: the head-dim offsets are int64 too."""
    d, capacity, channel_stride = 16, 8, (1 << 27) + (1 << 26)
    k_cache = huge_strided((1, 1, capacity, d), (capacity, capacity, 1, channel_stride))
    v_cache = R(1, 1, capacity, d).half()
    check_decode(R(1, 2, 1, d).half(), k_cache, v_cache, _seqlens([7]), dtype=torch.float16)


def test_default_configs_one_per_key(monkeypatch):
    """Without FASTATTN_AUTOTUNE every launch gets the one default of its (GPU family,
    operand dtype, head-dim bucket, rows) key, within its GPU's shared memory (sm_86's
    99 KB too); the split count comes from the shapes and capacity alone;
    FASTATTN_AUTOTUNE=1 hands the launch to the autotuner (8 configs at most); pinned keys
    override the default."""
    from fastattn.kernels import _config

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(_config, "interpreted", lambda: False)
    device = torch.device("cpu")  # a stand-in: FASTATTN_TRITON_ARCH names the GPU
    assert len(_config.decode_attention_configs()) <= 8
    for arch in (80, 86, 90):
        monkeypatch.setenv(_config.TARGET_ARCH_ENV, str(arch))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for head_dim in (64, 80, 128, 256):
                block_d = max(16, 1 << (head_dim - 1).bit_length())
                for rows in (1, 8, 32, 128):
                    block_m = _config.decode_attention_block_m(rows, dtype.itemsize, block_d)
                    splits, config = _config.decode_attention_launch_config(device, dtype, block_m, block_d, block_d,
                                                                            programs=8, keys=8192, sm_count=132)
                    assert splits == _config.decode_attention_num_splits(8, 8192, 132)
                    assert config == _config.decode_attention_default(arch, dtype, block_m, block_d, block_d)
                    assert config["BLOCK_N"] >= 16 and config["num_stages"] >= 1
                    staged = _config.decode_attention_shared_memory(block_m, config["BLOCK_N"], config["num_stages"],
                                                                    block_d, block_d, dtype.itemsize)
                    assert staged <= _config.shared_memory_per_block(arch)
    monkeypatch.setenv(_config.AUTOTUNE_ENV, "1")
    assert _config.decode_attention_launch_config(device, torch.bfloat16, 16, 128, 128, 8, 8192, 132)[1] is None
    monkeypatch.setenv(CONFIG_ENV, "num_warps=8,NUM_SPLITS=3")
    splits, config = _config.decode_attention_launch_config(device, torch.bfloat16, 16, 128, 128, 8, 8192, 132)
    assert splits == 3 and config == dict(_config.decode_attention_default(90, torch.bfloat16, 16, 128, 128),
                                          num_warps=8)


def test_softcap_takes_tanh_approx_only_for_16_bit_on_a_gpu(monkeypatch):
    """Decode picks softcap's tanh as the attention kernels do (kernels.attention.fast_softcap_tanh):
    fp32 keeps the fp32-exact tanh everywhere, 16-bit inputs too in the interpreter."""
    from fastattn.kernels import decode as kernels
    from triton_launches import record_launches

    recorder = record_launches(monkeypatch, kernels, "_decode_attention_fwd_kernel")
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    k_cache, v_cache, _ = _caches(2, 2, 24, 16)
    seqlens = _seqlens([5, 24])
    for dtype in (torch.float32, torch.float16):
        fastattn.decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), seqlens, softcap=3.0,
                                  backend="triton")
    fast = [kwargs["FAST_TANH"] for _, kwargs in recorder.launches]
    assert fast == [False, not backends.triton_interpreter_on()]


def test_strided_cache_seqlens_read_like_contiguous_ones():
    """A cache_seqlens view with a stride gives what a contiguous one gives (the kernels
    read entry b at offset b, so the op hands them a contiguous tensor)."""
    q = R(3, 4, 1, 16)
    k_cache, v_cache, _ = _caches(3, 2, 40, 16)
    seqlens = _seqlens([5, 40, 17])
    spread = torch.stack([seqlens, torch.full_like(seqlens, 1000)], 1).reshape(-1)[::2]  # stride 2
    assert spread.stride() == (2,) and torch.equal(spread, seqlens)
    expected = fastattn.decode_attention(q, k_cache, v_cache, seqlens, backend="triton")
    assert torch.equal(fastattn.decode_attention(q, k_cache, v_cache, spread, backend="triton"), expected)
