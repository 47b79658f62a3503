"""Masks, all-masked batches, non-finite values in masked rows, extreme logits, -inf teacher entries,
bf16 accuracy, invalid top-K ids."""
import numpy as np
import pytest
import torch

import sdft.losses as L

from . import oracle

IMPLS = ["reference", "chunked"]
REDUCTIONS = ["none", "sum", "token_mean", "seq_mean"]


def _inputs(gen, n=11, h=6, v=23, dtype=torch.float32):
    hs = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    ws = torch.randn(v, h, generator=gen).to(dtype).requires_grad_()
    th = torch.randn(n, h + 1, generator=gen).to(dtype)
    tw = torch.randn(v, h + 1, generator=gen).to(dtype)
    return hs, ws, th, tw


def _all_losses(hs, ws, th, tw, mask, reduction, impl):
    seq_ids = torch.arange(hs.shape[0]) // 3
    ids, logprobs = L.fused_linear_topk(th, tw, 4, impl="reference")
    out = [L.fused_linear_kl(hs, ws, th, tw, kind=k, mask=mask, reduction=reduction, seq_ids=seq_ids, impl=impl)
           for k in ("forward", "reverse", "jsd")]
    out += [L.fused_linear_topk_distill_loss(hs, ws, ids, logprobs, normalize=nz, mask=mask, reduction=reduction,
                                             seq_ids=seq_ids, impl=impl) for nz in ("renormalize", "tail")]
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_batch_is_exactly_zero(gen, impl, reduction):
    hs, ws, th, tw = _inputs(gen)
    mask = torch.zeros(hs.shape[0], dtype=torch.bool)
    for loss in _all_losses(hs, ws, th, tw, mask, reduction, impl):
        assert torch.all(loss == 0)
        gh, gw = torch.autograd.grad(loss.sum(), (hs, ws))
        assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_with_nan_and_inf_do_not_leak(gen, impl):
    hs, ws, th, tw = _inputs(gen)
    mask = torch.ones(hs.shape[0], dtype=torch.bool)
    mask[[1, 4]] = False
    with torch.no_grad():
        clean = _all_losses(hs, ws, th, tw, mask, "token_mean", impl)
    bad_hs = hs.detach().clone()
    bad_hs[1] = float("nan")
    bad_hs[4] = float("inf")
    bad_hs.requires_grad_()
    bad_th = th.clone()
    bad_th[1] = float("nan")
    for loss, ref in zip(_all_losses(bad_hs, ws, bad_th, tw, mask, "token_mean", impl), clean):
        torch.testing.assert_close(loss, ref)
        gh, gw = torch.autograd.grad(loss, (bad_hs, ws))
        assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
        assert torch.all(gh[[1, 4]] == 0)


def test_sampled_token_loss_masked_rows_exactly_zero(gen):
    student = torch.randn(6, generator=gen).requires_grad_()
    teacher = torch.randn(6, generator=gen)
    teacher[2] = float("-inf")
    sampler = torch.randn(6, generator=gen)
    mask = torch.tensor([True, True, False, True, True, True])
    loss = L.sampled_token_loss(student, teacher, sampler, mask=mask, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and grad[2] == 0
    none = L.sampled_token_loss(student, teacher, sampler, mask=torch.zeros(6, dtype=torch.bool), reduction="token_mean")
    assert none.item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_extreme_logits(gen, impl, kind):
    """Logits of +-1e4: probabilities underflow, so the truth is the log-space definition in float64.
    float64 inputs match it tightly; float32 inputs within float32's conditioning (an ulp of 1e4 is 1e-3,
    and the divergence is about 1e4 times that relative error)."""
    n, h, v = 9, 5, 31
    hs = torch.randn(n, h, generator=gen, dtype=torch.float64)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64)
    th = torch.randn(n, h, generator=gen, dtype=torch.float64)
    tw = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias_s = torch.where(torch.rand(v, generator=gen) < 0.5, 1e4, -1e4).double()
    bias_t = torch.where(torch.rand(v, generator=gen) < 0.5, 1e4, -1e4).double()
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-3)):
        x = hs.to(dtype).clone().requires_grad_()
        loss = L.fused_linear_kl(x, ws.to(dtype), th.to(dtype), tw.to(dtype), kind=kind, reduction="none",
                                 student_bias=bias_s.to(dtype), teacher_bias=bias_t.to(dtype), impl=impl)
        s_logits = hs.to(dtype).double() @ ws.to(dtype).double().T + bias_s
        t_logits = th.to(dtype).double() @ tw.to(dtype).double().T + bias_t
        expected = L.kl_divergence(s_logits, t_logits, kind=kind, reduction="none").numpy()
        assert np.isfinite(expected).all() and torch.isfinite(loss).all()
        np.testing.assert_allclose(loss.detach().double().numpy(), expected, rtol=rtol)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_minus_inf_teacher_entries(gen, impl, kind):
    n, h, v = 10, 4, 19
    hs = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64)
    th = torch.randn(n, h, generator=gen, dtype=torch.float64)
    tw = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias_t = torch.zeros(v, dtype=torch.float64)
    bias_t[[0, 5, 11]] = float("-inf")
    loss = L.fused_linear_kl(hs, ws, th, tw, kind=kind, beta=0.4, reduction="none", teacher_bias=bias_t, impl=impl)
    expected = oracle.divergence((hs.detach() @ ws.T).numpy(), (th @ tw.T + bias_t).numpy(), kind, 0.4)
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10)
    (grad,) = torch.autograd.grad(loss.sum(), hs)
    assert torch.isfinite(grad).all()
    # the same on materialized logits
    s_logits = (hs.detach() @ ws.T).requires_grad_()
    ref = L.kl_divergence(s_logits, th @ tw.T + bias_t, kind=kind, beta=0.4, reduction="none")
    np.testing.assert_allclose(ref.detach().numpy(), expected, rtol=1e-10)
    (g,) = torch.autograd.grad(ref.sum(), s_logits)
    assert torch.isfinite(g).all()


