"""The benchmark harness (fastattn.bench) on CPU: FLOP/byte counting against
hand-computed values, the fp32 references' chunking, a quick CPU run writing the
JSON Lines file, the Markdown table and the plot, a wrong provider reported as failed
(and not timed), and the README section rendered from a results file."""

import json
import math

import pytest
import torch

from fastattn import reference
from fastattn.bench import counting, report, results, timing
from fastattn.bench.cli import main as bench_main
from fastattn.bench.harness import OpRunner, RunConfig, _sticky_cuda_error, classify, rotation_count
from fastattn.bench.reference import RowChunkedReference, StoredReference, max_abs_error
from fastattn.bench.run import expand_ops, run_benchmarks
from fastattn.bench.spec import Provider, Skip
from fastattn.bench.specs import attention as attention_spec
from fastattn.bench.specs import norms as norms_spec
from fastattn.bench.specs import get_spec
from helpers import require

TARGETS_KEYS = {"op", "mode", "provider", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "fraction_of_ceiling",
                "max_abs_err_vs_fp32", "device", "torch", "triton", "cuda", "git_commit", "date"}
SHAPE_KEYS = {
    "attention": {"batch", "heads", "kv_heads", "seqlen_q", "seqlen_k", "head_dim", "causal"},
    "decode_attention": {"batch", "heads", "kv_heads", "q_len", "cache_len", "head_dim", "page_size"},
    "layer_norm": {"rows", "hidden", "residual"},
    "rms_norm": {"rows", "hidden", "residual"},
    "ffn": {"tokens", "d_model", "d_hidden", "activation"},
    "gated_ffn": {"tokens", "d_model", "d_hidden", "activation"},
}


# ----------------------------------------------------------------------------- counting


def test_attention_flops_by_hand():
    shape = dict(batch=2, heads=3, seqlen_q=5, seqlen_k=5, head_dim=7, causal=False)
    assert counting.attention_flops(shape, "fwd") == 4 * 2 * 3 * 5 * 5 * 7 == 4200
    assert counting.attention_flops(shape, "bwd") == 10500
    assert counting.attention_flops(shape, "full") == 14700
    causal = dict(shape, causal=True)
    assert counting.attention_flops(causal, "fwd") == 2100
    assert counting.attention_flops(causal, "full") == 7350
    # causal with seqlen_q != seqlen_k is not halved (TARGETS.md)
    assert counting.attention_flops(dict(causal, seqlen_q=4, seqlen_k=6), "fwd") == 4 * 2 * 3 * 4 * 6 * 7


def test_ffn_flops_by_hand():
    shape = dict(tokens=10, d_model=4, d_hidden=16)
    assert counting.ffn_flops(shape, "fwd", gated=False) == 2 * (2 * 10 * 4 * 16) == 2560
    assert counting.ffn_flops(shape, "bwd", gated=False) == 5120
    assert counting.ffn_flops(shape, "full", gated=False) == 7680
    assert counting.ffn_flops(shape, "fwd", gated=True) == 3840
    assert counting.ffn_flops(shape, "full", gated=True) == 11520
    assert counting.work("gated_ffn", shape, "bwd", "bfloat16") == 7680


def test_norm_bytes_by_hand():
    shape = dict(rows=8, hidden=16, residual=False)
    # fp16: x in + y out, weight and bias once
    assert counting.work("layer_norm", shape, "fwd", torch.float16) == 8 * 16 * 2 * 2 + 2 * 16 * 2 == 576
    # x, dy in + dx out, mean and rstd (fp32), weight and bias read and their grads written
    expected = 8 * 16 * 2 * 3 + 8 * 4 * 2 + 2 * 2 * 16 * 2
    assert counting.work("layer_norm", shape, "bwd", torch.float16) == expected == 960
    assert counting.work("layer_norm", shape, "full", torch.float16) == 576 + 960
    # with a residual: residual in and residual out too
    assert counting.work("layer_norm", dict(shape, residual=True), "fwd", torch.float16) == 8 * 16 * 2 * 4 + 64
    # rms norm, fp32: one weight, one stat
    assert counting.work("rms_norm", shape, "fwd", "float32") == 8 * 16 * 4 * 2 + 16 * 4 == 1088
    assert counting.work("rms_norm", shape, "bwd", "float32") == 8 * 16 * 4 * 3 + 8 * 4 + 2 * 16 * 4 == 1696


