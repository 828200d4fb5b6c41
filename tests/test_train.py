"""fastattn-train: the loss goes down, checkpoints resume exactly, the masked objective,
the data pipeline, and a 2-process DistributedDataParallel run over gloo."""

import argparse
import json
import os
import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastattn import train as train_mod
from fastattn.models import IGNORE_INDEX
from fastattn.models.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads cost more than they save (far more on
    a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# One stdlib file (about 100 kB) is corpus enough for a few steps, and quicker to find
# than the whole standard library; test_thirty_steps_lower_the_loss uses the default.
SMALL = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "32",
         "--data", argparse.__file__, "--no-progress", "--log-interval", "1000"]


def run(tmp_path, *extra, out="run", small=SMALL):
    args = train_mod.parse_args(small + ["--out", str(tmp_path / out), *extra])
    return train_mod.train(args)


def test_thirty_steps_lower_the_loss(tmp_path):
    default_corpus = [a for a in SMALL if a != "--data" and a != argparse.__file__] + ["--max-corpus-mb", "0.25"]
    result = run(tmp_path, "--max-steps", "30", "--lr", "3e-3", "--eval-interval", "15", "--eval-batches", "2",
                 small=default_corpus)
    assert result.step == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = result.eval_losses
    assert sorted(evals) == [15, 30] and evals[30] < evals[15]
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / train_mod.METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in lines] == [15, 30] and lines[-1]["world_size"] == 1
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    model = train_mod.load_model(out)
    assert not model.training and model.config.causal
    idx = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(model(idx)[0], result.model.eval()(idx)[0])


def test_resume_continues_exactly(tmp_path):
    common = ("--schedule", "constant", "--warmup-steps", "0", "--eval-interval", "2", "--eval-batches", "1")
    straight = run(tmp_path, "--max-steps", "4", *common, out="straight")
    run(tmp_path, "--max-steps", "2", *common, out="resumed")
    resumed = run(tmp_path, "--max-steps", "4", "--resume", *common, out="resumed")
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert resumed.losses == straight.losses[2:]
    a = train_mod.load_checkpoint(tmp_path / "straight")["model"]
    b = train_mod.load_checkpoint(tmp_path / "resumed")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def test_masked_objective_trains_a_bidirectional_model(tmp_path):
    result = run(tmp_path, "--objective", "masked", "--max-steps", "8", "--lr", "3e-3", "--eval-interval", "8",
                 "--eval-batches", "1")
    assert not result.model.config.causal
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    with pytest.raises(ValueError, match="other --objective"):
        run(tmp_path, "--objective", "causal", "--max-steps", "9", "--resume")


