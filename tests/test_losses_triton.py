"""Triton loss kernels (sdft.losses.triton_kl, triton_topk) against the float64 reference.

The kernels run on CPU under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before
triton is first imported. To stay independent of whatever other test modules imported, the checks run in
subprocesses that execute this file as a script:
  interpret  every `check_*` function below, on tiny odd shapes (values, gradients, masks, ties, ...);
  compile    every kernel compiled for sm_90 (H100) with the ptxas bundled in the triton wheel, at the
             CUDA tile configuration: catches what the interpreter does not check (dot shapes, layouts,
             constexpr globals, register spills).
A CUDA test compares the Triton path with the chunked path at a realistic shape when a GPU is present.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton loss kernels cannot run (pip install triton)",
                allow_module_level=True)


# ----------------------------------------------------------------------------------------------------
# helpers shared by the checks (run inside the subprocess)
# ----------------------------------------------------------------------------------------------------

def _tiles(**overrides):
    from dataclasses import replace

    from sdft.losses.triton_common import INTERPRETER_TILES
    return replace(INTERPRETER_TILES, **overrides)


def _rel_err(value, truth) -> float:
    value, truth = value.detach().double(), truth.detach().double()
    return float((value - truth).abs().max() / truth.abs().max().clamp(min=1e-30))


def _assert_close(name, value, truth, tol):
    assert value is not None and torch.isfinite(value).all(), f"{name}: not finite"
    err = _rel_err(value, truth)
    assert err <= tol, f"{name}: max error {err:.3g} relative to max |truth| exceeds {tol:g}"


def _problem(n=29, h=21, ht=13, v=157, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g) * scale
    ws = torch.randn(v, h, generator=g) * 0.5
    ht_ = torch.randn(n, ht, generator=g) * scale
    wt = torch.randn(v, ht, generator=g) * 0.5
    bs = torch.randn(v, generator=g)
    bt = torch.randn(v, generator=g)
    c = torch.rand(n, generator=g) + 0.5
    c[torch.rand(n, generator=g) < 0.3] = 0.0  # masked tokens
    return hs.to(dtype), ws.to(dtype), ht_.to(dtype), wt.to(dtype), bs, bt, c


def _kl_truth(hs, ws, ht, wt, bs, bt, c, kind, beta, temperature):
    """float64 reference: per-token loss (0 where c = 0) and gradients of sum_n c_n L_n."""
    from sdft.losses import reference
    h = hs.detach().double().requires_grad_()
    w = ws.detach().double().requires_grad_()
    b = None if bs is None else bs.detach().double().requires_grad_()
    zs = h @ w.T + (0 if b is None else b)
    zt = ht.double() @ wt.double().T + (0 if bt is None else bt.double())
    per = reference.kl_divergence(zs, zt, kind=kind, beta=beta, temperature=temperature, reduction="none")
    per = torch.where(c != 0, per, torch.zeros_like(per))
    (per * c.double()).sum().backward()
    return per.detach(), h.grad, w.grad, None if b is None else b.grad


def _distill_truth(hs, ws, bs, ids, lps, c, normalize, kind, temperature):
    from sdft.losses import reference
    h = hs.detach().double().requires_grad_()
    w = ws.detach().double().requires_grad_()
    b = None if bs is None else bs.detach().double().requires_grad_()
    z = h @ w.T + (0 if b is None else b)
    per = reference.topk_distill_loss(z, ids, lps.double(), normalize=normalize, kind=kind,
                                      temperature=temperature, reduction="none")
    per = torch.where(c != 0, per, torch.zeros_like(per))
    (per * c.double()).sum().backward()
    return per.detach(), h.grad, w.grad, None if b is None else b.grad


def _check_against(out, truth, tol, need_weight_grad=True):
    loss, dh, dw, db = out
    t_loss, t_dh, t_dw, t_db = truth
    assert loss.dtype == torch.float32 and dh.dtype == torch.float32
    _assert_close("loss", loss, t_loss, tol)
    _assert_close("grad_hidden", dh, t_dh, tol)
    if need_weight_grad:
        _assert_close("grad_weight", dw, t_dw, tol)
    else:
        assert dw is None, "grad_weight must be None without need_weight_grad"
    if t_db is not None:
        _assert_close("grad_bias", db, t_db, tol)


def _masked_rows_exact(out, c):
    loss, dh = out[0], out[1]
    rows = c == 0
    assert torch.equal(loss[rows], torch.zeros_like(loss[rows])), "masked tokens must have loss exactly 0"
    assert torch.equal(dh[rows], torch.zeros_like(dh[rows])), "masked tokens must have gradient exactly 0"


def _teacher_topk(n, v, k, seed, h=11):
    """Teacher ids / log-probs from a random teacher (distinct ids per row), float32."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, h, generator=g, dtype=torch.float64) @ torch.randn(v, h, generator=g, dtype=torch.float64).T
    lps, ids = torch.log_softmax(z, dim=1).topk(k, dim=1)
    return ids, lps.float()