def test_decode_bytes_by_hand():
    shape = dict(batch=2, heads=32, kv_heads=4, q_len=1, cache_len=100, head_dim=8, page_size=0)
    assert counting.work("decode_attention", shape, "fwd", torch.bfloat16) == 2 * 2 * 4 * 100 * 8 * 2 == 25600
    with pytest.raises(ValueError, match="forward only"):
        counting.work("decode_attention", shape, "bwd", torch.bfloat16)


def test_throughput_and_fraction_of_ceiling():
    assert counting.throughput("attention", 2e12, 1000.0) == ("tflops", pytest.approx(2.0))
    assert counting.throughput("rms_norm", 3e9, 1.0) == ("gbps", pytest.approx(3000.0))
    ceilings = {"matmul_tflops": 800.0, "copy_tbps": 3.0}
    assert counting.fraction_of_ceiling("tflops", 400.0, ceilings) == pytest.approx(0.5)
    assert counting.fraction_of_ceiling("gbps", 2700.0, ceilings) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="mode"):
        counting.attention_flops(dict(batch=1, heads=1, seqlen_q=1, seqlen_k=1, head_dim=1, causal=False), "both")


def test_sweeps_use_the_targets_shape_keys():
    for op, keys in SHAPE_KEYS.items():
        spec = get_spec(op)
        for sweep in ("full", "quick", "cpu", "cpu-quick"):
            shapes = spec.sweep(sweep)
            assert shapes, (op, sweep)
            assert all(set(s) == keys for s in shapes), (op, sweep)
    full = get_spec("attention").sweep("full")
    assert {s["batch"] * s["seqlen_q"] for s in full} == {16384}
    assert {s["heads"] * s["head_dim"] for s in full} == {2048}
    assert {s["seqlen_q"] for s in full} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {s["d_hidden"] for s in get_spec("gated_ffn").sweep("full") if s["d_model"] == 4096} == {11008}


# ----------------------------------------------------------------------------- references and checks