def test_masked_batches():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.int16)
    x, y = train_mod.get_batch(tokens, 8, 64, "masked", 0.15, torch.Generator().manual_seed(0))
    chosen = y != IGNORE_INDEX
    assert 0.05 < chosen.float().mean() < 0.3
    assert (x[~chosen] != ByteTokenizer.MASK).all()
    assert (x[chosen] == ByteTokenizer.MASK).float().mean() > 0.6
    x, y = train_mod.get_batch(tokens, 3, 16, "causal", 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_corpus_is_the_stdlib_by_default(tmp_path):
    files = train_mod.corpus_files(None, "*.py")
    assert len(files) > 100 and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert any(f.name == "argparse.py" for f in files)
    tokens = train_mod.load_corpus(files[:3])
    assert tokens.dtype == torch.int16 and (tokens == ByteTokenizer.EOS).sum() == 3
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    assert len(train_mod.corpus_files(str(tmp_path), "*.txt")) == 2
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_mod.corpus_files(str(tmp_path / "missing"), "*.py")


def test_config_overrides():
    changes = train_mod.parse_overrides(["norm_position=post", "n_kv_heads=2", "dropout=0.1", "bias=false",
                                         "d_ff=none"])
    assert changes == {"norm_position": "post", "n_kv_heads": 2, "dropout": 0.1, "bias": False, "d_ff": None}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        train_mod.parse_overrides(["width=3"])
    args = train_mod.parse_args(["--set", "positions=rope", "--objective", "masked"])
    config = train_mod.build_config(args)
    assert config.positions == "rope" and not config.causal and config.vocab_size == 320


def test_module_entry_point_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fastattn-train", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("fastattn.train", run_name="__main__", alter_sys=False)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--objective" in text and "--resume" in text and "--backend" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, ports: tuple[int, int], out: str) -> None:
    """One rank: a DDP run, then an FSDP2 run of the same training (CPU, gloo)."""
    torch.set_num_threads(1)
    for parallel, port in zip(("ddp", "fsdp"), ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        run_out = Path(out) / parallel
        args = train_mod.parse_args(SMALL + ["--out", str(run_out), "--max-steps", "3", "--eval-interval", "3",
                                             "--eval-batches", "1", "--parallel", parallel])
        result = train_mod.train(args)
        if parallel == "ddp":
            flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
        else:  # FSDP2 shards the parameters: compare the gathered checkpoint instead
            flat = torch.cat([t.reshape(-1) for t in train_mod.load_checkpoint(run_out)["model"].values()])
        torch.save({"params": flat, "losses": result.losses}, run_out / f"rank{rank}.pt")


def test_two_process_ddp_and_fsdp_over_gloo(tmp_path):
    out = tmp_path / "dist"
    mp.spawn(_distributed_worker, args=(2, (_free_port(), _free_port()), str(out)), nprocs=2, join=True)
    ddp = [torch.load(out / "ddp" / f"rank{r}.pt") for r in range(2)]
    # Each rank saw its own batches, yet the all-reduced gradients keep the weights identical.
    assert ddp[0]["losses"] != ddp[1]["losses"]
    assert torch.equal(ddp[0]["params"], ddp[1]["params"])
    metrics = json.loads((out / "ddp" / train_mod.METRICS_NAME).read_text().splitlines()[-1])
    assert metrics["world_size"] == 2 and metrics["step"] == 3
    saved = train_mod.load_checkpoint(out / "ddp")
    assert saved["step"] == 3 and "embed.weight" in saved["model"]
    # FSDP2 trains the same model: the same losses and, up to reduction order, weights.
    fsdp = [torch.load(out / "fsdp" / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        assert fsdp[r]["losses"] == pytest.approx(ddp[r]["losses"], rel=1e-5)
    ddp_saved = torch.cat([t.reshape(-1) for t in saved["model"].values()])
    torch.testing.assert_close(fsdp[0]["params"], ddp_saved, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the CLI's --out, help, progress


def test_out_with_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    common = ["--max-steps", "2", "--eval-interval", "2", "--eval-batches", "1"]
    argv = SMALL + ["--out", str(tmp_path / "run"), *common]
    assert train_mod.main(argv) == 0
    assert f"checkpoint of step 2 in {tmp_path / 'run' / train_mod.CHECKPOINT_NAME}" in capsys.readouterr().out
    metrics = (tmp_path / "run" / train_mod.METRICS_NAME).read_text()
    assert train_mod.main(argv) == 2  # it used to train again, appending duplicate step rows
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / train_mod.METRICS_NAME).read_text() == metrics
    assert train_mod.main(argv + ["--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / train_mod.METRICS_NAME).read_text().splitlines()]
    assert steps == [2]  # replaced, not appended
    with pytest.raises(train_mod.UsageError, match="pass one of them"):
        train_mod.parse_args(argv + ["--overwrite", "--resume"])


def test_help_shows_defaults_and_backend_choices():
    text = " ".join(train_mod.build_parser().format_help().split())
    assert "--max-steps MAX_STEPS optimizer steps in all (default: 1000)" in text
    assert "--backend {naive,torch,triton,cuda,auto}" in text and "(default: auto)" in text
    assert "(default: None)" not in text


def test_progress_shows_speed_only_once_measured(capsys):
    log = train_mod._Progress(True, False, 0, 10, 1)
    log.step(0, 2.5, None, 1e-3)
    log.step(1, 2.4, 1234.0, 1e-3)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 1: loss 2.5000, lr 1.00e-03", "step 2: loss 2.4000, 1,234 tokens/s, lr 1.00e-03"]
    pytest.importorskip("tqdm")
    bar = train_mod._Progress(True, True, 0, 10, 5)
    bar.step(0, 2.5, None, 1e-3)
    assert "tok_s" not in bar.bar.postfix and "loss=2.5000" in bar.bar.postfix
    bar.step(1, 2.4, 1234.0, 1e-3)
    assert "tok_s=1,234" in bar.bar.postfix
    bar.close()
