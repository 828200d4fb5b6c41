"""Backend names, availability, the default, the context manager and resolution."""

import importlib.util
import threading

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.ops import attention as attention_op
from helpers import require_module


def small_qkv():
    return torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)


def test_available_backends_lists_what_runs_here():
    names = fastattn.available_backends()
    assert names[:2] == ["naive", "torch"] and names[-1] == "auto"
    assert set(names) <= set(backends.BACKENDS)
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_set_backend_and_use_backend_nest_and_restore():
    assert fastattn.get_backend() == "auto"
    fastattn.set_backend("naive")
    assert fastattn.get_backend() == "naive"
    with fastattn.use_backend("torch"):
        assert fastattn.get_backend() == "torch"
        with fastattn.use_backend("auto"):
            assert fastattn.get_backend() == "auto"
        assert fastattn.get_backend() == "torch"
    assert fastattn.get_backend() == "naive"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with fastattn.use_backend("naive"):
            raise RuntimeError("boom")
    assert fastattn.get_backend() == "auto"


def test_use_backend_is_per_thread():
    seen = []
    with fastattn.use_backend("naive"):
        worker = threading.Thread(target=lambda: seen.append(fastattn.get_backend()))
        worker.start()
        worker.join()
    assert seen == ["auto"]


@pytest.mark.parametrize("bad", ["cudnn", "", None, 3])
def test_unknown_backend_names_are_rejected(bad):
    with pytest.raises(ValueError, match="must be one of naive, torch, triton, cuda, auto"):
        fastattn.set_backend(bad)
    if bad is not None:
        with pytest.raises(ValueError, match="backend must be one of"):
            fastattn.attention(*small_qkv(), backend=bad)


def test_the_per_call_backend_wins_over_the_default(monkeypatch):
    chosen = []
    original = attention_op.attention_fwd

    def spy(*args):
        chosen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(attention_op, "attention_fwd", spy)
    with fastattn.use_backend("torch"):
        fastattn.attention(*small_qkv())
        fastattn.attention(*small_qkv(), backend="naive")
    assert chosen == ["torch", "naive"]


def test_auto_on_cpu_prefers_torch_and_falls_back_to_naive(monkeypatch):
    chosen = []
    original = attention_op.attention_fwd
    monkeypatch.setattr(attention_op, "attention_fwd", lambda *a: chosen.append(a[-1]) or original(*a))
    fastattn.attention(*small_qkv())
    fastattn.attention(*small_qkv(), softcap=5.0)  # SDPA has no softcap
    fastattn.attention(*small_qkv(), return_lse=True)  # SDPA returns no lse
    assert chosen == ["torch", "naive", "naive"]


def test_a_backend_that_cannot_serve_the_call_says_why():
    with pytest.raises(ValueError, match="backend 'torch' cannot serve this attention call: .*softcap"):
        fastattn.attention(*small_qkv(), softcap=5.0, backend="torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve .*CUDA tensors"):
            fastattn.attention(*small_qkv(), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.backend_unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_cuda_extension_absence_is_reported_not_raised():
    reason = backends.backend_unavailable_reason("cuda")
    if torch.cuda.is_available():
        pytest.skip("this machine may have the extension")
    assert "no CUDA device" in reason


# ----------------------------------------------------------------------------- inside traced code
# Every op resolves its backend inside code that torch.compile traces; torch 2.11 and 2.12
# cannot trace importlib (2.13 folds find_spec to a constant), so availability must be
# decided outside the trace.


def test_triton_availability_is_decided_at_import_not_in_traced_code(monkeypatch):
    def no_lookups(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec was called after import")

    monkeypatch.setattr(importlib.util, "find_spec", no_lookups)
    torch._dynamo.reset()

    def f(x):
        why = backends.backend_unavailable_reason("triton", x.device)
        return x + (0.0 if why is None else 1.0)

    x = torch.zeros(3)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_the_cuda_extension_can_first_load_inside_traced_code(monkeypatch):
    """The first cuda-backend call may be a compiled one: loading fastattn._C there must
    neither break the graph nor fail (importlib cannot be traced)."""
    from fastattn import _extension

    monkeypatch.setattr(_extension, "_tried", False)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", None)
    monkeypatch.setattr(_extension, "_cuda_device_present", lambda: True)
    torch._dynamo.reset()

    def f(x):
        return x + (0.0 if backends.backend_unavailable_reason("cuda") is None else 1.0)

    x = torch.zeros(3)
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert _extension._tried
    reason = _extension.unavailable_reason()
    assert reason is None or "fastattn._C" in reason
    assert torch.equal(out, x + (0.0 if reason is None else 1.0))


def test_triton_launchers_run_with_their_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device and stream, so every public launcher
    makes its first tensor's device current (a model split over GPUs in one process)."""
    require_module("triton")
    from fastattn.kernels import _config, attention, decode, ffn, layer_norm
    from fastattn.kernels._aot_standins import standin_cuda

    launchers = [attention.attention_forward, attention.attention_backward, attention.dropout_keep_mask,
                 attention.varlen_attention_forward, attention.varlen_attention_backward,
                 decode.decode_attention_forward, decode.decode_attention_append, ffn.ffn_forward,
                 ffn.ffn_backward, ffn.gated_ffn_forward, ffn.gated_ffn_backward, layer_norm.layer_norm_forward,
                 layer_norm.layer_norm_backward]
    assert all(getattr(f, "__wrapped__", None) is not None for f in launchers)

    current = []

    class DeviceContext:  # torch.cuda.device, recorded
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    launch = _config.on_tensor_device(lambda *args, **kwargs: list(current))
    assert launch(3, torch.zeros(2)) == []  # CPU tensors: nothing to switch
    with standin_cuda(90):
        monkeypatch.setattr(torch.cuda, "device", DeviceContext)
        on_gpu = torch.empty(4, device="cuda")
        assert launch(2.0, None, x=on_gpu) == [on_gpu.device] and current == []