def test_attention_reference_chunks_agree_with_one_pass(monkeypatch):
    spec = get_spec("attention")
    shape = dict(batch=2, heads=6, kv_heads=2, seqlen_q=9, seqlen_k=9, head_dim=8, causal=True)
    inputs = spec.make_inputs(shape, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    dout = torch.randn(spec.output_shape(shape))
    whole = spec.reference(inputs, shape, dout).tensors
    monkeypatch.setattr(attention_spec, "REFERENCE_SCORES_BUDGET", 9 * 9)  # one kv head at a time
    chunked = spec.reference(inputs, shape, dout).tensors
    assert set(chunked) == {"out0", "grad_q", "grad_k", "grad_v"}
    for key in chunked:
        torch.testing.assert_close(chunked[key], whole[key])
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
    out = reference.attention(*leaves, causal=True)
    torch.testing.assert_close(whole["out0"], out.detach())
    expected = torch.autograd.grad(out, leaves, dout)
    for name, grad in zip(("q", "k", "v"), expected):
        torch.testing.assert_close(whole[f"grad_{name}"], grad)


def test_row_chunked_reference_sums_weight_gradients():
    x, residual = torch.randn(10, 6), torch.randn(10, 6)
    weight, bias = torch.randn(6), torch.randn(6)
    dout = torch.randn(10, 6)
    fn = lambda x, weight, bias, residual: reference.layer_norm(x, weight, bias, residual=residual, prenorm=True)
    inputs = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    names = ("x", "weight", "bias", "residual")
    chunked = RowChunkedReference(fn, inputs, ("x", "residual"), 10, 3, dout, names, n_outputs=2)
    outs, grads = chunked.materialize()
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, summed = fn(**leaves)
    expected = dict(zip(names, torch.autograd.grad(y, [leaves[n] for n in names], dout)))
    torch.testing.assert_close(outs[0], y.detach())
    torch.testing.assert_close(outs[1], summed.detach())
    for name in names:
        torch.testing.assert_close(grads[name], expected[name])
    # Comparing chunk by chunk gives what the stored reference gives.
    stored = StoredReference(outs, grads)
    values = {"out0": y.detach() + 0.25, "out1": summed.detach(), "grad_weight": expected["weight"] * 2,
              "grad_x": expected["x"][:5]}
    streamed, kept = chunked.compare(values), stored.compare(values)
    assert set(streamed) == set(kept) == set(values)
    for key in values:
        assert streamed[key] == pytest.approx(kept[key], rel=1e-5), key
    assert streamed["out0"][0] == pytest.approx(0.25) and streamed["out1"][0] == 0.0
    assert streamed["grad_x"][0] == math.inf  # wrong shape


def test_max_abs_error_flags_shape_and_non_finite():
    ref = torch.zeros(4, 3)
    assert max_abs_error(torch.full((4, 3), 0.5), ref) == 0.5
    assert max_abs_error(torch.zeros(3, 4), ref) == math.inf
    bad = torch.zeros(4, 3)
    bad[1, 2] = float("nan")
    assert max_abs_error(bad, ref) == math.inf


def test_sticky_cuda_errors_stop_the_run():
    assert _sticky_cuda_error("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert _sticky_cuda_error("RuntimeError: CUDA error: device-side assert triggered")
    assert not _sticky_cuda_error("RuntimeError: shapes do not match")
    assert not _sticky_cuda_error(None)


def test_classify_and_rotation():
    assert classify(Skip("no kernel")) == ("skipped", "no kernel")
    assert classify(ValueError("backend 'triton' cannot serve this attention call: x"))[0] == "skipped"
    assert classify(RuntimeError("No available kernel. Aborting execution."))[0] == "skipped"
    assert classify(RuntimeError("No viable backend for scaled_dot_product_attention was found."))[0] == "skipped"
    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")) == ("skipped",
                                                                                           "out of memory")
    assert classify(RuntimeError("boom")) == ("error", "RuntimeError: boom")
    assert rotation_count(10**6, torch.device("cpu")) == 1


def _wrong_layer_norm(shape, dtype, device):
    """A deliberately wrong layer norm: right shapes, output off by half its size."""
    def fn(x):
        s = x["x"] if x["residual"] is None else x["x"] + x["residual"]
        y = torch.nn.functional.layer_norm(s, [shape["hidden"]], x["weight"], x["bias"], 1e-5)
        return y * 1.5, s
    return Provider("wrong", fn)


def _raising(shape, dtype, device):
    def fn(x):
        raise RuntimeError("kernel exploded")
    return Provider("raises", fn)


def _skipping(shape, dtype, device):
    raise Skip("needs a feature this case lacks")


@pytest.mark.parametrize("streamed_reference", [False, True])
def test_wrong_provider_is_reported_failed_and_not_timed(monkeypatch, streamed_reference):
    if streamed_reference:  # the reference recomputed chunk by chunk, as for large norms on a GPU
        monkeypatch.setattr(norms_spec, "STORE_LIMIT_BYTES", 0)
        monkeypatch.setattr(norms_spec, "REFERENCE_CHUNK_ELEMENTS", 3 * 256)
    spec = get_spec("layer_norm")
    records = []
    config = RunConfig(device=torch.device("cpu"), dtype=torch.float32, sweep="cpu-quick",
                       providers=["naive", "wrong", "raises", "skips"], max_cases=1, modes=["fwd", "bwd"],
                       timer=timing.CPU_QUICK,
                       extra_providers={"layer_norm": {"wrong": _wrong_layer_norm, "raises": _raising,
                                                       "skips": _skipping}})
    runner = OpRunner(spec, config, records.append)
    case = runner.setup_case(spec.sweep("cpu-quick")[0])
    assert type(case.reference).__name__ == ("RowChunkedReference" if streamed_reference else "StoredReference")
    runner.run()
    outcomes = {(r["mode"], r["provider"]): r["outcome"] for r in records}
    assert len(outcomes) == 8
    for mode in ("fwd", "bwd"):
        assert outcomes[(mode, "naive")].status == "ok"
        assert outcomes[(mode, "naive")].timing is not None
        wrong = outcomes[(mode, "wrong")]
        assert wrong.status == "failed"
        assert wrong.timing is None
        assert "wrong result vs the fp32 reference" in wrong.reason
        assert ("output:" if mode == "fwd" else "dx:") in wrong.reason
        assert outcomes[(mode, "raises")].status == "error"
        assert "kernel exploded" in outcomes[(mode, "raises")].reason
        assert outcomes[(mode, "skips")].status == "skipped"
        assert outcomes[(mode, "skips")].reason == "needs a feature this case lacks"


class _ZeroIncomingGradient(torch.autograd.Function):
    """Identity whose backward overwrites the gradient it receives (as Liger's in-place
    RMSNorm backward does)."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        out = grad.clone()
        grad.zero_()
        return out


def _clobbering_layer_norm(shape, dtype, device):
    def fn(x):
        s = x["x"] if x["residual"] is None else x["x"] + x["residual"]
        y = torch.nn.functional.layer_norm(s, [shape["hidden"]], x["weight"], x["bias"], 1e-5)
        return _ZeroIncomingGradient.apply(y), s
    return Provider("clobbers", fn)


def test_a_backward_that_overwrites_dout_does_not_affect_the_next_provider():
    records = []
    config = RunConfig(device=torch.device("cpu"), dtype=torch.float32, sweep="cpu-quick", max_cases=1,
                       providers=["first", "second"], modes=["bwd", "full"], timer=timing.CPU_QUICK,
                       extra_providers={"layer_norm": {"first": _clobbering_layer_norm,
                                                       "second": _clobbering_layer_norm}})
    OpRunner(get_spec("layer_norm"), config, records.append).run()
    assert [(r["provider"], r["outcome"].status) for r in records] == [
        ("first", "ok"), ("second", "ok"), ("first", "ok"), ("second", "ok")]


# ----------------------------------------------------------------------------- whole runs


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_quick_cpu_run_writes_json_table_and_plot(tmp_path):
    out = run_benchmarks(["layer_norm"], out=tmp_path, device=torch.device("cpu"), quick=True, max_cases=2,
                         progress=False, extra_providers={"layer_norm": {"wrong": _wrong_layer_norm}},
                         log=lambda line: None)
    assert out.directory == tmp_path / "cpu"
    lines = _read(out.jsonl)
    header, rows = lines[0], lines[1:]
    assert header["kind"] == "header"
    assert header["matmul_tflops"] > 0 and header["copy_tbps"] > 0
    assert header["sweep"] == "cpu-quick" and header["dtype"] == "float32"
    assert "GPU numbers need a CUDA GPU" in header["notes"][0]
    providers = list(get_spec("layer_norm").providers) + ["wrong"]
    assert [r["provider"] for r in rows[: len(providers)]] == providers
    assert len(rows) == 2 * 3 * len(providers)  # shapes × modes × providers
    for row in rows:
        assert TARGETS_KEYS <= set(row), set(row) ^ TARGETS_KEYS
        assert "gbps" in row and set(row["shape"]) == SHAPE_KEYS["layer_norm"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"naive", "torch"}
    for row in ok:
        assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        amount = counting.work("layer_norm", row["shape"], row["mode"], "float32")
        assert row["gbps"] == pytest.approx(amount / (row["ms_p50"] * 1e-3) / 1e9)
        assert row["fraction_of_ceiling"] == pytest.approx(row["gbps"] / (header["copy_tbps"] * 1000))
        assert row["max_abs_err_vs_fp32"] is not None
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert {r["status"] for r in wrong} == {"failed"}
    assert all(r["ms_p50"] is None and r["gbps"] is None for r in wrong)
    skipped = {r["provider"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "torch.compile on CPU" in skipped["torch-compile"]
    assert "Triton" in skipped["triton"]
    assert "CUDA" in skipped["liger"]

    table = out.markdown.read_text()
    assert "## layer_norm — fwd (GB/s)" in table
    assert "| shape | naive | torch | wrong |" in table
    assert "FAIL" in table and "wrong failed" in table
    assert len(out.plots) == 1 and out.plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    section = report.render_readme_section(tmp_path, readme_dir=tmp_path, committed_only=False)
    assert section.startswith(report.BEGIN) and section.rstrip().endswith(report.END)
    assert "## Benchmark results" in section and "### layer_norm (GB/s)" in section
    assert f"![layer_norm](cpu/{out.plots[0].name})" in section
    assert "torch " + torch.__version__ in section
    assert "| mode | shape | naive | torch | wrong |" in section
    readme = "# fastattn\n\nintro\n\n" + section + "\nafter\n"
    assert report.replace_section(readme, section) == readme
    assert report.replace_section("# fastattn\n", section).endswith(section)


def test_cli_quick_cpu_run(tmp_path, capsys):
    rc = bench_main(["--quick", "--op", "rms_norm", "--providers", "naive,torch", "--max-cases", "1",
                     "--modes", "fwd", "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GPU numbers need a CUDA GPU" in printed
    files = sorted(p.suffix for p in (tmp_path / "cpu").iterdir())
    assert files == [".jsonl", ".md", ".png"]
    rows = _read(next((tmp_path / "cpu").glob("*.jsonl")))[1:]
    assert [(r["op"], r["mode"], r["provider"], r["status"]) for r in rows] == [
        ("rms_norm", "fwd", "naive", "ok"), ("rms_norm", "fwd", "torch", "ok")]


def test_cli_list_and_op_names(capsys):
    assert bench_main(["--list", "--op", "attention", "--device", "cpu"]) == 0
    assert "attention: 6 shapes" in capsys.readouterr().out
    assert expand_ops(["model", "attention"]) == ["model_train", "model_decode", "attention"]
    assert expand_ops(["all"])[:2] == ["attention", "decode_attention"]
    with pytest.raises(ValueError, match="op must be one of"):
        expand_ops(["softmax"])
    assert bench_main(["--op", "softmax"]) == 2  # one line (tests/test_cli.py)


def test_results_table_marks_statuses():
    rows = [
        {"op": "ffn", "mode": "fwd", "provider": p, "shape": {"tokens": 8, "d_model": 4, "d_hidden": 16,
                                                               "activation": "gelu"},
         "status": s, "tflops": v, "reason": reason}
        for p, s, v, reason in (("naive", "ok", 1.5, None), ("torch", "ok", 123.4, None),
                                ("triton", "failed", None, "wrong result"), ("cuda", "skipped", None, "not built"))
    ]
    table = results.op_table("ffn", "fwd", rows)
    assert "| shape | naive | torch | triton |" in table  # cuda: skipped everywhere, left out
    assert "| 1.5 | 123 | FAIL |" in table
    assert "- cuda skipped (1 case): not built" in table


def test_model_benchmark_or_its_skip_reason(tmp_path):
    spec = get_spec("model_train")
    require(spec.unavailable())
    out = run_benchmarks(["model"], out=tmp_path, device=torch.device("cpu"), quick=True,
                         providers=["naive", "torch"], progress=False, plots=False, log=lambda line: None)
    rows = _read(out.jsonl)[1:]
    assert {(r["op"], r["provider"]) for r in rows} == {
        ("model_train", "naive"), ("model_train", "torch"), ("model_decode", "naive"), ("model_decode", "torch")}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0


# ----------------------------------------------------------------------------- ceilings, units, notes


def test_ceilings_take_the_best_size_and_round(monkeypatch):
    """The ceiling is the best rate over every size and round (the fastest call of
    each), in GB/s for the copy (TB/s kept for TARGETS.md), with the thread count."""
    from fastattn.bench import ceilings

    calls = []

    def fake_time_fn(fn, arg_sets, device, settings):
        first = arg_sets[0][0]  # matmul: a (n, n); copy: src (bytes / 4,)
        key = (first.dim(), first.numel())
        calls.append(key)
        round_ = calls.count(key)  # 1, 2
        ms = {(2, 256**2): 1.0, (2, 512**2): 4.0, (1, 2**18 // 4): 0.01, (1, 2**20 // 4): 0.02}[key]
        return timing.Timing(ms * 2, ms * 3, ms * 4, 10, ms_min=ms / round_)  # the 2nd round is faster

    monkeypatch.setattr(ceilings, "time_fn", fake_time_fn)
    monkeypatch.setattr(ceilings, "CPU_MATMUL_SIZES", (256, 512))
    monkeypatch.setattr(ceilings, "CPU_COPY_BYTES", (2**18, 2**20))
    measured = ceilings.measure(torch.device("cpu"))
    assert len(calls) == 2 * 4  # 2 rounds × (2 matmuls + 2 copies)
    assert measured["matmul_tflops"] == pytest.approx(2 * 512**3 / (2e-3) / 1e12)  # 512³ in 2 ms beats 256³ in 0.5
    assert measured["copy_gbps"] == pytest.approx(2 * 2**20 / 1e-5 / 1e9)  # 1 MiB in 10 µs
    assert measured["copy_tbps"] == pytest.approx(measured["copy_gbps"] / 1000)
    assert "best: 512³" in measured["matmul_desc"] and "best: 1 MiB" in measured["copy_desc"]
    assert measured["ceiling_threads"] == torch.get_num_threads()


def test_cpu_run_ceilings_share_the_ops_threads_and_bound_the_rows(tmp_path):
    out = run_benchmarks(["rms_norm"], out=tmp_path, device=torch.device("cpu"), quick=True, max_cases=2,
                         modes=["fwd"], providers=["naive", "torch"], progress=False, plots=False,
                         log=lambda line: None)
    header, rows = _read(out.jsonl)[0], _read(out.jsonl)[1:]
    assert header["ceiling_threads"] == header["cpu_threads"] == 1  # what every op row ran with
    assert header["cpu_cores"] == __import__("os").cpu_count()
    assert header["copy_gbps"] == pytest.approx(header["copy_tbps"] * 1000)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["fraction_of_ceiling"] == pytest.approx(r["gbps"] / header["copy_gbps"]) for r in ok)
    # A ceiling measured like the rows bounds them (the first runs gave up to 3.8×: a
    # DRAM-sized copy against cache-resident rows); 1.25 leaves room for a busy machine.
    assert max(r["fraction_of_ceiling"] for r in ok) < 1.25
    summary = results.run_summary(header)
    assert f"on 1 torch thread of {header['cpu_cores']} cores" in summary
    assert "GB/s" in summary and "TB/s" not in summary


def test_markdown_gives_each_skip_reason_once():
    shape = {"tokens": 8, "d_model": 4, "d_hidden": 16, "activation": "gelu"}
    rows = [{"op": op, "mode": mode, "provider": p, "shape": shape, "status": s, "tflops": v, "reason": reason}
            for op in ("ffn", "gated_ffn") for mode in ("fwd", "bwd")
            for p, s, v, reason in (("torch", "ok", 1.0, None), ("cuda", "skipped", None, "not built"),
                                    ("triton", "failed", None, "wrong result"))]
    text = results.markdown_report({"device": "CPU (x, 2 cores)", "sweep": "cpu"}, rows)
    assert text.count("not built") == 1
    assert "- cuda skipped (4 cases: ffn, gated_ffn): not built" in text
    assert text.count("triton failed") == 4  # failures stay under their tables


def test_plots_carry_the_cpu_note(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastattn.bench import plots

    notes = []
    original = plots._note_cpu_run

    def spy(fig, header):
        original(fig, header)
        notes.append([t.get_text() for t in fig.texts])

    monkeypatch.setattr(plots, "_note_cpu_run", spy)
    rows = [{"op": "rms_norm", "mode": "fwd", "provider": "torch", "status": "ok", "gbps": 10.0 * h,
             "shape": {"rows": 64, "hidden": h, "residual": False}} for h in (64, 128)]
    cpu = {"device": "CPU (x86_64, 2 cores)", "cuda": None, "dtype": "float32", "copy_gbps": 50.0}
    gpu = {"device": "NVIDIA H200", "cuda": "13.0", "dtype": "bfloat16", "copy_tbps": 4.3}
    assert plots.plot_op(cpu, rows, "rms_norm", tmp_path / "cpu.png") is not None
    assert plots.plot_op(gpu, rows, "rms_norm", tmp_path / "gpu.png") is not None
    assert len(notes) == 2 and plots.CPU_PLOT_NOTE in notes[0] and plots.CPU_PLOT_NOTE not in notes[1]
    assert plots.ceiling_of(gpu, "gbps") == pytest.approx(4300.0) and plots.ceiling_of(cpu, "gbps") == 50.0


def test_cli_user_errors_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    cases = [(["--providers", "bogus"], "--providers bogus"), (["--modes", "up"], "--modes up"),
             (["--max-cases", "0"], "--max-cases"), (["--time-budget", "-1"], "--time-budget"),
             (["--out", str(tmp_path / "file")], "is a file")]
    for argv, words in cases:
        assert bench_main(["--op", "rms_norm", "--device", "cpu", "--no-progress", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fastattn-bench: error: ") and words in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----------------------------------------------------------------------------- device_run.sh's stages 2 and 3


def test_quick_gpu_preset_is_the_device_runs_benchmark():
    """--preset quick-gpu: attention at d 64/128 × seqlen 1k/4k/16k (16k tokens) × causal
    or not against SDPA's flash and cuDNN backends; norms at 32k × 4k/8k; the FFNs at
    16k × 4096 with the bare GEMMs; decode at batch 1 and 32 over a 32k cache; naive
    everywhere; fwd and bwd."""
    from fastattn.bench.run import PRESETS

    preset = PRESETS["quick-gpu"]
    assert preset.modes == ("fwd", "bwd") and preset.sweep == "quick-gpu" and preset.cpu_sweep == "cpu-quick"
    for op, names in preset.providers.items():
        assert "naive" in names and set(names) <= set(get_spec(op).providers), op
    assert {"torch-flash", "torch-cudnn", "triton", "cuda"} <= set(preset.providers["attention"])
    assert "gemm-only" in preset.providers["ffn"] and "torch" in preset.providers["rms_norm"]
    attention = get_spec("attention").sweep("quick-gpu")
    assert {(s["head_dim"], s["seqlen_q"], s["causal"]) for s in attention} == {
        (d, s, c) for d in (64, 128) for s in (1024, 4096, 16384) for c in (False, True)}
    assert {s["batch"] * s["seqlen_q"] for s in attention} == {16384}
    for op in ("layer_norm", "rms_norm"):
        assert {(s["rows"], s["hidden"]) for s in get_spec(op).sweep("quick-gpu")} == {(32768, 4096), (32768, 8192)}
    for op in ("ffn", "gated_ffn"):
        assert [(s["tokens"], s["d_model"]) for s in get_spec(op).sweep("quick-gpu")] == [(16384, 4096)]
    decode = get_spec("decode_attention").sweep("quick-gpu")
    assert {s["batch"] for s in decode} == {1, 32} and {s["cache_len"] for s in decode} == {32768}
    for op, keys in SHAPE_KEYS.items():
        assert all(set(s) == keys for s in get_spec(op).sweep("quick-gpu")), op


def test_cli_preset_with_jsonl_writes_that_file_alone(tmp_path, capsys):
    target = tmp_path / "bench.jsonl"
    rc = bench_main(["--preset", "quick-gpu", "--op", "layer_norm", "--max-cases", "1", "--modes", "fwd",
                     "--device", "cpu", "--jsonl", str(target), "--no-progress", "--out", str(tmp_path / "unused")])
    assert rc == 0
    capsys.readouterr()
    assert [p.name for p in tmp_path.iterdir()] == ["bench.jsonl"]
    header, *rows = _read(target)
    assert header["preset"] == "quick-gpu" and header["sweep"] == "cpu-quick"
    assert header["providers"]["layer_norm"] == ["naive", "torch", "triton", "cuda"]
    assert [(r["op"], r["mode"], r["provider"]) for r in rows] == [
        ("layer_norm", "fwd", p) for p in ("naive", "torch", "triton", "cuda")]


def test_smoke_matrices_cover_every_op_and_the_asked_shapes():
    from fastattn.bench import smoke

    for name, matrix in smoke.MATRICES.items():
        assert {c.op for c in matrix} == set(smoke.OPS), name
        assert len({c.id for c in matrix}) == len(matrix), name
    # The tiny matrix mirrors the GPU one case for case (op and backends).
    assert [(c.op, c.backends) for c in smoke.TINY] == [(c.op, c.backends) for c in smoke.SMOKE]
    attention = [c.sizes for c in smoke.SMOKE if c.op == "attention"]
    assert {s["head_dim"] for s in attention} == {64, 128, 256}
    assert {s["causal"] for s in attention} == {False, True}
    assert any(s["kv_heads"] < s["heads"] for s in attention)
    assert any(s["seqlen_q"] % 2 or s["seqlen_k"] % 2 for s in attention)
    assert [c.backends for c in smoke.SMOKE if c.op == "attention" and c.sizes["head_dim"] == 256] == [("triton",)]
    decode = [c.sizes for c in smoke.SMOKE if c.op == "decode_attention"]
    assert {s["page_size"] > 0 for s in decode} == {False, True}
    for op in ("layer_norm", "rms_norm"):
        assert {(c.sizes["hidden"], c.sizes["residual"]) for c in smoke.SMOKE if c.op == op} == {
            (h, r) for h in (4096, 5000) for r in (False, True)}
    for op in ("ffn", "gated_ffn"):
        assert [(c.sizes["tokens"], c.sizes["d_model"], c.sizes["d_hidden"]) for c in smoke.SMOKE if c.op == op] \
            == [(1024, 1024, 4096)]
    assert len(smoke.params(smoke.SMOKE)) == sum(2 * len(c.backends) for c in smoke.SMOKE)


def test_smoke_runner_flags_a_wrong_kernel(monkeypatch):
    """The smoke's check (tests/helpers.py's rule on every output and gradient) passes
    the Triton rms_norm and fails the same kernel with its output shifted by 0.05."""
    import fastattn
    from fastattn.bench import smoke
    from fastattn.ops import rms_norm as rms_norm_op
    from helpers import DEVICE, assert_within_naive_error

    if DEVICE.type != "cpu" or "triton" not in fastattn.available_backends():
        pytest.skip("runs the Triton interpreter on CPU")
    case = next(c for c in smoke.TINY if c.op == "rms_norm" and c.sizes["residual"])
    results = smoke.run_case(case, "triton", "float16", DEVICE)
    assert set(results) == {"out", "out1", "dx", "dweight", "dresidual"}
    for name, (ours, naive, ref) in results.items():
        assert_within_naive_error(ours, naive, ref, factor=3.0, what=name)

    right = dict.__getitem__(rms_norm_op.BACKENDS.forward, "triton")

    def wrong(*args):
        y, *rest = right(*args)
        return (y + 0.05, *rest)

    monkeypatch.setitem(rms_norm_op.BACKENDS.forward, "triton", wrong)
    ours, naive, ref = smoke.run_case(case, "triton", "float16", DEVICE)["out"]
    with pytest.raises(AssertionError, match="out: max error"):
        assert_within_naive_error(ours, naive, ref, what="out")
    with pytest.raises(smoke.SmokeSkip, match="cuda"):
        smoke.run_case(case, "cuda", "float16", DEVICE)
