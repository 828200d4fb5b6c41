"""The reference Transformer (fastattn.models): a training step and greedy decoding,
per backend, in tokens/s (TARGETS.md: GPT-2 medium size, seq 2048, bf16 weights,
AdamW; decode: batch 1 and 32, a 2k prompt, 256 new tokens).

A provider here is the whole model built with one backend (`auto`: each op on the
fastest of ours that serves it) from the same fp32 weights; it is checked by the
logits of one forward against the fp32 model on the naive backend, then timed: a
full training step (forward, backward, AdamW step) or one generate() call (prefill
+ new tokens through the KV cache).
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import backends
from ..reference import StoredReference
from ..spec import OpSpec, Provider, Skip, compile_settings
from ..timing import TimerSettings

TRAIN_TIMER = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3, fixed=True)
DECODE_TIMER = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=2, max_reps=2, fixed=True)


def _models():
    try:
        from ... import models
        from ...generate import generate
    except ImportError as exc:
        raise Skip(f"fastattn.models is not available ({exc})") from None
    return models, generate


class ModelSpec(OpSpec):
    self_contained = True
    rtol = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}

    def __init__(self, name, train: bool):
        super().__init__(name=name, modes=("full",) if train else ("fwd",), x_key="batch")
        self.train = train
        self.timer = TRAIN_TIMER if train else DECODE_TIMER
        self.providers = {name: _provider(name, train) for name in
                          ("naive", "torch", "naive-compile", "torch-compile", "triton", "cuda", "auto")}

    def unavailable(self) -> Optional[str]:
        try:
            _models()
        except Skip as exc:
            return str(exc)
        return None

    def sweep(self, kind):
        if self.train:
            table = {"full": [("gpt2-medium", 4, 2048)], "quick": [("gpt2-small", 4, 1024)],
                     "quick-gpu": [("gpt2-small", 4, 1024)], "cpu": [("tiny", 4, 128)],
                     "cpu-quick": [("tiny", 2, 64)]}[kind]
            return [{"preset": p, "batch": b, "seqlen": s} for p, b, s in table]
        table = {"full": [("gpt2-medium", b, 2048, 256) for b in (1, 32)],
                 "quick": [("gpt2-small", b, 512, 64) for b in (1, 32)],
                 "quick-gpu": [("gpt2-small", b, 512, 64) for b in (1, 32)],
                 "cpu": [("tiny", b, 64, 16) for b in (1, 4)],
                 "cpu-quick": [("tiny", 2, 32, 8)]}[kind]
        return [{"preset": p, "batch": b, "prompt_len": s, "new_tokens": n} for p, b, s, n in table]

    def config(self, shape):
        models, _ = _models()
        length = shape["seqlen"] if self.train else shape["prompt_len"] + shape["new_tokens"]
        base = models.TransformerConfig.from_preset(shape["preset"])
        return base.replace(max_seq_len=max(base.max_seq_len, length))

    def make_inputs(self, shape, dtype, device, generator):
        models, _ = _models()
        config = self.config(shape)
        length = shape["seqlen"] if self.train else shape["prompt_len"]
        idx = torch.randint(0, config.vocab_size, (shape["batch"], length), generator=generator, device=device)
        # Training is checked on its own batch, decoding on the first sequence's prompt.
        inputs = {"idx": idx, "check_idx": idx if self.train else idx[:1]}
        if self.train:
            inputs["targets"] = torch.randint(0, config.vocab_size, idx.shape, generator=generator, device=device)
        # One set of fp32 weights (seeded) that every provider loads.
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator, device=device)))
            model = models.GPT(config, backend="naive", device=device)
        inputs["weights"] = {k: v.detach() for k, v in model.state_dict().items()}
        return inputs

    def input_bytes(self, inputs):
        return 1 << 62  # a model never fits in L2: no input rotation

    def reference(self, inputs, shape, dout):
        models, _ = _models()
        model = models.GPT(self.config(shape), backend="naive", device=inputs["idx"].device)
        model.load_state_dict(inputs["weights"])
        with torch.no_grad():
            logits, _ = model(inputs["check_idx"])
        return StoredReference((logits.float(),), {})

    def label(self, shape):
        if self.train:
            return f"{shape['preset']} train b={shape['batch']} T={shape['seqlen']}"
        return f"{shape['preset']} decode b={shape['batch']} prompt={shape['prompt_len']} +{shape['new_tokens']}"

    def tokens(self, shape) -> int:
        return shape["batch"] * (shape["seqlen"] if self.train else shape["new_tokens"])


def _provider(name: str, train: bool):
    backend = {"naive-compile": "naive", "torch-compile": "torch"}.get(name, name)

    def factory(shape, dtype, device):
        models, generate = _models()
        if backend in backends.CONCRETE_BACKENDS:
            why = backends.backend_unavailable_reason(backend, device)
            if why is not None:
                raise Skip(why)
            if backend == "triton" and device.type != "cuda":
                raise Skip("Triton on CPU runs only in the interpreter: triton numbers need a CUDA GPU")
        if name.endswith("-compile") and not train:
            raise Skip("generation with a KV cache is not compiled here")
        if name == "naive-compile" and device.type == "cuda":
            raise Skip("compiling the whole naive model takes minutes and no target compares with it "
                       "(TARGETS.md: torch.compile of the torch backend)")
        spec = TRAIN if train else DECODE
        model = models.GPT(spec.config(shape), backend=backend, device=device, dtype=dtype)
        forward = model
        if name.endswith("-compile"):
            compile_settings()
            forward = torch.compile(model)

        def load(inputs):
            model.load_state_dict(inputs["weights"])
            return inputs

        def check(x):
            if train:  # the very call the training step makes, so a compiled model compiles it once
                with torch.enable_grad():
                    return forward(x["idx"], x["targets"])[0].detach()
            with torch.no_grad():
                return forward(x["check_idx"])[0]

        if train:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def fn(x):
                _, loss = forward(x["idx"], x["targets"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.detach()
        else:
            def fn(x):
                return generate(model, x["idx"], shape["new_tokens"], temperature=0.0)

        return Provider(name, fn, prepare=load, check_fn=check,
                        note=f"GPT {shape['preset']}, backend={backend}"
                        + (", torch.compile" if forward is not model else ""))

    return factory


TRAIN = ModelSpec("model_train", train=True)
DECODE = ModelSpec("model_decode", train=False)