# ----------------------------------------------------------------------------------------------------
# interpreter checks: each raises AssertionError on failure
# ----------------------------------------------------------------------------------------------------

def check_kl_kinds_fp32():
    """forward / reverse / jsd, T != 1, biases, Ht != H, odd N/V/H, masked tokens, weight and bias grads."""
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, bs, bt, c = _problem()
    for kind, beta in (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.85)):
        out = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=0.7, token_scale=c,
                                     student_bias=bs, teacher_bias=bt, need_weight_grad=True)
        try:
            _check_against(out, _kl_truth(hs, ws, ht, wt, bs, bt, c, kind, beta, 0.7), 2e-5)
            _masked_rows_exact(out, c)
        except AssertionError as e:
            raise AssertionError(f"kind={kind} beta={beta}: {e}") from None


def check_kl_jsd_endpoints_and_no_bias():
    """jsd with beta 0 / 1 is exactly forward / reverse KL; no biases; no weight gradient; T = 1.3."""
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, _, _, c = _problem(n=19, h=17, ht=17, v=83, seed=1)
    for beta, kind in ((0.0, "forward"), (1.0, "reverse")):
        a = triton_fused_linear_kl(hs, ws, ht, wt, kind="jsd", beta=beta, temperature=1.3, token_scale=c,
                                   need_weight_grad=False)
        b = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, temperature=1.3, token_scale=c, need_weight_grad=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"jsd beta={beta} differs from {kind}"
        assert a[2] is None and a[3] is None
        _check_against(a, _kl_truth(hs, ws, ht, wt, None, None, c, kind, 0.5, 1.3), 2e-5, need_weight_grad=False)


def check_kl_splits_and_chunks():
    """Every vocabulary split one tile, dz in chunks of one row block, a non-contiguous hidden input."""
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, bs, bt, c = _problem(n=37, h=24, ht=10, v=131, seed=2)
    hs_t = hs.T.contiguous().T  # column-major view
    for tiles in (_tiles(programs=10_000), _tiles(block_n=32, block_v=64, block_h=16, programs=1)):
        out = triton_fused_linear_kl(hs_t, ws, ht, wt, kind="reverse", temperature=0.9, token_scale=c,
                                     student_bias=bs, teacher_bias=bt, need_weight_grad=True, tiles=tiles,
                                     max_dz_bytes=1)
        _check_against(out, _kl_truth(hs, ws, ht, wt, bs, bt, c, "reverse", 0.5, 0.9), 2e-5)


def check_kl_all_masked():
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, bs, bt, _ = _problem(n=9, v=50, seed=3)
    c = torch.zeros(9)
    for kind in ("forward", "reverse", "jsd"):
        loss, dh, dw, db = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, token_scale=c, student_bias=bs,
                                                  teacher_bias=bt, need_weight_grad=True)
        for name, t in (("loss", loss), ("grad_hidden", dh), ("grad_weight", dw), ("grad_bias", db)):
            assert torch.equal(t, torch.zeros_like(t)), f"{kind}: all-masked {name} is not exactly 0"


def _no_worse_than_chunked(label, mine, chunked, truth, scales):
    """Errors of (loss, dh, dW, db) vs the float64 truth at most 2x the chunked path's errors, plus 1e-6
    of each output's natural scale (|truth| can be ~0 where fp32 rounding is all that is left)."""
    for name, m, ch, t, s in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), mine, chunked, truth, scales):
        assert torch.isfinite(m).all(), f"{label} {name}: not finite"
        e_mine = float((m.double() - t).abs().max())
        e_chunked = float((ch.double() - t).abs().max())
        assert e_mine <= 2 * e_chunked + 1e-6 * s, \
            f"{label} {name}: error {e_mine:.3g} vs chunked {e_chunked:.3g} (scale {s:.3g})"


