"""Top-K losses from given log-probs (topk_loss_from_logprobs) and the top-K reverse KL (kind="reverse_kl" of
topk_distill_loss and fused_linear_topk_distill_loss) against the independent float64 oracle: values on fresh
random inputs with odd shapes, masks, weights, every reduction, invalid slots and rows without a valid slot;
gradients by float64 autograd across paths and gradcheck; extreme logits; bf16."""
import numpy as np
import pytest
import torch

import sdft.losses as L

from . import oracle

REDUCTIONS = ["none", "sum", "token_mean", "seq_mean"]
KINDS = [("renormalize", "cross_entropy"), ("renormalize", "forward_kl"), ("tail", "cross_entropy"),
         ("tail", "forward_kl"), ("renormalize", "reverse_kl")]


def _teacher(gen, n, v, k, invalid=True):
    """Teacher top-K ids [n, k] (distinct per row) and log-probs (float64), with invalid slots (-1 and ids >= V)
    and one row without any valid slot."""
    raw = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    logprobs, ids = torch.log_softmax(raw, -1).topk(k, dim=-1)
    if invalid:
        bad = torch.rand(n, k, generator=gen) < 0.2
        ids = torch.where(bad & (torch.rand(n, k, generator=gen) < 0.5), torch.full_like(ids, -1), ids)
        ids = torch.where(bad & (ids >= 0), ids + v, ids)
        ids[n // 2] = -3
    return ids, logprobs


def _reduction_inputs(gen, n):
    mask = torch.rand(n, generator=gen) > 0.25
    weights = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    seq_ids = torch.sort(torch.randint(0, 4, (n,), generator=gen)).values
    return mask, weights, seq_ids


def _student_logprobs_at(logits, ids):
    safe = torch.where(ids >= 0, ids, 0).clamp(max=logits.shape[1] - 1)
    return torch.log_softmax(logits, -1).gather(1, safe)


# ------------------------------------------------------------------------- topk_loss_from_logprobs

@pytest.mark.parametrize("normalize,kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_from_logprobs_matches_oracle(gen, normalize, kind, reduction):
    n, v, k = 23, 41, 6
    ids, teacher = _teacher(gen, n, v, k)
    student = _student_logprobs_at(torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5, ids)
    mask, weights, seq_ids = _reduction_inputs(gen, n)
    got = L.topk_loss_from_logprobs(student, ids, teacher, vocab_size=v, normalize=normalize, kind=kind, mask=mask,
                                    weights=weights, reduction=reduction, seq_ids=seq_ids)
    per_token = oracle.topk_loss_from_logprobs(student.numpy(), ids.numpy(), teacher.numpy(), v, normalize, kind)
    expected = oracle.reduce(per_token, mask.numpy(), weights.numpy(), reduction, seq_ids.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert got.dtype == torch.float64


@pytest.mark.parametrize("normalize,kind", KINDS)
def test_from_logprobs_gradients(gen, normalize, kind):
    """gradcheck in float64 (masked rows, invalid slots, a row without a valid slot, per-token output)."""
    n, v, k = 7, 13, 4
    ids, teacher = _teacher(gen, n, v, k)
    student = _student_logprobs_at(torch.randn(n, v, generator=gen, dtype=torch.float64), ids).detach()
    mask = torch.tensor([True, True, False, True, True, True, False])
    for reduction in ("none", "seq_mean"):
        def f(lp):
            return L.topk_loss_from_logprobs(lp, ids, teacher, vocab_size=v, normalize=normalize, kind=kind,
                                             mask=mask, reduction=reduction, seq_ids=torch.arange(n) // 3)
        assert torch.autograd.gradcheck(f, (student.requires_grad_(),))
    (g,) = torch.autograd.grad(L.topk_loss_from_logprobs(student, ids, teacher, vocab_size=v, normalize=normalize,
                                                         kind=kind, mask=mask, reduction="sum"), student)
    assert torch.all(g[~mask] == 0) and torch.all(g[n // 2] == 0)  # masked rows, the row without a valid slot
    assert torch.all(g[ids < 0] == 0) and torch.all(g[ids >= v] == 0)  # invalid slots are not read


@pytest.mark.parametrize("normalize,kind", KINDS)
def test_from_logprobs_equals_topk_distill_loss_on_the_same_student(gen, normalize, kind):
    """With the student's full-vocabulary log-probs gathered at the ids, the same values and logit gradients as
    topk_distill_loss (which forms the tail exactly from the other logits)."""
    n, v, k = 11, 29, 5
    ids, teacher = _teacher(gen, n, v, k)
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    mask, weights, seq_ids = _reduction_inputs(gen, n)
    kw = dict(normalize=normalize, kind=kind, mask=mask, weights=weights, reduction="seq_mean", seq_ids=seq_ids)
    a = L.topk_loss_from_logprobs(_student_logprobs_at(logits, ids), ids, teacher, vocab_size=v, **kw)
    b = L.topk_distill_loss(logits, ids, teacher, **kw)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def test_reverse_kl_ignores_a_constant_per_row_and_drops_zero_teacher_slots(gen):
    n, v, k = 9, 31, 5
    ids, teacher = _teacher(gen, n, v, k, invalid=False)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    at_ids = logits.gather(1, ids)
    a = L.topk_loss_from_logprobs(at_ids, ids, teacher, vocab_size=v, kind="reverse_kl", reduction="none")
    b = L.topk_loss_from_logprobs(at_ids + torch.randn(n, 1, generator=gen, dtype=torch.float64) * 50, ids, teacher,
                                  vocab_size=v, kind="reverse_kl", reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a teacher log-prob of -inf is a bucket of probability 0: the slot leaves the support on both sides
    dropped = teacher.clone()
    dropped[:, 1] = -float("inf")
    got = L.topk_loss_from_logprobs(at_ids, ids, dropped, vocab_size=v, kind="reverse_kl", reduction="none")
    without = L.topk_loss_from_logprobs(at_ids[:, [0, 2, 3, 4]], ids[:, [0, 2, 3, 4]], teacher[:, [0, 2, 3, 4]],
                                        vocab_size=v, kind="reverse_kl", reduction="none")
    torch.testing.assert_close(got, without, rtol=1e-12, atol=1e-14)
    expected = oracle.topk_loss_from_logprobs(at_ids.numpy(), ids.numpy(), dropped.numpy(), v, "renormalize",
                                              "reverse_kl")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_from_logprobs_extreme_values(gen):
    """Student log-probs down to -1e4 and teacher log-probs spanning 700 nats: finite, and equal to the oracle's
    log-space definition."""
    n, v, k = 8, 50, 6
    ids, _ = _teacher(gen, n, v, k, invalid=False)
    student = -10 - torch.rand(n, k, generator=gen, dtype=torch.float64) * 1e4  # a valid sub-distribution
    student[:, 0] = -1e-3
    teacher = -torch.rand(n, k, generator=gen, dtype=torch.float64) * 700
    teacher[:, 0] = -1e-4
    for normalize, kind in KINDS:
        got = L.topk_loss_from_logprobs(student, ids, teacher, vocab_size=v, normalize=normalize, kind=kind,
                                        reduction="none")
        expected = oracle.topk_loss_from_logprobs(student.numpy(), ids.numpy(), teacher.numpy(), v, normalize, kind)
        assert torch.isfinite(got).all() and np.isfinite(expected).all()
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
        x = student.float().clone().requires_grad_()
        got32 = L.topk_loss_from_logprobs(x, ids, teacher.float(), vocab_size=v, normalize=normalize, kind=kind,
                                          reduction="token_mean")
        (g,) = torch.autograd.grad(got32, x)
        assert torch.isfinite(got32) and torch.isfinite(g).all()
        # float32: the forward KL is a small difference of O(1e-3) terms, so the error is absolute
        np.testing.assert_allclose(got32.item(), expected.mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalize,kind", KINDS)
def test_from_logprobs_bf16(gen, normalize, kind):
    """bf16 inputs: float32 math inside, close to the float64 value on the same bf16 numbers; gradients in bf16."""
    n, v, k = 40, 97, 8
    ids, teacher = _teacher(gen, n, v, k)
    student = _student_logprobs_at(torch.randn(n, v, generator=gen, dtype=torch.float64) * 2, ids)
    s16, t16 = student.bfloat16().requires_grad_(), teacher.bfloat16()
    got = L.topk_loss_from_logprobs(s16, ids, t16, vocab_size=v, normalize=normalize, kind=kind,
                                    reduction="token_mean")
    assert got.dtype == torch.float32
    s64 = s16.detach().double().requires_grad_()
    truth = L.topk_loss_from_logprobs(s64, ids, t16.double(), vocab_size=v, normalize=normalize, kind=kind,
                                      reduction="token_mean")
    expected = oracle.reduce(oracle.topk_loss_from_logprobs(s64.detach().numpy(), ids.numpy(), t16.double().numpy(),
                                                            v, normalize, kind))
    np.testing.assert_allclose(truth.item(), expected, rtol=1e-10)
    assert abs(got.item() - expected) <= 1e-5 * max(1.0, abs(expected))
    (g,) = torch.autograd.grad(got, s16)
    (g64,) = torch.autograd.grad(truth, s64)
    assert g.dtype == torch.bfloat16
    assert float((g.double() - g64).norm() / g64.norm()) < 1e-2


# ------------------------------------------------------------------------- reverse KL from logits and hidden

def _problem(gen, n=27, h=11, v=67, k=7, dtype=torch.float64):
    hs = (torch.randn(n, h, generator=gen, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    bs = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    ids, teacher = _teacher(gen, n, v, k)
    return hs, ws, bs, ids, teacher


def _logits(h, w, b):
    return (h.detach().double() @ w.detach().double().T + b.detach().double()).numpy()


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_reverse_kl_matches_oracle(gen, impl, reduction):
    hs, ws, bs, ids, teacher = _problem(gen)
    mask, weights, seq_ids = _reduction_inputs(gen, hs.shape[0])
    got = L.fused_linear_topk_distill_loss(hs, ws, ids, teacher, kind="reverse_kl", temperature=0.7, mask=mask,
                                           weights=weights, reduction=reduction, seq_ids=seq_ids, student_bias=bs,
                                           impl=impl, chunk_size=4)
    per_token = oracle.topk_loss(_logits(hs, ws, bs), ids.numpy(), teacher.numpy(), "renormalize", "reverse_kl", 0.7)
    expected = oracle.reduce(per_token, mask.numpy(), weights.numpy(), reduction, seq_ids.numpy())
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    on_logits = L.topk_distill_loss(torch.from_numpy(_logits(hs, ws, bs)), ids, teacher, kind="reverse_kl",
                                    temperature=0.7, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)
    np.testing.assert_allclose(on_logits.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "token_mean"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_reverse_kl_gradients_match_reference(gen, reduction, chunk_size):
    """d hidden, d weight, d bias of the gather path equal float64 autograd through the materialized logits."""
    hs, ws, bs, ids, teacher = _problem(gen, n=19, v=43, k=5)
    mask, weights, _ = _reduction_inputs(gen, 19)
    out = {}
    for impl in ("reference", "chunked"):
        loss = L.fused_linear_topk_distill_loss(hs, ws, ids, teacher, kind="reverse_kl", temperature=1.3, mask=mask,
                                                weights=weights, reduction=reduction, student_bias=bs, impl=impl,
                                                chunk_size=chunk_size)
        scale = torch.arange(loss.numel(), dtype=loss.dtype).reshape(loss.shape) + 1
        out[impl] = (loss.detach(), *torch.autograd.grad((loss * scale).sum(), (hs, ws, bs)))
    for a, b in zip(out["reference"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    small_h, small_w, small_b, small_ids, small_t = _problem(gen, n=6, h=4, v=11, k=3)

    def f(h, w, b):
        return L.fused_linear_topk_distill_loss(h, w, small_ids, small_t, kind="reverse_kl", reduction=reduction,
                                                mask=torch.tensor([True, False, True, True, True, True]),
                                                student_bias=b, impl="chunked", chunk_size=2)
    assert torch.autograd.gradcheck(f, (small_h, small_w, small_b))


def test_fused_reverse_kl_without_weight_or_bias_gradient(gen):
    hs, ws, bs, ids, teacher = _problem(gen, n=9, v=23, k=4)
    frozen_w, frozen_b = ws.detach(), bs.detach()
    loss = L.fused_linear_topk_distill_loss(hs, frozen_w, ids, teacher, kind="reverse_kl", student_bias=frozen_b,
                                            impl="chunked")
    (g,) = torch.autograd.grad(loss, hs)
    ref = L.fused_linear_topk_distill_loss(hs, frozen_w, ids, teacher, kind="reverse_kl", student_bias=frozen_b,
                                           impl="reference")
    (g_ref,) = torch.autograd.grad(ref, hs)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)


def test_fused_reverse_kl_extreme_logits(gen):
    """Logits of +-1e4 at the ids: the renormalized student underflows in probability space, not in log space."""
    n, h, v, k = 10, 5, 37, 6
    hs = torch.randn(n, h, generator=gen, dtype=torch.float64)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias = torch.where(torch.rand(v, generator=gen) < 0.5, 1e4, -1e4).double()
    ids, teacher = _teacher(gen, n, v, k)
    per_token = oracle.topk_loss(_logits(hs, ws, bias), ids.numpy(), teacher.numpy(), "renormalize", "reverse_kl")
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        x = hs.to(dtype).clone().requires_grad_()
        got = L.fused_linear_topk_distill_loss(x, ws.to(dtype), ids, teacher.to(dtype), kind="reverse_kl",
                                               reduction="none", student_bias=bias.to(dtype), impl="chunked")
        assert torch.isfinite(got).all() and np.isfinite(per_token).all()
        np.testing.assert_allclose(got.detach().double().numpy(), per_token, rtol=rtol, atol=rtol)
        (g,) = torch.autograd.grad(got.sum(), x)
        assert torch.isfinite(g).all()


def test_fused_reverse_kl_bf16(gen):
    """bf16 weights and hidden states: gradients returned in bf16, close to the float64 truth on the same values."""
    hs, ws, bs, ids, teacher = _problem(gen, n=48, h=64, v=211, k=8, dtype=torch.bfloat16)
    loss = L.fused_linear_topk_distill_loss(hs, ws, ids, teacher.float(), kind="reverse_kl", student_bias=bs,
                                            impl="chunked")
    grads = torch.autograd.grad(loss, (hs, ws, bs))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hs, ws, bs))
    truth = L.fused_linear_topk_distill_loss(h64, w64, ids, teacher.float().double(), kind="reverse_kl",
                                             student_bias=b64, impl="reference")
    expected = oracle.reduce(oracle.topk_loss(_logits(h64, w64, b64), ids.numpy(), teacher.float().double().numpy(),
                                              "renormalize", "reverse_kl"))
    np.testing.assert_allclose(truth.item(), expected, rtol=1e-10)
    assert abs(loss.item() - expected) <= 1e-5 * max(1.0, abs(expected))
    for g, g64 in zip(grads, torch.autograd.grad(truth, (h64, w64, b64))):
        assert float((g.double() - g64).norm() / g64.norm()) < 1e-2


def test_fused_reverse_kl_all_masked_and_no_valid_slot(gen):
    hs, ws, bs, ids, teacher = _problem(gen, n=8, v=19, k=3)
    for mask, bad_ids in ((torch.zeros(8, dtype=torch.bool), ids), (None, torch.full_like(ids, -1))):
        for reduction in REDUCTIONS:
            loss = L.fused_linear_topk_distill_loss(hs, ws, bad_ids, teacher, kind="reverse_kl", mask=mask,
                                                    reduction=reduction, seq_ids=torch.arange(8) // 3,
                                                    student_bias=bs, impl="chunked")
            assert torch.all(loss == 0)
            grads = torch.autograd.grad(loss.sum(), (hs, ws, bs))
            assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("normalize,kind", KINDS)
def test_tokens_without_mass_contribute_zero(gen, impl, normalize, kind):
    """A student logit of -inf (a token the student cannot emit) at a top-K id, and a teacher log-prob of -inf at
    that slot: the bucket holds no mass on either side, the loss is the oracle's and every gradient finite."""
    n, h, v, k = 6, 5, 19, 4
    hs = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ids, teacher = _teacher(gen, n, v - 1, k, invalid=False)
    ids[:, -1] = v - 1  # a token the student cannot emit, and to which the teacher gives no mass
    teacher[:, -1] = -float("inf")
    bias = torch.zeros(v, dtype=torch.float64)
    bias[v - 1] = -float("inf")
    loss = L.fused_linear_topk_distill_loss(hs, ws, ids, teacher, normalize=normalize, kind=kind, reduction="none",
                                            student_bias=bias, impl=impl)
    expected = oracle.topk_loss(_logits(hs, ws, bias), ids.numpy(), teacher.numpy(), normalize, kind)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss.sum(), (hs, ws))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_reverse_kl_student_without_mass_at_a_teacher_token(gen, impl):
    """Reverse KL where the student cannot emit one of the teacher's top-K tokens: p log(p / q) = 0 there, the
    loss is the oracle's and the gradients finite."""
    n, h, v, k = 6, 5, 19, 4
    hs = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ids, teacher = _teacher(gen, n, v - 1, k, invalid=False)
    ids[:, -1] = v - 1
    bias = torch.zeros(v, dtype=torch.float64)
    bias[v - 1] = -float("inf")
    loss = L.fused_linear_topk_distill_loss(hs, ws, ids, teacher, kind="reverse_kl", reduction="none",
                                            student_bias=bias, impl=impl)
    expected = oracle.topk_loss(_logits(hs, ws, bias), ids.numpy(), teacher.numpy(), "renormalize", "reverse_kl")
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss.sum(), (hs, ws))
    assert all(torch.isfinite(g).all() for g in grads)
