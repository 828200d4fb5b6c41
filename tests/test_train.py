"""fastattn-train: the loss goes down, checkpoints resume exactly, the masked objective,
the data pipeline, and a 2-process DistributedDataParallel run over gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fastattn
from fastattn import train as train_mod
from fastattn.models import IGNORE_INDEX
from fastattn.models.tokenizer import ByteTokenizer

SMALL = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "32",
         "--max-corpus-mb", "0.25", "--no-progress", "--log-interval", "1000"]


def run(tmp_path, *extra, out="run"):
    args = train_mod.parse_args(SMALL + ["--out", str(tmp_path / out), *extra])
    return train_mod.train(args)


def test_thirty_steps_lower_the_loss(tmp_path):
    result = run(tmp_path, "--max-steps", "30", "--lr", "3e-3", "--eval-interval", "10", "--eval-batches", "4")
    assert result.step == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = result.eval_losses
    assert sorted(evals) == [10, 20, 30] and evals[30] < evals[10]
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / train_mod.METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30] and lines[-1]["world_size"] == 1
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
    result = run(tmp_path, "--objective", "masked", "--max-steps", "12", "--lr", "3e-3", "--eval-interval", "12",
                 "--eval-batches", "2")
    assert not result.model.config.causal
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    with pytest.raises(ValueError, match="other --objective"):
        run(tmp_path, "--objective", "causal", "--max-steps", "13", "--resume")


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


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=str(Path(fastattn.__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "fastattn.train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "--objective" in done.stdout and "--resume" in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    args = train_mod.parse_args(SMALL + ["--out", out, "--max-steps", "3", "--eval-interval", "3",
                                         "--eval-batches", "1"])
    result = train_mod.train(args)
    flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
    torch.save({"params": flat, "losses": result.losses}, Path(out) / f"rank{rank}.pt")


def test_two_process_ddp_over_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]
    # Each rank saw its own batches, yet the all-reduced gradients keep the weights identical.
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    metrics = json.loads((Path(out) / train_mod.METRICS_NAME).read_text().splitlines()[-1])
    assert metrics["world_size"] == 2 and metrics["step"] == 3
    saved = train_mod.load_checkpoint(out)
    assert saved["step"] == 3 and "embed.weight" in saved["model"]
