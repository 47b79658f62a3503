"""`return_per_token=True` of the fused losses: the reduced loss is unchanged and the per-token values are the
unweighted per-token losses of the float64 reference, on every path (the metric of the same pass)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdft.losses as L
from tests.losses import oracle

IMPLS = ["reference", "chunked"]
REPO = Path(__file__).resolve().parents[2]


def _inputs(n=13, h=8, v=37, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    ht = torch.randn(n, h, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    mask = torch.rand(n, generator=g) > 0.3
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    ids = torch.randint(0, v, (n, k), generator=g)
    lps = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) - 0.3
    return hs, ws, ht, wt, mask, weights, ids, lps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_fused_kl_per_token_values(impl, kind):
    hs, ws, ht, wt, mask, weights, _, _ = _inputs()
    dtype = torch.float32 if impl == "triton" else torch.float64
    args = (hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype))
    kw = dict(kind=kind, mask=mask, weights=weights.to(dtype), reduction="sum", impl=impl)
    loss, per_token = L.fused_linear_kl(*args, **kw, return_per_token=True)
    plain = L.fused_linear_kl(*args, **kw)
    truth = torch.from_numpy(oracle.divergence((hs @ ws.T).numpy(), (ht @ wt.T).numpy(), kind=kind))
    tol = 1e-4 if impl == "triton" else 1e-9
    assert torch.allclose(loss.double(), plain.double(), rtol=tol)
    assert torch.allclose(per_token.double()[mask], truth[mask], rtol=tol, atol=tol)
    assert torch.allclose(loss.double(), (truth * weights * mask).sum(), rtol=tol)
    assert not per_token.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,normalize", [("cross_entropy", "renormalize"), ("forward_kl", "tail"),
                                            ("reverse_kl", "renormalize")])
def test_fused_topk_per_token_values(impl, kind, normalize):
    hs, ws, _, _, mask, weights, ids, lps = _inputs()
    dtype = torch.float32 if impl == "triton" else torch.float64
    loss, per_token = L.fused_linear_topk_distill_loss(
        hs.to(dtype), ws.to(dtype), ids, lps.to(dtype), normalize=normalize, kind=kind, mask=mask,
        weights=weights.to(dtype), reduction="sum", impl=impl, return_per_token=True)
    truth = torch.from_numpy(oracle.topk_loss((hs @ ws.T).numpy(), ids.numpy(), lps.numpy(), normalize=normalize,
                                               kind=kind))
    tol = 1e-4 if impl == "triton" else 1e-9
    assert torch.allclose(per_token.double()[mask], truth[mask], rtol=tol, atol=tol)
    assert torch.allclose(loss.double(), (truth * weights * mask).sum(), rtol=tol)


def test_triton_per_token_values_under_the_interpreter():
    """The same checks on the Triton path (the interpreter must be on before triton is imported)."""
    pytest.importorskip("triton")
    code = ("from tests.losses import test_per_token_output as t\n"
            "for kind in ('forward', 'reverse', 'jsd'):\n    t.test_fused_kl_per_token_values('triton', kind)\n"
            "for kind, norm in (('cross_entropy', 'renormalize'), ('forward_kl', 'tail'), ('reverse_kl', 'renormalize')):\n"
            "    t.test_fused_topk_per_token_values('triton', kind, norm)\nprint('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_values_are_zero_on_masked_rows_whatever_their_inputs(impl):
    """NaN in a masked row: per-token value exactly 0 there; NaN in an unmasked row: NaN at that token only."""
    hs, ws, ht, wt, mask, weights, ids, lps = _inputs()
    masked, unmasked = int((~mask).nonzero()[0]), int(mask.nonzero()[0])
    bad = hs.clone()
    bad[masked] = float("nan")
    calls = [lambda h: L.fused_linear_kl(h, ws, ht, wt, mask=mask, weights=weights, reduction="sum", impl=impl,
                                         return_per_token=True)]
    calls += [lambda h, kind=kind: L.fused_linear_topk_distill_loss(h, ws, ids, lps, kind=kind, mask=mask,
                                                                    weights=weights, reduction="sum", impl=impl,
                                                                    return_per_token=True)
              for kind in ("cross_entropy", "reverse_kl")]
    for call in calls:
        clean_loss, clean = call(hs)
        loss, per_token = call(bad)
        assert torch.equal(loss, clean_loss) and torch.equal(per_token, clean) and per_token[masked] == 0
        worse = bad.clone()
        worse[unmasked, 0] = float("nan")
        loss, per_token = call(worse)
        assert loss.isnan() and per_token[unmasked].isnan()
        others = torch.ones_like(mask)
        others[unmasked] = False
        assert torch.equal(per_token[others], clean[others])