def _chunked_outputs(fn, hs, ws, bs, c, **kw):
    h, w, b = hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()
    per = fn(h, w, student_bias=b, reduction="none", impl="chunked", **kw)
    per = torch.where(c != 0, per, torch.zeros_like(per))
    (per * c).sum().backward()
    return per.detach(), h.grad, w.grad, b.grad


def _natural_scales(truth, hs, ws, c, temperature):
    top = float(c.abs().max()) / temperature
    return (float(truth[0].abs().max()) + 1.0, top * float(ws.abs().max()), top * float(hs.abs().max()), top)


def check_kl_extreme_logits():
    """Logits of magnitude ~1e4 (and a -inf teacher bias entry): finite, and as accurate as the chunked
    fp32 path (log-probs are formed as (a - max) - log-sum, exact near the maximum)."""
    import sdft.losses as L
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, bs, bt, c = _problem(n=13, h=16, ht=16, v=67, seed=4)
    ws, wt = ws * 800.0, wt * 800.0
    bt = bt.clone()
    bt[5] = -math.inf
    bt_truth = bt.clone()
    bt_truth[5] = -1e30
    for kind, beta in (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5)):
        out = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=1.0, token_scale=c,
                                     student_bias=bs, teacher_bias=bt, need_weight_grad=True)
        truth = _kl_truth(hs, ws, ht, wt, bs, bt_truth, c, kind, beta, 1.0)
        assert (hs @ ws.T).abs().max() > 5e3 and (kind == "jsd" or truth[0].abs().max() > 100), "not extreme"
        chunked = _chunked_outputs(lambda h, w, **kw: L.fused_linear_kl(h, w, ht, wt, **kw), hs, ws, bs, c,
                                   kind=kind, beta=beta, teacher_bias=bt)
        _no_worse_than_chunked(kind, out, chunked, truth, _natural_scales(truth, hs, ws, c, 1.0))


def check_kl_bf16_beats_naive():
    """bf16 inputs: error vs float64 truth (on the same bf16 values) no worse than naive bf16 PyTorch."""
    from sdft.losses import reference
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, _, _, c = _problem(n=31, h=48, ht=40, v=199, scale=3.0, seed=5, dtype=torch.bfloat16)
    for kind, beta in (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5)):
        truth = _kl_truth(hs, ws, ht, wt, None, None, c, kind, beta, 1.0)
        mine = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, token_scale=c, need_weight_grad=True)
        h = hs.clone().requires_grad_()
        w = ws.clone().requires_grad_()
        per = reference.kl_divergence(h @ w.T, ht @ wt.T, kind=kind, beta=beta, reduction="none")
        per = torch.where(c != 0, per, torch.zeros_like(per))
        (per * c).sum().backward()
        naive = (per.detach(), h.grad, w.grad)
        for name, m, nv, t in zip(("loss", "grad_hidden", "grad_weight"), mine[:3], naive, truth[:3]):
            e_mine, e_naive = _rel_err(m, t), _rel_err(nv, t)
            assert e_mine <= max(e_naive, 1e-3), f"{kind} {name}: triton error {e_mine:.3g} > naive bf16 {e_naive:.3g}"
            assert e_mine <= 1e-2, f"{kind} {name}: triton error {e_mine:.3g} vs float64 truth"


def check_kl_fp16():
    """fp16 inputs (fp16 tensor-core logits, fp32 dz staging): close to the float64 truth."""
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, bs, bt, c = _problem(n=21, h=24, ht=16, v=97, seed=17, dtype=torch.float16)
    for kind, beta in (("forward", 0.5), ("jsd", 0.25)):
        out = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=0.8, token_scale=c,
                                     student_bias=bs, teacher_bias=bt, need_weight_grad=True)
        _check_against(out, _kl_truth(hs, ws, ht, wt, bs, bt, c, kind, beta, 0.8), 1e-4)


