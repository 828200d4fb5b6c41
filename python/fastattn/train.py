"""Train the reference Transformer: `fastattn-train` or `python -m fastattn.train`.

    fastattn-train --preset tiny --max-steps 200 --out runs/tiny
    torchrun --nproc_per_node 2 -m fastattn.train --preset tiny --device cpu   # DDP over gloo
    torchrun --nproc_per_node 8 -m fastattn.train --preset gpt2-medium        # FSDP2 over nccl

Data: a byte-level tokenizer (models/tokenizer.py) over --data (a file, or every
--glob file under a directory); by default the Python standard library's own .py
files on this machine, so nothing is downloaded. The last --val-fraction of the
token stream is held out for the evaluation loss. The preset's vocab_size becomes
the tokenizer's (258 ids, padded to 320).

Objectives: causal (next-token prediction) or masked (BERT-style: 15% of the
positions are chosen, 80% of those become MASK, 10% a random byte, 10% stay; the
loss is taken on the chosen ones; the model is built with causal=False).

AdamW (no weight decay on biases, norms and embeddings), linear warmup then cosine
decay, gradient clipping, bf16 autocast on CUDA. Under torchrun, DistributedDataParallel
(gloo on CPU, nccl on CUDA), or FSDP2 (fully_shard per block) on more than one GPU.
Every --eval-interval steps and at the end: the held-out loss, a checkpoint
(--out/checkpoint.pt: model, optimizer, step, config) and a line of --out/metrics.jsonl.
--resume continues from that checkpoint; an --out that holds another run is refused
unless --resume or --overwrite says what to do with it. Nothing is written to --out
before the first step has run (a refused device or backend leaves nothing behind).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import _cli
from .backends import BACKENDS
from ._cli import UsageError
from .models import GPT, IGNORE_INDEX, TransformerConfig
from .models.config import PRESETS, round_up
from .models.tokenizer import ByteTokenizer

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "fastattn-gpt-1"
VOCAB_MULTIPLE = 64


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog="fastattn-train", description=__doc__.split("\n\n")[0],
                            formatter_class=_cli.HelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size and shape")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TransformerConfig field, e.g. --set norm_position=post (repeatable)")
    p.add_argument("--objective", default="causal", choices=("causal", "masked"))
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in all")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="fastattn backend of every op (auto: the fastest that serves each call)")
    p.add_argument("--out", default="fastattn-run", help="directory for checkpoint.pt and metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint.pt, metrics.jsonl, config.json)")
    p.add_argument("--data", default=None,
                   help="a text file, or a directory of --glob files (default: the Python stdlib's .py files)")
    p.add_argument("--glob", default="*.py", help="files taken from a --data directory")
    p.add_argument("--max-corpus-mb", type=float, default=0.0, help="read at most this much text (0 = all)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of the token stream")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(max_seq_len, 1024))")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr of the cosine, as a fraction of --lr")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --max-steps, at most 200")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="masked objective: fraction of positions predicted")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--parallel", default="auto", choices=("auto", "ddp", "fsdp"),
                   help="with more than one process: auto = FSDP2 on CUDA, DDP on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations and checkpoints")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The parsed arguments; UsageError (one line) for a value out of range or a bad --set."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """UsageError naming the option, its value and what is accepted, for the first
    argument out of range (argparse checks only the types)."""
    finite = math.isfinite
    _cli.check_values(
        [(f"--{name.replace('_', '-')}", getattr(args, name), getattr(args, name) >= 1, ">= 1")
         for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval")]
        + [
            ("--seq-len", args.seq_len, args.seq_len is None or args.seq_len >= 1,
             ">= 1 (leave it out for min(max_seq_len, 1024))"),
            ("--warmup-steps", args.warmup_steps, args.warmup_steps is None or args.warmup_steps >= 0, ">= 0"),
            ("--lr", args.lr, finite(args.lr) and args.lr > 0, "finite and > 0"),
            ("--min-lr-ratio", args.min_lr_ratio, 0.0 <= args.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("--weight-decay", args.weight_decay, finite(args.weight_decay) and args.weight_decay >= 0,
             "finite and >= 0"),
            ("--betas", " ".join(map(str, args.betas)), all(0.0 <= b < 1.0 for b in args.betas),
             "two values in [0, 1)"),
            ("--grad-clip", args.grad_clip, finite(args.grad_clip) and args.grad_clip >= 0,
             "finite and >= 0 (0 = off)"),
            ("--max-corpus-mb", args.max_corpus_mb, finite(args.max_corpus_mb) and args.max_corpus_mb >= 0,
             "finite and >= 0 (0 = all)"),
            ("--val-fraction", args.val_fraction, 0.0 < args.val_fraction < 1.0, "in (0, 1)"),
            ("--mask-prob", args.mask_prob, 0.0 < args.mask_prob < 1.0, "in (0, 1)"),
            ("--seed", args.seed, _cli.SEED_RANGE[0] <= args.seed < _cli.SEED_RANGE[1], "in [-2**63, 2**64)"),
        ]
    )
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    try:
        build_config(args)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(f"--set {' '.join(args.overrides)}: {exc}") from None


POSITIVE_FLOAT_FIELDS = ("norm_eps", "rope_base", "init_std")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """FIELD=VALUE strings -> typed TransformerConfig changes; UsageError for an unknown
    FIELD or a VALUE of the wrong type or sign (the config checks the rest)."""
    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    defaults = TransformerConfig()
    changes: dict[str, Any] = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise UsageError(f"--set {item}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        default = getattr(defaults, name)
        if text.lower() == "none" and name in ("n_kv_heads", "d_ff"):
            value: Any = None
        elif isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"--set {item}: {name} must be true or false")
            value = text.lower() in ("true", "1")
        elif isinstance(default, int) or name in ("n_kv_heads", "d_ff"):
            try:
                value = int(text)
            except ValueError:
                raise UsageError(f"--set {item}: {name} must be an integer >= 1") from None
            if value < 1:
                raise UsageError(f"--set {item}: {name} must be >= 1")
        elif isinstance(default, float):
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"--set {item}: {name} must be a number") from None
            if name in POSITIVE_FLOAT_FIELDS and not (math.isfinite(value) and value > 0):
                raise UsageError(f"--set {item}: {name} must be finite and > 0")
            if not math.isfinite(value):
                raise UsageError(f"--set {item}: {name} must be finite")
        else:
            value = text
        changes[name] = value
    return changes


# ----------------------------------------------------------------------------- data


def stdlib_sources() -> list[Path]:
    """The standard library's own .py files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path for path in root.rglob("*.py")
        if "site-packages" not in path.parts and "dist-packages" not in path.parts and path.is_file()
    )


