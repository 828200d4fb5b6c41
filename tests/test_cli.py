"""fastattn-train, fastattn-generate and fastattn-bench as a user runs them (subprocesses):
a user error prints one line naming what is wrong and what to do, exits 2, shows no
traceback and leaves nothing behind; generation past the model's context works and
prints control bytes escaped. Each command runs the module (`python -m ...`), which is
what the console script calls."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastattn import _cli
from fastattn import generate as generate_mod
from fastattn import train as train_mod
from fastattn.bench.cli import main as bench_main
from fastattn.models import GPT, TransformerConfig

TINY_DATA = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "16", "--max-steps", "2",
             "--data", os.__file__, "--no-progress"]


def run(module: str, *args: str, cwd, env_changes=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # as a user's shell has it: Triton off on CPU
    env.update(env_changes or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_user_error(result: subprocess.CompletedProcess, prog: str, *words: str) -> str:
    """Exit status 2, one line on stderr `<prog>: error: ...` containing `words`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_train_device_cuda_on_a_cpu_torch(tmp_path):
    result = run("fastattn.train", "--device", "cuda", "--out", "run", cwd=tmp_path)
    assert_user_error(result, "fastattn-train", "--device cuda", "CPU build", "--device cpu")
    assert list(tmp_path.iterdir()) == []


def test_train_backend_that_cannot_run_leaves_no_out(tmp_path):
    result = run("fastattn.train", *TINY_DATA, "--backend", "triton", "--out", "run", cwd=tmp_path)
    assert_user_error(result, "fastattn-train", "--backend triton", "use one of")
    assert list(tmp_path.iterdir()) == []  # no run/, no run/config.json


def test_train_refuses_an_out_that_holds_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    result = run("fastattn.train", *TINY_DATA, "--out", "run", cwd=tmp_path)
    assert_user_error(result, "fastattn-train", "--resume", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 2}\n'


def test_generate_missing_and_foreign_checkpoints(tmp_path):
    result = run("fastattn.generate", "--checkpoint", "nothing", cwd=tmp_path)
    assert_user_error(result, "fastattn-generate", "--checkpoint", "no checkpoint at nothing")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = run("fastattn.generate", "--checkpoint", "notes.pt", cwd=tmp_path)
    assert_user_error(result, "fastattn-generate", "notes.pt is not a fastattn-train checkpoint")