def check_kl_matches_chunked_path():
    """Same reduced loss and gradients as sdft.losses.fused_linear_kl(impl="chunked") with token_mean."""
    import sdft.losses as L
    from sdft.losses._reduction import token_scale
    from sdft.losses.triton_kl import triton_fused_linear_kl
    hs, ws, ht, wt, bs, bt, _ = _problem(n=23, h=15, ht=15, v=101, seed=6)
    mask = torch.arange(23) % 4 != 1
    weights = torch.rand(23, generator=torch.Generator().manual_seed(1)) + 0.5
    h, w, b = hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()
    ref = L.fused_linear_kl(h, w, ht, wt, kind="jsd", beta=0.4, temperature=1.2, mask=mask, weights=weights,
                            reduction="token_mean", student_bias=b, teacher_bias=bt, impl="chunked")
    ref.backward()
    c = token_scale(23, hs.device, mask=mask, weights=weights, reduction="token_mean")
    loss, dh, dw, db = triton_fused_linear_kl(hs, ws, ht, wt, kind="jsd", beta=0.4, temperature=1.2, token_scale=c,
                                              student_bias=bs, teacher_bias=bt, need_weight_grad=True)
    _assert_close("reduced loss", (c * loss).sum(), ref.detach(), 2e-5)
    for name, mine, theirs in (("grad_hidden", dh, h.grad), ("grad_weight", dw, w.grad), ("grad_bias", db, b.grad)):
        _assert_close(name, mine, theirs, 2e-5)


def check_matmul_fp32():
    from sdft.losses.triton_common import matmul_fp32
    g = torch.Generator().manual_seed(7)
    a = torch.randn(45, 70, generator=g)
    b = torch.randn(33, 45, generator=g)
    out = torch.randn(70, 33, generator=g)
    expected = out.double() + a.double().T @ b.double().T
    matmul_fp32(a.T, b.T, out, accumulate=True, cfg=_tiles(), exact_fp32=True)
    _assert_close("a^T b^T + c", out, expected, 1e-6)
    a16 = a.to(torch.bfloat16)
    out2 = torch.empty(70, 70)
    matmul_fp32(a16.T, a16, out2, accumulate=False, cfg=_tiles(), exact_fp32=False)
    _assert_close("bf16 a^T a", out2, a16.double().T @ a16.double(), 1e-6)


def check_topk_exact_with_ties():
    """ids exactly equal to a stable float64 sort (ties -> lower id, -0.0 == +0.0), log-probs over all V."""
    from sdft.losses.triton_topk import triton_fused_linear_topk
    g = torch.Generator().manual_seed(8)
    n, h, v = 23, 9, 157
    hs = torch.randint(-2, 3, (n, h), generator=g).float()
    ws = torch.randint(-2, 3, (v, h), generator=g).float()
    ws[100] = ws[3]
    ws[40] = ws[7]
    bias = torch.zeros(v)
    bias[::3] = -0.0
    for k, temperature, b in ((1, 1.0, None), (7, 0.7, bias), (16, 1.0, bias), (40, 2.0, None)):
        ids, lps = triton_fused_linear_topk(hs, ws, k, bias=b, temperature=temperature)
        z = (hs.double() @ ws.double().T + (0 if b is None else b.double())) / temperature
        order = torch.sort(-z, dim=1, stable=True).indices[:, :k]
        assert ids.dtype == torch.int64 and lps.dtype == torch.float32
        assert torch.equal(ids, order), f"k={k}: ids differ from the stable float64 order"
        _assert_close(f"k={k} logprobs", lps, torch.log_softmax(z, dim=1).gather(1, order), 1e-6)
    ids, lps = triton_fused_linear_topk(hs[:5], ws[:37], 37)  # K = V
    z = hs[:5].double() @ ws[:37].double().T
    assert torch.equal(ids, torch.sort(-z, dim=1, stable=True).indices), "K = V"


def check_topk_random_and_extreme():
    from sdft.losses.triton_topk import triton_fused_linear_topk
    hs, ws, _, _, bs, _, _ = _problem(n=33, h=19, v=211, seed=9)
    for scale, tiles in ((1.0, _tiles()), (3000.0, _tiles(block_n=32, block_v=64, programs=1000))):
        ids, lps = triton_fused_linear_topk(hs, ws * scale, 5, bias=bs, temperature=0.9, tiles=tiles)
        z = (hs.double() @ (ws * scale).double().T + bs.double()) / 0.9
        order = torch.sort(-z, dim=1, stable=True).indices[:, :5]
        assert torch.equal(ids, order), f"scale={scale}: ids differ"
        _assert_close(f"scale={scale} logprobs", lps, torch.log_softmax(z, dim=1).gather(1, order), 1e-6)
        assert torch.isfinite(lps).all()


