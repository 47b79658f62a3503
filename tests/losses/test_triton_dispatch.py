"""The public API with impl="triton" (kernels under the Triton interpreter on CPU) against impl="chunked":
values and gradients for hidden states, weight and bias, reduced and per-token outputs; and the clear errors
where impl="triton" cannot run (CPU tensors without the interpreter, Triton not installed)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r'''
import torch
import sdft.losses as L

torch.manual_seed(0)
n, h, ht, v = 21, 16, 12, 131
hs = torch.randn(n, h, dtype=torch.float32)
ws = torch.randn(v, h) * 0.5
bs = torch.randn(v)
th = torch.randn(n, ht)
tw = torch.randn(v, ht) * 0.5
mask = torch.rand(n) > 0.25
seq_ids = torch.arange(n) // 4

def grads(impl, fn, reduction):
    x, w, b = hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()
    out = fn(x, w, b, impl, reduction)
    total = (out * torch.linspace(0.5, 1.5, out.numel())).sum() if reduction == "none" else out
    total.backward()
    return out.detach(), x.grad, w.grad, b.grad

def kl(kind):
    return lambda x, w, b, impl, reduction: L.fused_linear_kl(
        x, w, th, tw, kind=kind, beta=0.3, temperature=1.3, mask=mask, reduction=reduction, seq_ids=seq_ids,
        student_bias=b, impl=impl)

ids, lps = L.fused_linear_topk(th, tw, 5, impl="chunked")
t_ids, t_lps = L.fused_linear_topk(th, tw, 5, impl="triton")
assert torch.equal(ids, t_ids), "top-K ids differ"
assert (lps - t_lps).abs().max() < 1e-5, "top-K log-probs differ"

def topk(normalize):
    return lambda x, w, b, impl, reduction: L.fused_linear_topk_distill_loss(
        x, w, ids, lps, normalize=normalize, mask=mask, reduction=reduction, seq_ids=seq_ids, student_bias=b,
        impl=impl)

def reverse_topk(x, w, b, impl, reduction):
    return L.fused_linear_topk_distill_loss(x, w, ids, lps, kind="reverse_kl", temperature=0.9, mask=mask,
                                            reduction=reduction, seq_ids=seq_ids, student_bias=b, impl=impl)

cases = [("kl-" + k, kl(k)) for k in ("forward", "reverse", "jsd")] + [("topk-" + m, topk(m)) for m in ("renormalize", "tail")]
cases.append(("topk-reverse_kl", reverse_topk))
for name, fn in cases:
    for reduction in ("seq_mean", "none"):
        a = grads("chunked", fn, reduction)
        b = grads("triton", fn, reduction)
        for label, x, y in zip(("loss", "d_hidden", "d_weight", "d_bias"), a, b):
            err = float((x - y).abs().max() / x.abs().max().clamp(min=1e-12))
            assert err < 2e-4, f"{name} {reduction} {label}: relative error {err:.2e}"
print("ok", len(cases))
'''


@needs_triton
def test_public_api_triton_matches_chunked_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("ok 6")


NO_INTERPRETER = r'''
import torch
import sdft.losses as L

h, w = torch.randn(4, 8), torch.randn(11, 8)
ids, lps = L.fused_linear_topk(h, w, 3, impl="chunked")
calls = {
    "fused_linear_kl": lambda: L.fused_linear_kl(h, w, h, w, impl="triton"),
    "fused_linear_topk_distill_loss": lambda: L.fused_linear_topk_distill_loss(h, w, ids, lps, impl="triton"),
    "reverse_kl": lambda: L.fused_linear_topk_distill_loss(h, w, ids, lps, kind="reverse_kl", impl="triton"),
    "fused_linear_topk": lambda: L.fused_linear_topk(h, w, 3, impl="triton"),
    "fused_linear_token_logprobs": lambda: L.fused_linear_token_logprobs(h, w, ids[:, 0], impl="triton"),
}
for name, call in calls.items():
    try:
        call()
        print(name, "no error")
    except ValueError as e:
        print(name, "ValueError:", e)
'''


@needs_triton
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    """Where Triton has no driver (CPU tensors, no TRITON_INTERPRET), impl='triton' fails at the public function
    with what is allowed, not deep inside Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", NO_INTERPRETER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5
    for line in lines:
        assert "ValueError: impl='triton' got tensors on device 'cpu'" in line, line
        for allowed in ("CUDA tensors", "TRITON_INTERPRET=1", "impl='chunked'", "impl='auto'"):
            assert allowed in line, (allowed, line)


def test_triton_not_installed_is_a_clear_error(monkeypatch):
    import torch

    import sdft.losses as L
    from sdft.losses import fused

    real_find_spec = fused.importlib.util.find_spec
    monkeypatch.setattr(fused.importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "triton" else real_find_spec(name, *a, **kw))
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    ids = torch.zeros(4, 2, dtype=torch.long)
    for call in (lambda: L.fused_linear_kl(h, w, h, w, impl="triton"),
                 lambda: L.fused_linear_topk_distill_loss(h, w, ids, torch.zeros(4, 2), impl="triton"),
                 lambda: L.fused_linear_topk(h, w, 3, impl="triton"),
                 lambda: L.fused_linear_token_logprobs(h, w, ids[:, 0], impl="triton")):
        with pytest.raises(ValueError, match=r"impl='triton' needs the triton package.*pip install 'sdft\[triton\]'"
                                             r".*impl='chunked'"):
            call()
    assert L.resolve_impl("auto", torch.device("cpu")) == "chunked"  # auto never needs it