def corpus_files(data: Optional[str], glob: str) -> list[Path]:
    if data is None:
        files = stdlib_sources()
        if not files:
            raise FileNotFoundError("found no Python standard library sources; pass --data")
        return files
    path = Path(data)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob(glob) if p.is_file())
        if not files:
            raise FileNotFoundError(f"no {glob} files under {path}")
        return files
    raise FileNotFoundError(f"--data {data}: no such file or directory")


def load_corpus(files: list[Path], max_bytes: int = 0) -> torch.Tensor:
    """The files' bytes as one (N,) int16 token stream, EOS between documents."""
    pieces = []
    total = 0
    eos = np.array([ByteTokenizer.EOS], dtype=np.int16)
    for path in files:
        data = path.read_bytes()
        if max_bytes and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        pieces.append(np.frombuffer(data, dtype=np.uint8).astype(np.int16))
        pieces.append(eos)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    return torch.from_numpy(np.concatenate(pieces))


@dataclass
class Splits:
    train: torch.Tensor
    val: torch.Tensor


def split_corpus(tokens: torch.Tensor, val_fraction: float, seq_len: int) -> Splits:
    n_val = max(int(len(tokens) * val_fraction), seq_len + 2)
    if len(tokens) - n_val < seq_len + 2:
        raise ValueError(
            f"the corpus has {len(tokens)} tokens: too few for --seq-len {seq_len} with a held-out split"
        )
    return Splits(train=tokens[:-n_val], val=tokens[-n_val:])