def _distill_inputs(n=27, h=17, v=143, k=9, seed=10, dtype=torch.float32):
    hs, ws, _, _, bs, _, c = _problem(n=n, h=h, v=v, seed=seed, dtype=dtype)
    ids, lps = _teacher_topk(n, v, k, seed + 1)
    ids = ids.clone()
    ids[0, 2] = -1
    ids[1, :] = v + 3          # a row with no valid id
    ids[2, 4] = v
    ids[3, 0] = -7
    ids[4, 1] = ids[4, 3]      # a repeated id
    c[1] = 1.0                 # the invalid row is not masked
    c[4] = 1.0
    return hs, ws, bs, ids, lps, c


def check_topk_distill_all_modes():
    """renormalize / tail x cross_entropy / forward_kl, T != 1, bias, invalid and repeated ids, masks."""
    from sdft.losses.triton_topk import triton_fused_linear_topk_distill
    hs, ws, bs, ids, lps, c = _distill_inputs()
    for normalize in ("renormalize", "tail"):
        for kind in ("cross_entropy", "forward_kl"):
            out = triton_fused_linear_topk_distill(hs, ws, ids, lps, normalize=normalize, kind=kind,
                                                   temperature=0.8, token_scale=c, student_bias=bs,
                                                   need_weight_grad=True)
            try:
                _check_against(out, _distill_truth(hs, ws, bs, ids, lps, c, normalize, kind, 0.8), 2e-5)
                _masked_rows_exact(out, c)
                assert out[0][1] == 0 and torch.equal(out[1][1], torch.zeros_like(out[1][1])), \
                    "a row without a valid id must have loss 0 and zero gradient"
            except AssertionError as e:
                raise AssertionError(f"{normalize}/{kind}: {e}") from None


def check_topk_distill_splits_chunks_and_masks():
    from sdft.losses.triton_topk import triton_fused_linear_topk_distill
    hs, ws, bs, ids, lps, c = _distill_inputs(n=21, h=12, v=97, k=5, seed=12)
    out = triton_fused_linear_topk_distill(hs, ws, ids, lps, normalize="tail", kind="forward_kl", token_scale=c,
                                           need_weight_grad=False, tiles=_tiles(programs=10_000), max_dz_bytes=1)
    _check_against(out, _distill_truth(hs, ws, None, ids, lps, c, "tail", "forward_kl", 1.0), 2e-5,
                   need_weight_grad=False)
    zero = torch.zeros(21)
    loss, dh, dw, db = triton_fused_linear_topk_distill(hs, ws, ids, lps, token_scale=zero, student_bias=bs,
                                                        need_weight_grad=True)
    for name, t in (("loss", loss), ("grad_hidden", dh), ("grad_weight", dw), ("grad_bias", db)):
        assert torch.equal(t, torch.zeros_like(t)), f"all-masked {name} is not exactly 0"


def check_topk_distill_extreme_logits():
    """Logits ~1e4: the student's tail mass underflows in probability space but not in log space."""
    import sdft.losses as L
    from sdft.losses.triton_topk import triton_fused_linear_topk_distill
    hs, ws, bs, ids, lps, c = _distill_inputs(n=15, h=16, v=71, k=6, seed=14)
    ws = ws * 700.0
    for normalize, kind in (("tail", "cross_entropy"), ("tail", "forward_kl"), ("renormalize", "forward_kl")):
        out = triton_fused_linear_topk_distill(hs, ws, ids, lps, normalize=normalize, kind=kind, token_scale=c,
                                               student_bias=bs, need_weight_grad=True)
        truth = _distill_truth(hs, ws, bs, ids, lps, c, normalize, kind, 1.0)
        assert truth[0].abs().max() > 100, "the problem is not extreme"
        chunked = _chunked_outputs(lambda h, w, **kw: L.fused_linear_topk_distill_loss(h, w, ids, lps, **kw),
                                   hs, ws, bs, c, normalize=normalize, kind=kind)
        _no_worse_than_chunked(f"{normalize}/{kind}", out, chunked, truth, _natural_scales(truth, hs, ws, c, 1.0))


