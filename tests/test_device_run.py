"""benchmarks/device_run.sh, the one command of a GPU session, rehearsed on CPU.

The dry run (`bash benchmarks/device_run.sh --dry-run OUT`) runs once for this module,
about two to three minutes on 2 cores: every stage of the GPU run on CPU (pip's
--dry-run of the build command, the environment and ceilings, the smoke matrix's tiny
cases through the Triton interpreter, the memcheck calls, the quick-gpu preset's CPU
sweep, the other gpu tests (skipped here), the autotune step), leaving the same files
a GPU run returns. The tests check those files against the device tool's limits,
that every step ran, the count of Triton variants the GPU run compiles, and that
`python -m fastattn.bench.report --device-run` reads them and never publishes a CPU
run under benchmarks/results/.

This is a test rather than a line of .ci/run so that it runs wherever the README's test
command runs (CI included), one dry run serves both the script's and the report's
checks, and a failure comes with pytest's account of which step and which file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastattn.bench import report, smoke
from fastattn.bench.run import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_run.sh"
FILES = {"status.json", "run.log", "env.jsonl", "smoke.jsonl", "bench.jsonl", "gpu-tests.jsonl", "autotune.jsonl"}
DEVICE_MAX_FILES, DEVICE_MAX_BYTES = 8, 16 * 2**20  # what the device tool returns
STEPS = ["build", "env", "smoke", "memcheck", "count", "bench", "gpu-tests", "autotune"]
AOT_MISSING = "AOT count tool missing"


def _script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-run")
    result = _script("--dry-run", str(out), timeout=900)
    return out, result, json.loads((out / "status.json").read_text())


def test_script_is_clean_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("args,message", [
    ([], "usage:"),
    (["--budget", "ten", "out"], "--budget must be a whole number"),
    (["--stages", "env,tests", "out"], "--stages takes env,smoke,bench,rest"),
    (["--fast", "out"], "unknown option --fast"),
    (["a", "b"], "usage:"),
])
def test_script_refuses_bad_arguments(args, message):
    result = _script(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_budget_skips_are_recorded(tmp_path):
    """A step whose limit falls under its minimum is skipped, the skip recorded with
    what was left (a dry run counts it as a failure: CI must see a run that no longer fits)."""
    result = _script("--dry-run", "--budget", "0", "--stages", "bench,rest", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["finished"] is True and status["budget_s"] == 0
    assert [(s["step"], s["status"]) for s in status["steps"]] == [
        ("bench", "skipped"), ("gpu-tests", "skipped"), ("autotune", "skipped")]
    assert all("s left of the run's 0 s" in s["note"] for s in status["steps"])
    assert "| 3 | bench | skipped |" in result.stdout


def test_dry_run_leaves_the_device_file_set(dry_run):
    out, result, status = dry_run
    entries = list(out.iterdir())
    assert {p.name for p in entries} == FILES, result.stdout[-3000:]
    assert all(p.is_file() for p in entries)  # flat: nothing below OUT_DIR
    assert len(entries) <= DEVICE_MAX_FILES
    for p in entries:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        assert p.stat().st_size < DEVICE_MAX_BYTES, p.name
    assert status["mode"] == "dry-run" and status["finished"] is True
    assert status["git_commit"] and status["elapsed_s"] <= status["budget_s"]


def test_dry_run_runs_every_step(dry_run):
    out, result, status = dry_run
    steps = {s["step"]: s for s in status["steps"]}
    assert [s["step"] for s in status["steps"] if s["step"] in STEPS] == STEPS
    not_ok = {name: s for name, s in steps.items() if s["status"] != "ok" and not name.startswith("count")}
    assert not not_ok, (not_ok, result.stdout[-4000:])
    log = (out / "run.log").read_text()
    assert "not building fastattn._C: torch" in log  # setup.py's decision, through pip --dry-run
    assert "memcheck calls finished" in log
    # The summary the GPU run prints last (the device tool returns the end of stdout).
    assert "smoke (op × backend × dtype):" in result.stdout
    assert "NOTE: This is a CPU dry run" in result.stdout


def test_dry_run_environment_rows(dry_run):
    out, _, _ = dry_run
    rows = {r["kind"]: r for r in _rows(out / "env.jsonl")}
    assert set(rows) == {"versions", "device", "nvidia-smi", "build", "extension", "backends", "ceilings"}
    assert rows["build"]["status"] == "dry-run" and "fastattn._C" in rows["build"]["note"]
    assert rows["device"]["cuda"] is False and rows["device"]["slug"] == "cpu"
    assert rows["ceilings"]["matmul_tflops"] > 0 and rows["ceilings"]["copy_tbps"] > 0
    assert rows["versions"]["git_commit"]


def test_dry_run_smoke_rows(dry_run):
    """One row per (case, backend, dtype) of the tiny matrix; Triton fp16 passes every
    op; the cuda backend and bf16 tl.dot under the interpreter are skipped with reasons."""
    out, _, _ = dry_run
    rows = _rows(out / "smoke.jsonl")
    tests = [r for r in rows if r["kind"] == "test"]
    seen = {(t["properties"]["smoke"]["op"], t["properties"]["smoke"]["case"], t["properties"]["smoke"]["backend"],
             t["properties"]["smoke"]["dtype"]) for t in tests}
    assert seen == {(c.op, c.name, b, d) for c, b, d in smoke.params(smoke.TINY)}
    assert not [t for t in tests if t["outcome"] in ("failed", "error")]
    passed = {t["properties"]["smoke"]["op"] for t in tests
              if t["outcome"] == "passed" and t["properties"]["smoke"]["dtype"] == "float16"}
    assert passed == set(smoke.OPS)
    for t in tests:
        if t["outcome"] == "passed":
            assert t["properties"]["errors"], t["nodeid"]
        else:
            assert t["message"], t["nodeid"]
    assert rows[-1]["kind"] == "summary" and rows[-1]["exitstatus"] == 0


def test_dry_run_bench_autotune_and_gpu_tests(dry_run):
    out, _, _ = dry_run
    header, *rows = _rows(out / "bench.jsonl")
    assert header["kind"] == "header" and header["preset"] == "quick-gpu" and header["sweep"] == "cpu-quick"
    assert header["ops"] == list(PRESETS["quick-gpu"].ops)
    assert {r["op"] for r in rows} == set(PRESETS["quick-gpu"].ops)
    assert {r["mode"] for r in rows} == {"fwd", "bwd"}
    assert any(r["status"] == "ok" for r in rows)
    tests = _rows(out / "gpu-tests.jsonl")
    assert tests[-1]["kind"] == "summary" and tests[-1]["exitstatus"] == 0
    assert not [t for t in tests if t.get("outcome") in ("failed", "error")]
    autotune = _rows(out / "autotune.jsonl")
    assert autotune[0]["kind"] == "autotune" and autotune[0]["enabled"] is False  # the interpreter tunes nothing
    assert autotune[-1]["kind"] == "summary" and autotune[-1]["errors"] == 0


def test_dry_run_counts_compile_variants(dry_run, capsys):
    """The dry run prints how many Triton kernel variants the GPU run compiles (default
    configs, smoke matrix), from `python -m fastattn.kernels.aot --count --matrix smoke`; it must
    stay within the budget (about a minute of compiling at 16 cores). The dry run sets
    TRITON_INTERPRET=1 for everything; the AOT tool restarts itself without it."""
    out, result, status = dry_run
    count_steps = [s for s in status["steps"] if s["step"].startswith("count")]
    with capsys.disabled():
        print(f"\n[device_run.sh --dry-run] Triton variants the GPU run compiles: {status['compile_count']}; "
              f"count steps: {count_steps}")
    assert count_steps and all(s["status"] == "ok" for s in count_steps), count_steps
    assert status["compile_count"] is not None and status["compile_count"] <= 150
    assert result.returncode == 0, result.stdout[-3000:]


def test_report_does_not_publish_a_dry_run(dry_run, capsys):
    out, _, _ = dry_run
    results_dir = ROOT / "benchmarks" / "results"
    before = sorted(results_dir.rglob("*")) if results_dir.exists() else []
    readme_before = (ROOT / "README.md").read_text()
    assert report.main(["--device-run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "is not a GPU result" in printed and "Nothing was written under" in printed
    assert (sorted(results_dir.rglob("*")) if results_dir.exists() else []) == before
    assert (ROOT / "README.md").read_text() == readme_before


def test_report_publishes_a_dry_run_only_where_told(dry_run, tmp_path, capsys):
    out, _, status = dry_run
    results_dir, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    assert report.main(["--device-run", str(out), "--results-dir", str(results_dir), "--readme", str(readme)]) == 0
    capsys.readouterr()
    run = report.DeviceRun(out)
    directory = results_dir / "cpu"
    stem = run.stem
    assert stem.endswith(status["git_commit"])
    assert (directory / f"{stem}.jsonl").read_text() == (out / "bench.jsonl").read_text()
    assert (directory / f"{stem}.md").exists()
    assert sorted(p.name for p in (directory / f"{stem}{report.DEVICE_RUN_SUFFIX}").iterdir()) == sorted(
        FILES - {"run.log", "bench.jsonl"})
    summary = (directory / f"{stem}{report.DEVICE_RUN_SUFFIX}.md").read_text()
    assert report.DRY_RUN_NOTE in summary and run.not_gpu_note == report.DRY_RUN_NOTE
    assert "| attention | triton | 4/4 | skipped |" in summary
    text = readme.read_text()
    assert "old" not in text and text.endswith("\nafter\n")
    assert "These are CPU numbers" in text and "Correctness on this device" in text
    # The section regenerates from the same file.
    section = report.render_readme_section(results_dir, readme_dir=tmp_path, path=directory / f"{stem}.jsonl")
    assert report.replace_section(text, section) == text


def test_pytest_jsonl_plugin(tmp_path):
    """One row per test as it ends (passed, failed with its message, skipped with its
    reason, properties kept) and a summary row."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(record_property):\n    record_property('smoke', {'op': 'x', 'n': [1, 2]})\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "def test_skip():\n    pytest.skip('not here')\n")
    jsonl = tmp_path / "rows.jsonl"
    env = dict(os.environ, FASTATTN_PYTEST_JSONL=str(jsonl))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                             "fastattn.bench.pytest_jsonl", "test_sample.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout
    rows = _rows(jsonl)
    tests = {r["nodeid"].split("::")[1]: r for r in rows if r["kind"] == "test"}
    assert {name: r["outcome"] for name, r in tests.items()} == {
        "test_ok": "passed", "test_bad": "failed", "test_skip": "skipped"}
    assert tests["test_ok"]["properties"] == {"smoke": {"op": "x", "n": [1, 2]}}
    assert "one is not two" in tests["test_bad"]["message"]
    assert tests["test_skip"]["message"] == "not here"
    assert rows[-1] == {**rows[-1], "kind": "summary", "counts": {"passed": 1, "failed": 1, "skipped": 1},
                        "exitstatus": 1}