def batch_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, *stream): batches are a pure
    function of the step, so a resumed run sees the batches the uninterrupted one would."""
    value = seed
    for part in stream:
        value = (value * 1_000_003 + part) % (2**62)
    return torch.Generator().manual_seed(value)


def get_batch(tokens: torch.Tensor, batch: int, seq_len: int, objective: str, mask_prob: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch, seq_len) int64, on the CPU."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator)
    window = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()  # (B, T + 1)
    if objective == "causal":
        return window[:, :-1], window[:, 1:]
    chunk = window[:, :-1]  # (B, T)
    chosen = torch.rand(chunk.shape, generator=generator) < mask_prob  # (B, T)
    chosen[0, 0] = chosen[0, 0] | ~chosen.any()  # at least one position carries a loss
    targets = torch.where(chosen, chunk, torch.full_like(chunk, IGNORE_INDEX))
    roll = torch.rand(chunk.shape, generator=generator)
    random_bytes = torch.randint(0, 256, chunk.shape, generator=generator)
    inputs = chunk.clone()
    inputs[chosen & (roll < 0.8)] = ByteTokenizer.MASK
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_bytes[swap]
    return inputs, targets


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by fastattn-train; `path` is the file or its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a foreign file
        raise ValueError(f"{path} is not a fastattn-train checkpoint (torch.load failed: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a fastattn-train checkpoint (format {found!r})")
    return payload


def load_checkpoint_for_cli(path: str | Path, option: str) -> dict:
    """load_checkpoint, with a missing or foreign file as a UsageError naming `option`."""
    try:
        return load_checkpoint(path)
    except FileNotFoundError as exc:
        raise UsageError(f"{option}: {exc}; pass a fastattn-train --out directory or its "
                         f"{CHECKPOINT_NAME}") from None
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def load_model(path: str | Path, *, device: str | torch.device = "cpu", backend: Optional[str] = None,
               dtype: Optional[torch.dtype] = None) -> GPT:
    """The trained model of a checkpoint, in eval mode."""
    return model_from_checkpoint(load_checkpoint(path), device=device, backend=backend, dtype=dtype)


def model_from_checkpoint(payload: dict, *, device: str | torch.device = "cpu", backend: Optional[str] = None,
                          dtype: Optional[torch.dtype] = None) -> GPT:
    """The model of a loaded checkpoint (load_checkpoint's payload), in eval mode."""
    model = GPT(TransformerConfig.from_dict(payload["config"]), backend=backend)
    model.load_state_dict(payload["model"])
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Process group from torchrun's environment (gloo on CPU, nccl on CUDA); the device
    (UsageError when this process cannot use it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    device = _cli.resolve_device(device_arg)
    if device.type == "cuda" and (device_arg == "auto" or device.index is None):
        device = _cli.resolve_device(f"cuda:{info.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap_parallel(model: GPT, args: argparse.Namespace, info: Dist, device: torch.device) -> torch.nn.Module:
    if info.world == 1:
        return model
    mode = args.parallel
    if mode == "auto":
        mode = "fsdp" if device.type == "cuda" else "ddp"
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # The blocks return reshaped (view) outputs, which nothing modifies in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_mean(value: float, info: Dist, device: torch.device) -> float:
    if info.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world


# ----------------------------------------------------------------------------- training


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of the linear layers only (not biases, norms, embeddings)."""
    embeddings = {id(m.weight) for m in (model.embed, model.pos_embed) if m is not None}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, args: argparse.Namespace, warmup: int) -> float:
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    progress = min(1.0, (step - warmup) / max(1, args.max_steps - warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * progress))


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    choice = args.amp
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


@dataclass
class TrainResult:
    """What a run did: the model (unwrapped), the step reached, the training losses
    (one per step, this process's), the held-out losses by step, and tokens/s."""

    model: GPT
    step: int
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_second: float = 0.0


class _Progress:
    """A tqdm bar when tqdm is installed and wanted, else a log line every log_interval."""

    def __init__(self, enabled: bool, bar: bool, start: int, total: int, log_interval: int):
        self.enabled, self.log_interval, self.bar = enabled, log_interval, None
        if enabled and bar:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, tokens_per_s: Optional[float], lr: float) -> None:
        """tokens_per_s None: not measured yet (shown only once it is)."""
        if not self.enabled:
            return
        speed = {} if tokens_per_s is None else {"tok_s": f"{tokens_per_s:,.0f}"}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", **speed, lr=f"{lr:.2e}", refresh=False)
        elif (step + 1) % self.log_interval == 0:
            measured = "" if tokens_per_s is None else f", {tokens_per_s:,.0f} tokens/s"
            self.write(f"step {step + 1}: loss {loss:.4f}{measured}, lr {lr:.2e}")

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model: torch.nn.Module, splits: Splits, args: argparse.Namespace, seq_len: int,
             device: torch.device, amp: Optional[torch.dtype]) -> float:
    """Mean loss over --eval-batches fixed held-out batches (the same at every evaluation)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(args.eval_batches):
        generator = batch_generator(args.seed, 2, i)
        x, y = get_batch(splits.val, args.batch_size, seq_len, args.objective, args.mask_prob, generator)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / args.eval_batches


def _model_state(model: torch.nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, payload: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, payload["model"], options=options)
    set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=options)


def build_config(args: argparse.Namespace) -> TransformerConfig:
    changes = {"vocab_size": round_up(ByteTokenizer.vocab_size, VOCAB_MULTIPLE)}
    if args.objective == "masked":
        changes["causal"] = False
    changes.update(parse_overrides(args.overrides))
    return TransformerConfig.from_preset(args.preset, **changes)


def train(args: argparse.Namespace) -> TrainResult:
    info, device = init_distributed(args.device)
    try:
        return _train(args, info, device)
    finally:
        if info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, "config.json")


def _check_out(out: Path, args: argparse.Namespace) -> None:
    """--out may be new or empty, or hold a run that --resume continues or --overwrite
    replaces; anything else is refused before any work."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; pass another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")


def _start_run_files(out: Path, args: argparse.Namespace, config: TransformerConfig) -> None:
    """After the first step: (with --overwrite, the old run's files removed) --out made
    and config.json written."""
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            (out / name).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def _train(args: argparse.Namespace, info: Dist, device: torch.device) -> TrainResult:
    out = Path(args.out)
    checkpoint_path = out / CHECKPOINT_NAME
    _check_out(out, args)
    _cli.check_backend_runs(args.backend, device)
    payload = load_checkpoint_for_cli(checkpoint_path, "--resume") if args.resume and checkpoint_path.is_file() \
        else None
    if args.resume and payload is None and info.main:
        print(f"--resume: no checkpoint at {checkpoint_path}, starting from scratch", file=sys.stderr)
    config = TransformerConfig.from_dict(payload["config"]) if payload else build_config(args)
    if payload and (not config.causal) != (args.objective == "masked"):
        raise UsageError(f"{checkpoint_path} was trained with the other --objective; pass --objective "
                         f"{'causal' if config.causal else 'masked'} to resume it")
    seq_len = args.seq_len if args.seq_len is not None else min(config.max_seq_len, 1024)
    if config.positions == "learned" and seq_len > config.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}; pass a "
                         f"--seq-len of at most {config.max_seq_len}")

    try:
        files = corpus_files(args.data, args.glob)
    except FileNotFoundError as exc:
        raise UsageError(f"{exc}") from None
    tokens = load_corpus(files, int(args.max_corpus_mb * 2**20))
    try:
        splits = split_corpus(tokens, args.val_fraction, seq_len)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass more --data or a smaller --seq-len") from None

    torch.manual_seed(args.seed)
    model = GPT(config, backend=args.backend, device=device)
    model.train()
    core = model
    if args.compile:
        model = torch.compile(model)
    model = wrap_parallel(model, args, info, device)
    sharded = any(type(p).__name__ == "DTensor" for p in core.parameters())
    optimizer = torch.optim.AdamW(
        param_groups(core, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
        fused=device.type == "cuda" and not sharded,
    )
    start_step = 0
    if payload is not None:
        _restore(model, optimizer, payload)
        start_step = int(payload["step"])
    amp = autocast_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(200, args.max_steps // 10)

    if info.main:
        print(
            f"fastattn-train: {args.preset} ({core.num_parameters() / 1e6:.2f}M parameters), "
            f"{args.objective} objective, backend {args.backend}, device {device}, "
            f"{info.world} process(es); corpus {len(files)} file(s), {len(splits.train):,} train / "
            f"{len(splits.val):,} held-out tokens; steps {start_step}..{args.max_steps}",
            file=sys.stderr, flush=True,
        )
    result = TrainResult(model=core, step=start_step)
    progress = _Progress(info.main, not args.no_progress, start_step, args.max_steps, args.log_interval)
    tokens_per_step = args.batch_size * seq_len * args.grad_accum * info.world
    window_start, window_steps = time.perf_counter(), 0
    tokens_per_s: Optional[float] = None  # until the first --log-interval steps are timed
    try:
        for step in range(start_step, args.max_steps):
            lr = learning_rate(step, args, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(args.grad_accum):
                generator = batch_generator(args.seed, 1, info.rank, step, micro)
                x, y = get_batch(splits.train, args.batch_size, seq_len, args.objective, args.mask_prob,
                                 generator)
                last = micro == args.grad_accum - 1
                sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    scaler.scale(loss / args.grad_accum).backward()
                step_loss += float(loss.detach()) / args.grad_accum
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if step == start_step and info.main:
                _start_run_files(out, args, config)
            result.losses.append(step_loss)
            result.step = step + 1
            window_steps += 1
            evaluating = (step + 1) % args.eval_interval == 0 or step + 1 == args.max_steps
            if (step + 1) % args.log_interval == 0 or evaluating:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * window_steps / max(now - window_start, 1e-9)
                window_start, window_steps = now, 0
                result.tokens_per_second = tokens_per_s
            progress.step(step, step_loss, tokens_per_s, lr)
            if evaluating:
                eval_loss = evaluate(model, splits, args, seq_len, device, amp)
                result.eval_losses[step + 1] = eval_loss
                train_loss = all_mean(step_loss, info, device)
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "config": config.to_dict(),
                    "model": _model_state(model),
                    "optimizer": _optimizer_state(model, optimizer),
                    "step": step + 1,
                    "objective": args.objective,
                    "tokenizer": "bytes",
                }
                if info.main:
                    save_checkpoint(checkpoint_path, state)
                    record = {"step": step + 1, "train_loss": train_loss, "eval_loss": eval_loss,
                              "lr": lr, "tokens_per_s": tokens_per_s, "world_size": info.world,
                              "backend": args.backend, "device": str(device)}
                    with open(out / METRICS_NAME, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    progress.write(f"step {step + 1}: train loss {train_loss:.4f}, eval loss {eval_loss:.4f}, "
                                   f"{tokens_per_s:,.0f} tokens/s; checkpoint {checkpoint_path}")
                if info.world > 1:
                    dist.barrier()
                window_start = time.perf_counter()  # evaluation and saving are not training time
    except ValueError as exc:
        refusal = _cli.backend_refusal(exc)
        if refusal is None:
            raise
        raise UsageError(f"--backend {args.backend}: {refusal}; pick another --backend (auto serves every call)") \
            from None
    finally:
        progress.close()
    if info.main and result.eval_losses:
        print(f"fastattn-train: checkpoint of step {result.step} in {checkpoint_path}, metrics in "
              f"{out / METRICS_NAME}; sample with: fastattn-generate --checkpoint {out}", flush=True)
    return result


def _main(argv: Optional[list[str]]) -> None:
    train(parse_args(argv))


def main(argv: Optional[list[str]] = None) -> int:
    """The fastattn-train command: exit status 0, or 2 with one line for a user error."""
    return _cli.run("fastattn-train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