def check_topk_distill_bf16_beats_naive():
    from sdft.losses import reference
    from sdft.losses.triton_topk import triton_fused_linear_topk_distill
    hs, ws, _, ids, lps, c = _distill_inputs(n=25, h=40, v=181, k=8, seed=16, dtype=torch.bfloat16)
    hs = hs * 3
    for normalize in ("renormalize", "tail"):
        truth = _distill_truth(hs, ws, None, ids, lps, c, normalize, "forward_kl", 1.0)
        mine = triton_fused_linear_topk_distill(hs, ws, ids, lps, normalize=normalize, kind="forward_kl",
                                                token_scale=c, need_weight_grad=True)
        h = hs.clone().requires_grad_()
        w = ws.clone().requires_grad_()
        per = reference.topk_distill_loss(h @ w.T, ids, lps, normalize=normalize, kind="forward_kl", reduction="none")
        per = torch.where(c != 0, per, torch.zeros_like(per))
        (per * c).sum().backward()
        for name, m, nv, t in zip(("loss", "grad_hidden", "grad_weight"), mine[:3], (per.detach(), h.grad, w.grad),
                                  truth[:3]):
            e_mine, e_naive = _rel_err(m, t), _rel_err(nv, t)
            assert e_mine <= max(e_naive, 1e-3), f"{normalize} {name}: triton {e_mine:.3g} > naive bf16 {e_naive:.3g}"


def check_bad_arguments():
    from sdft.losses.triton_kl import triton_fused_linear_kl
    from sdft.losses.triton_topk import triton_fused_linear_topk, triton_fused_linear_topk_distill
    hs, ws, ht, wt, _, _, c = _problem(n=5, v=20)
    cases = [
        (lambda: triton_fused_linear_kl(hs, ws, ht, wt, kind="sideways", token_scale=c, need_weight_grad=False),
         "kind"),
        (lambda: triton_fused_linear_kl(hs, ws, ht, wt, beta=1.5, token_scale=c, need_weight_grad=False), "beta"),
        (lambda: triton_fused_linear_kl(hs, ws, ht, wt, temperature=0, token_scale=c, need_weight_grad=False),
         "temperature"),
        (lambda: triton_fused_linear_kl(hs, ws, ht, wt, token_scale=c[:3], need_weight_grad=False), "token_scale"),
        (lambda: triton_fused_linear_kl(hs.double(), ws.double(), ht, wt, token_scale=c, need_weight_grad=False),
         "student_hidden"),
        (lambda: triton_fused_linear_topk(hs, ws, 0), "k="),
        (lambda: triton_fused_linear_topk_distill(hs, ws, torch.zeros(5, 3), torch.zeros(5, 3), token_scale=c,
                                                  need_weight_grad=False), "topk_ids"),
        (lambda: triton_fused_linear_topk_distill(hs, ws, torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3),
                                                  normalize="both", token_scale=c, need_weight_grad=False),
         "normalize"),
    ]
    for call, word in cases:
        try:
            call()
        except ValueError as e:
            assert word in str(e), f"error {e!r} does not name {word!r}"
        else:
            raise AssertionError(f"no ValueError for bad {word}")


CHECKS = sorted(name for name in globals() if name.startswith("check_"))


# ----------------------------------------------------------------------------------------------------
# the sm_90 compile check (run in a subprocess without the interpreter)
# ----------------------------------------------------------------------------------------------------