def test_smoke_table_shows_failures_and_skips():
    def row(op, backend, dtype, outcome, message=None, case="c"):
        return {"kind": "test", "nodeid": f"t::{op}-{case}-{backend}-{dtype}", "outcome": outcome,
                "message": message, "properties": {"smoke": {"op": op, "case": case, "backend": backend,
                                                             "dtype": dtype}}}

    rows = [row("ffn", "triton", "float16", "passed"), row("ffn", "triton", "bfloat16", "passed"),
            row("attention", "triton", "float16", "passed", case="a"),
            row("attention", "triton", "float16", "failed", "E   AssertionError: dq: max error 1 > 0.1", case="b"),
            row("attention", "cuda", "bfloat16", "skipped", "no kernel"),
            {"kind": "summary", "counts": {}, "exitstatus": 1, "duration_s": 1.0}]
    table = report.smoke_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| op | backend | float16 | bfloat16 |"
    assert "| attention | triton | FAIL 1/2 | — |" in lines  # ops in smoke.OPS order
    assert lines.index("| attention | triton | FAIL 1/2 | — |") < lines.index("| ffn | triton | 1/1 | 1/1 |")
    assert "| attention | cuda | — | skipped |" in lines
    assert "- FAIL attention b triton float16: E   AssertionError: dq: max error 1 > 0.1" in lines
    assert "- skipped (attention cuda bfloat16): no kernel" in lines
    assert report.smoke_table([]).startswith("No smoke results")