def test_generate_past_the_context_prints_escaped_text(tmp_path):
    """A model with a 16-position context asked for 40 tokens: it generates them all
    (sliding window), says so, and prints no raw control character."""
    config = TransformerConfig.from_preset("tiny", vocab_size=320, max_seq_len=16)
    torch.manual_seed(0)
    train_mod.save_checkpoint(tmp_path / train_mod.CHECKPOINT_NAME, {
        "format": train_mod.CHECKPOINT_FORMAT, "config": config.to_dict(), "model": GPT(config).state_dict(),
        "step": 0})
    result = run("fastattn.generate", "--checkpoint", ".", "--prompt", "def \x1b", "--max-new-tokens", "40",
                 "--seed", "0", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sliding window" in result.stderr and "40 new tokens" in result.stderr
    assert result.stdout.startswith("def \\x1b")
    assert all(ch.isprintable() or ch == "\n" or ch == "\t" for ch in result.stdout)


def test_bench_user_errors(tmp_path):
    result = run("fastattn.bench", "--op", "layer_norm", "--providers", "bogus", "--out", "bench", cwd=tmp_path)
    assert_user_error(result, "fastattn-bench", "--providers bogus", "pick from")
    assert list(tmp_path.iterdir()) == []


def test_run_keeps_tracebacks_for_internal_errors(capsys):
    """Only UsageError becomes a one-line exit 2; anything else propagates."""
    def user_error(argv):
        raise _cli.UsageError("--x is wrong; pass --y")

    def internal_error(argv):
        raise KeyError("bug")

    assert _cli.run("tool", user_error) == 2
    assert capsys.readouterr().err == "tool: error: --x is wrong; pass --y\n"
    with pytest.raises(KeyError):
        _cli.run("tool", internal_error)
    assert _cli.run("tool", lambda argv: None) == 0


# ----------------------------------------------------------------------------- out-of-range arguments
# Each value a user can get wrong is refused with one line naming the option, the value
# and what is accepted, exit status 2, and nothing written (in-process: main(argv)).


def assert_one_line_error(status: int, err: str, prog: str, words) -> None:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


TRAIN_BAD_ARGUMENTS = [
    (["--eval-interval", "0"], ["--eval-interval", ">= 1", "got 0"]),
    (["--set", "foo=1"], ["--set foo=1", "n_layers", "norm_position"]),
    (["--set", "n_layer=abc"], ["--set n_layer=abc", "n_layers"]),
    (["--set", "noequals"], ["--set noequals", "FIELD=VALUE"]),
    (["--set", "n_layers=abc"], ["--set n_layers=abc", "integer"]),
    (["--set", "n_layers=0"], ["--set n_layers=0", ">= 1"]),
    (["--set", "d_ff=-3"], ["--set d_ff=-3", ">= 1"]),
    (["--set", "dropout=1.5"], ["--set", "dropout", "[0, 1)"]),
    (["--set", "norm_eps=nan"], ["--set norm_eps=nan", "> 0"]),
    (["--set", "bias=maybe"], ["--set bias=maybe", "true or false"]),
    (["--set", "norm=batchnorm"], ["--set", "norm", "layernorm"]),
    (["--set", "d_model=66"], ["--set", "d_model (66)", "n_heads"]),
    (["--seq-len", "0"], ["--seq-len", ">= 1", "got 0"]),
    (["--seq-len", "-4"], ["--seq-len", ">= 1", "got -4"]),
    (["--lr", "-1"], ["--lr", "> 0", "got -1.0"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr", "nan"], ["--lr", "finite", "got nan"]),
    (["--lr", "inf"], ["--lr", "finite", "got inf"]),
    (["--min-lr-ratio", "-0.1"], ["--min-lr-ratio", "[0, 1]"]),
    (["--min-lr-ratio", "1.5"], ["--min-lr-ratio", "[0, 1]"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", ">= 0"]),
    (["--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    (["--weight-decay", "nan"], ["--weight-decay", "finite"]),
    (["--betas", "0.9", "1.0"], ["--betas", "[0, 1)", "1.0"]),
    (["--betas", "-0.1", "0.95"], ["--betas", "[0, 1)", "-0.1"]),
    (["--grad-clip", "-1"], ["--grad-clip", ">= 0"]),
    (["--grad-clip", "nan"], ["--grad-clip", "finite"]),
    (["--max-corpus-mb", "-1"], ["--max-corpus-mb", ">= 0"]),
    (["--val-fraction", "nan"], ["--val-fraction", "(0, 1)"]),
    (["--mask-prob", "1"], ["--mask-prob", "(0, 1)"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--max-steps", "0"], ["--max-steps", ">= 1"]),
    (["--grad-accum", "-2"], ["--grad-accum", ">= 1"]),
    (["--eval-batches", "0"], ["--eval-batches", ">= 1"]),
    (["--log-interval", "0"], ["--log-interval", ">= 1"]),
    (["--seed", str(2**64)], ["--seed", str(2**64)]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--device", "meta"], ["--device meta", "cpu", "cuda"]),
]


@pytest.mark.parametrize("argv, words", TRAIN_BAD_ARGUMENTS, ids=[" ".join(argv) for argv, _ in TRAIN_BAD_ARGUMENTS])
def test_train_refuses_out_of_range_arguments(tmp_path, capsys, argv, words):
    status = train_mod.main(TINY_DATA + ["--out", str(tmp_path / "run"), *argv])
    assert_one_line_error(status, capsys.readouterr().err, "fastattn-train", words)
    assert list(tmp_path.iterdir()) == []


GENERATE_BAD_ARGUMENTS = [
    (["--device", "meta"], ["--device meta", "cpu", "cuda"]),
    (["--device", "cpu:0"], ["--device cpu:0", "cpu", "cuda"]),
    (["--device", "nonsense"], ["--device 'nonsense'", "cpu", "cuda"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", ">= 0"]),
    (["--num-samples", "0"], ["--num-samples", ">= 1"]),
    (["--temperature", "-1"], ["--temperature", ">= 0"]),
    (["--temperature", "nan"], ["--temperature", "finite"]),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--top-k", "-1"], ["--top-k", ">= 0"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--top-p", "nan"], ["--top-p", "(0, 1]"]),
    (["--page-size", "-1"], ["--page-size", ">= 0"]),
    (["--seed", str(2**64)], ["--seed", str(2**64)]),
]


@pytest.mark.parametrize("argv, words", GENERATE_BAD_ARGUMENTS,
                         ids=[" ".join(argv) for argv, _ in GENERATE_BAD_ARGUMENTS])
def test_generate_refuses_out_of_range_arguments(tmp_path, capsys, argv, words):
    config = TransformerConfig.from_preset("tiny", vocab_size=320, max_seq_len=16)
    train_mod.save_checkpoint(tmp_path / train_mod.CHECKPOINT_NAME, {
        "format": train_mod.CHECKPOINT_FORMAT, "config": config.to_dict(), "model": GPT(config).state_dict(),
        "step": 0})
    status = generate_mod.main(["--checkpoint", str(tmp_path), "--max-new-tokens", "2", "--device", "cpu", *argv])
    assert_one_line_error(status, capsys.readouterr().err, "fastattn-generate", words)
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [train_mod.CHECKPOINT_NAME]


def test_train_user_errors_from_the_review_as_a_user_sees_them(tmp_path):
    """The commands a review found ending in a traceback: one line, exit 2, nothing written."""
    for argv, words in ((["--eval-interval", "0"], ["--eval-interval"]), (["--set", "foo=1"], ["--set foo=1"])):
        result = run("fastattn.train", *TINY_DATA, "--out", "run", *argv, cwd=tmp_path)
        assert_user_error(result, "fastattn-train", *words)
        assert list(tmp_path.iterdir()) == []


ARGPARSE_ERRORS = [
    (train_mod.main, "fastattn-train", ["--max-steps", "abc"], ["--max-steps", "invalid int value", "--help"]),
    (train_mod.main, "fastattn-train", ["--preset", "bogus"], ["--preset", "invalid choice", "--help"]),
    (train_mod.main, "fastattn-train", ["--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
    (generate_mod.main, "fastattn-generate", ["--prompt", "x"], ["--checkpoint", "required"]),
    (bench_main, "fastattn-bench", ["--op", "softmax"], ["--op", "invalid choice", "softmax"]),
]


@pytest.mark.parametrize("main, prog, argv, words", ARGPARSE_ERRORS, ids=[" ".join(a[2]) for a in ARGPARSE_ERRORS])
def test_errors_argparse_finds_are_one_line_too(tmp_path, monkeypatch, capsys, main, prog, argv, words):
    """A value argparse itself refuses (a type, a choice, an unknown or missing option) is
    one line naming the option, exit status 2, like the tools' own checks."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(main(argv), capsys.readouterr().err, prog, words)
    assert list(tmp_path.iterdir()) == []