def _compile_all(overrides: dict | None = None) -> dict:
    """Compile every kernel for sm_90 at realistic specialization (the CUDA tile configuration, with
    `overrides`); report registers, spilled bytes, shared memory and wgmma use per kernel."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sdft.losses import triton_common as C, triton_kl as K, triton_topk as T

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bindir / "ptxas").exists():
        return {"_skip": f"no ptxas in {bindir}"}
    from dataclasses import replace
    cfg = replace(C.CUDA_TILES, **(overrides or {}))
    n, h, v = 8192, 4096, 151936

    def build(fn, args, consts, num_warps, num_stages):
        names = fn.arg_names
        sig, constexprs, attrs = {}, dict(consts), {}
        for name in names:
            if name in consts:
                sig[name] = "constexpr"
                continue
            value = args[name]
            if isinstance(value, str):
                sig[name] = value
                if value.startswith("*"):
                    attrs[(names.index(name),)] = [["tt.divisibility", 16]]
            elif value == 1:  # the launcher specializes unit strides like this
                sig[name] = "constexpr"
                constexprs[name] = 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": num_warps, "num_stages": num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(out.asm["cubin"])
        usage = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        match = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)  # spilled registers live on the stack
        ptx = out.asm["ptx"]
        return {"registers": int(match.group(1)) if match else None,
                "spill_bytes": int(match.group(2)) if match else None,
                "shared": out.metadata.shared, "wgmma": ptx.count("wgmma.mma_async") > 0}

    fp = "*fp32"
    results = {}
    for dt in ("bf16", "fp32"):
        p = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        dz = "*bf16" if dt == "bf16" else fp
        side = dict(hs_ptr=p, ws_ptr=p, ht_ptr=p, wt_ptr=p, bs_ptr=fp, bt_ptr=fp, N=n, V=v, HS=h, HT=h,
                    s_hs_n=h, s_hs_h=1, s_ws_v=h, s_ws_h=1, s_ht_n=h, s_ht_h=1, s_wt_v=h, s_wt_h=1,
                    temperature="fp32", n_splits=4, tiles_per_split=297, part_ptr=fp, norm_ptr=fp,
                    c_ptr=fp, scale_ptr=fp, dz_ptr=dz, db_ptr=fp, row0=4096, n_rows=4096, s_dz_n=v,
                    one_m_beta="fp32", log_1mb="fp32", log_b="fp32",
                    h_ptr=p, w_ptr=p, b_ptr=fp, H=h, K=20, s_h_n=h, s_h_h=1, s_w_v=h, s_w_h=1, stats_ptr=fp,
                    cand_ptr="*i64", ids_ptr="*i32", picked_ptr=fp, slot_w_ptr=fp, total_ptr=fp, tail_w_ptr=fp)
        kl = dict(HAS_SB=True, HAS_TB=True, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                  GROUP=cfg.group, PRECISION_S=prec, PRECISION_T=prec, WIDEN=False)
        tk = dict(HAS_BIAS=True, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=cfg.group,
                  PRECISION=prec, WIDEN=False)
        jobs = {
            "kl_stats": (K._kl_stats_kernel, dict(kl, KIND=0)),
            "jsd_loss": (K._jsd_loss_kernel, kl),
            "kl_grad_jsd": (K._kl_grad_kernel, dict(kl, KIND=2, BIAS_GRAD=True)),
            "kl_grad_forward": (K._kl_grad_kernel, dict(kl, KIND=0, BIAS_GRAD=False)),
            "topk_k20": (T._topk_kernel, dict(tk, KP=32)),
            "distill_stats_tail": (T._distill_stats_kernel, dict(tk, TAIL=True)),
            "distill_grad_tail": (T._distill_grad_kernel, dict(tk, TAIL=True, BIAS_GRAD=True)),
        }
        if dt == "fp32":  # IEEE fp32 dots (no tensor cores): one loss kernel is enough to check
            jobs = {"kl_grad_forward": jobs["kl_grad_forward"]}
        for name, (fn, consts) in jobs.items():
            args = {a: side[a] for a in fn.arg_names if a not in consts}
            results[f"{name}[{dt}]"] = build(fn, args, consts, cfg.num_warps, cfg.num_stages)
        mm = dict(ACCUMULATE=True, DOT_DTYPE=triton.language.bfloat16 if dt == "bf16" else triton.language.float32,
                  PRECISION=prec, BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k,
                  GROUP=cfg.group)
        args = dict(a_ptr=dz, b_ptr=p, c_ptr=fp, M=v, N=h, K=n, stride_am=1, stride_ak=v, stride_bk=h, stride_bn=1,
                    stride_cm=h, stride_cn=1)
        results[f"matmul_dW[{dt}]"] = build(C._matmul_kernel, args, mm, cfg.mm_num_warps, cfg.mm_num_stages)
    return results


def _run_script(mode: str, out_path: str, overrides: str | None = None) -> None:
    """`interpret OUT.json` or `compile OUT.json ['{"block_n": 64}']` (tile overrides for tuning)."""
    if mode == "compile":
        try:
            results = _compile_all(json.loads(overrides) if overrides else None)
        except ImportError as e:  # internal compiler API of another triton version
            results = {"_skip": f"triton compile API unavailable: {e}"}
        Path(out_path).write_text(json.dumps(results))
        return
    results = {}
    for name in CHECKS:
        start = time.time()
        try:
            globals()[name]()
            results[name] = {"ok": True, "error": "", "seconds": time.time() - start}
        except Exception:  # report every failure, keep going
            results[name] = {"ok": False, "error": traceback.format_exc(limit=4), "seconds": time.time() - start}
    Path(out_path).write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------------------
# pytest side
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """Run the interpreter checks and the sm_90 compile check in two concurrent subprocesses."""
    folder = tmp_path_factory.mktemp("triton_checks")
    base_env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    base_env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    base_env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {}
    for mode, env in (("interpret", dict(base_env, TRITON_INTERPRET="1")), ("compile", base_env)):
        out = folder / f"{mode}.json"
        procs[mode] = (subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, str(out)], cwd=str(REPO),
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out)
    results = {}
    for mode, (proc, out) in procs.items():
        try:
            log, _ = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        if proc.returncode != 0 or not out.exists():
            results[mode] = {"_error": f"subprocess '{mode}' failed (exit {proc.returncode}):\n{log[-4000:]}"}
        else:
            results[mode] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(subprocess_results, name):
    results = subprocess_results["interpret"]
    assert "_error" not in results, results.get("_error")
    assert results[name]["ok"], results[name]["error"]


def test_kernels_compile_for_sm90(subprocess_results):
    results = subprocess_results["compile"]
    assert "_error" not in results, results.get("_error")
    if "_skip" in results:
        pytest.skip(results["_skip"])
    for name, info in results.items():
        assert info["spill_bytes"] == 0, f"{name} spills registers: {info}"
        assert info["wgmma"] or "fp32" in name, f"{name} does not use Hopper tensor cores (wgmma): {info}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_realistic_shape_matches_chunked():
    """N=2048, H=2048, V=151936 bf16 on the GPU: Triton vs the chunked path (fp32 logits)."""
    import sdft.losses as L
    from sdft.losses.triton_kl import triton_fused_linear_kl
    from sdft.losses.triton_topk import triton_fused_linear_topk, triton_fused_linear_topk_distill

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 2048, 2048, 151936
    dev, bf = "cuda", torch.bfloat16
    hs = torch.randn(n, h, device=dev, generator=g).to(bf)
    ws = (torch.randn(v, h, device=dev, generator=g) * 0.05).to(bf)
    ht = (hs.float() + 0.3 * torch.randn(n, h, device=dev, generator=g)).to(bf)
    c = torch.full((n,), 1.0 / n, device=dev)
    for kind in ("forward", "reverse", "jsd"):
        wr = ws.clone().requires_grad_()
        hr = hs.clone().requires_grad_()
        ref = L.fused_linear_kl(hr, wr, ht, ws, kind=kind, reduction="sum", weights=c, impl="chunked")
        ref.backward()
        loss, dh, dw, _ = triton_fused_linear_kl(hs, ws, ht, ws, kind=kind, token_scale=c, need_weight_grad=True)
        assert abs(float((loss * c).sum()) - float(ref)) <= 1e-3 * abs(float(ref)) + 1e-6
        for name, mine, theirs in (("dh", dh, hr.grad.float()), ("dW", dw, wr.grad.float())):
            err = float((mine - theirs).norm() / theirs.norm())
            assert err < 1e-2, f"{kind} {name}: relative error {err:.3g}"
    ids, lps = triton_fused_linear_topk(ht, ws, 20)
    ref_ids, ref_lps = L.fused_linear_topk(ht, ws, 20, impl="chunked")
    assert (lps - ref_lps).abs().max() < 1e-2
    assert (ids == ref_ids).float().mean() > 0.99
    wr = ws.clone().requires_grad_()
    ref = L.fused_linear_topk_distill_loss(hs, wr, ids, lps, normalize="tail", reduction="sum", weights=c,
                                           impl="chunked")
    ref.backward()
    loss, _, dw, _ = triton_fused_linear_topk_distill(hs, ws, ids, lps, normalize="tail", token_scale=c,
                                                     need_weight_grad=True)
    assert abs(float((loss * c).sum()) - float(ref)) <= 1e-3 * abs(float(ref)) + 1e-6
    assert float((dw - wr.grad.float()).norm() / wr.grad.float().norm()) < 1e-2


if __name__ == "__main__":
    _run_script(*sys.argv[1:4])