def test_report_publishes_a_gpu_run(dry_run, tmp_path, capsys):
    """The dry run's files relabelled as a GPU run's (mode gpu, a CUDA device): the
    results, plots, summary and README section are written, under the device's folder."""
    out, _, _ = dry_run
    gpu = tmp_path / "files_at"
    shutil.copytree(out, gpu)
    status = json.loads((gpu / "status.json").read_text())
    (gpu / "status.json").write_text(json.dumps({**status, "mode": "gpu"}))
    env = _rows(gpu / "env.jsonl")
    for row in env:
        if row["kind"] == "device":
            row.update(device="NVIDIA H200", slug="nvidia-h200", cuda=True)
    (gpu / "env.jsonl").write_text("".join(json.dumps(r) + "\n" for r in env))
    header, *rows = _rows(gpu / "bench.jsonl")
    (gpu / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{**header, "device": "NVIDIA H200"}]
                                             + [{**r, "device": "NVIDIA H200"} for r in rows]))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n")
    results_dir = tmp_path / "results"
    assert report.main(["--device-run", str(gpu), "--results-dir", str(results_dir), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "not a GPU result" not in printed and "commit benchmarks/results/ and README.md" in printed
    stem = report.DeviceRun(gpu).stem
    directory = results_dir / "nvidia-h200"
    assert (directory / f"{stem}.jsonl").exists() and (directory / f"{stem}-device-run.md").exists()
    assert "not a GPU result" not in (directory / f"{stem}-device-run.md").read_text()
    text = readme.read_text()
    assert "NVIDIA H200" in text and "These are CPU numbers" not in text
    assert f"nvidia-h200/{stem}.md" in text and "Correctness on this device" in text
    # benchmarks/results/*/*.jsonl holds only results files: the raw device files sit one folder down.
    assert [p.name for p in directory.glob("*.jsonl")] == [f"{stem}.jsonl"]
    assert report.newest_results(results_dir, committed_only=False) == directory / f"{stem}.jsonl"
