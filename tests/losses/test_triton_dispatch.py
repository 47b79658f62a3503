"""The public API with impl="triton" (kernels under the Triton interpreter on CPU) against impl="chunked":
values and gradients for hidden states, weight and bias, reduced and per-token outputs."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

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

cases = [("kl-" + k, kl(k)) for k in ("forward", "reverse", "jsd")] + [("topk-" + m, topk(m)) for m in ("renormalize", "tail")]
for name, fn in cases:
    for reduction in ("seq_mean", "none"):
        a = grads("chunked", fn, reduction)
        b = grads("triton", fn, reduction)
        for label, x, y in zip(("loss", "d_hidden", "d_weight", "d_bias"), a, b):
            err = float((x - y).abs().max() / x.abs().max().clamp(min=1e-12))
            assert err < 2e-4, f"{name} {reduction} {label}: relative error {err:.2e}"
print("ok", len(cases))
'''


def test_public_api_triton_matches_chunked_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("ok 5")