def _relative_error(a: torch.Tensor, truth: torch.Tensor) -> float:
    return float((a.double() - truth).norm() / truth.norm())


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_bf16_no_worse_than_naive_bf16(gen, kind):
    """bf16 inputs: fp32 logits and softmax inside; error vs the float64 truth on the same bf16 values is no
    worse than naive bf16 PyTorch (bf16 matmul, bf16 log_softmax)."""
    n, h, v = 64, 96, 1531
    hs = (torch.randn(n, h, generator=gen) * 1.5).bfloat16()
    ws = (torch.randn(v, h, generator=gen) * 0.3).bfloat16()
    th = (torch.randn(n, h, generator=gen) * 1.5).bfloat16()
    tw = (torch.randn(v, h, generator=gen) * 0.3).bfloat16()

    def truth_fn(x):
        return L.fused_linear_kl(x, ws.double(), th.double(), tw.double(), kind=kind, impl="reference")
    x64 = hs.double().requires_grad_()
    truth = truth_fn(x64)
    (truth_grad,) = torch.autograd.grad(truth, x64)

    x = hs.clone().requires_grad_()
    ours = L.fused_linear_kl(x, ws, th, tw, kind=kind, impl="chunked")
    (ours_grad,) = torch.autograd.grad(ours, x)
    assert ours_grad.dtype == torch.bfloat16

    xn = hs.clone().requires_grad_()
    s_lp = torch.log_softmax(xn @ ws.T, -1)
    t_lp = torch.log_softmax(th @ tw.T, -1)
    if kind == "forward":
        naive = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
    elif kind == "reverse":
        naive = (s_lp.exp() * (s_lp - t_lp)).sum(-1).mean()
    else:
        log_m = torch.logaddexp(s_lp + np.log(0.5), t_lp + np.log(0.5))
        naive = (0.5 * (t_lp.exp() * (t_lp - log_m)).sum(-1) + 0.5 * (s_lp.exp() * (s_lp - log_m)).sum(-1)).mean()
    (naive_grad,) = torch.autograd.grad(naive, xn)
    assert abs(ours.double() - truth).item() <= abs(naive.double() - truth).item() + 1e-6
    assert _relative_error(ours_grad, truth_grad) <= _relative_error(naive_grad, truth_grad)
    assert _relative_error(ours_grad, truth_grad) < 1e-2


def test_bf16_topk_and_logprobs_accuracy(gen):
    n, h, v = 40, 64, 997
    hs = torch.randn(n, h, generator=gen).bfloat16()
    ws = (torch.randn(v, h, generator=gen) * 0.3).bfloat16()
    ids, logprobs = L.fused_linear_topk(hs, ws, 5, impl="chunked")
    ids64, logprobs64 = L.fused_linear_topk(hs.double(), ws.double(), 5, impl="reference")
    assert (ids == ids64).float().mean() > 0.98
    assert (logprobs.double() - logprobs64).abs().max() < 1e-5
    x = hs.clone().requires_grad_()
    loss = L.fused_linear_topk_distill_loss(x, ws, ids64, logprobs64.float(), impl="chunked")
    x64 = hs.double().requires_grad_()
    truth = L.fused_linear_topk_distill_loss(x64, ws.double(), ids64, logprobs64, impl="reference")
    (g,) = torch.autograd.grad(loss, x)
    (g64,) = torch.autograd.grad(truth, x64)
    assert abs(loss.double() - truth).item() < 1e-5 * max(1.0, truth.abs().item())
    assert _relative_error(g, g64) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", ["renormalize", "tail"])
def test_invalid_topk_ids_are_ignored(gen, impl, normalize):
    n, h, v = 8, 5, 29
    hs = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64)
    ids, logprobs = L.fused_linear_topk(torch.randn(n, h, generator=gen, dtype=torch.float64), ws, 4, impl="reference")
    logprobs = logprobs.double()
    padded_ids = torch.cat([ids, torch.full((n, 2), -1), torch.full((n, 1), v + 7)], dim=1)
    padded_lp = torch.cat([logprobs, torch.full((n, 3), -0.1, dtype=torch.float64)], dim=1)
    a = L.fused_linear_topk_distill_loss(hs, ws, ids, logprobs, normalize=normalize, reduction="none", impl=impl)
    b = L.fused_linear_topk_distill_loss(hs, ws, padded_ids, padded_lp, normalize=normalize, reduction="none", impl=impl)
    torch.testing.assert_close(a, b)
    none_valid = torch.full((n, 3), -5)
    c = L.fused_linear_topk_distill_loss(hs, ws, none_valid, torch.zeros(n, 3, dtype=torch.float64),
                                         reduction="sum", impl=impl)
    assert c.item() == 0.0
    (g,) = torch.autograd.grad(c, hs)
    assert torch.all(g == 0)


def test_seq_mean_counts_every_sequence(gen):
    per = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    s = torch.zeros(4, 3, dtype=torch.float64)
    t = torch.zeros(4, 3, dtype=torch.float64)
    t[:, 0] = per  # any non-trivial teacher
    seq_ids = torch.tensor([0, 0, 1, 2])
    mask = torch.tensor([True, True, True, False])
    got = L.kl_divergence(s, t, mask=mask, reduction="seq_mean", seq_ids=seq_ids)
    per_token = L.kl_divergence(s, t, reduction="none")
    expected = ((per_token[0] + per_token[1]) / 2 + per_token[2] + 0.0) / 3
    torch.testing.assert_close(got, expected)
