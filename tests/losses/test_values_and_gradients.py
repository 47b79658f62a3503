"""Every loss path against the independent float64 NumPy oracle (values) and float64 autograd of the
oracle-equivalent reference (gradients), on fresh random inputs with odd shapes."""
import numpy as np
import pytest
import torch

import sdft.losses as L
from sdft.losses import reference as R

from . import oracle

IMPLS = ["reference", "chunked"]
REDUCTIONS = ["none", "sum", "token_mean", "seq_mean"]


def _problem(gen, n=29, h=13, ht=9, v=97, scale=2.0, dtype=torch.float64):
    hs = (torch.randn(n, h, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    bs = (torch.randn(v, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    th = (torch.randn(n, ht, generator=gen, dtype=torch.float64) * scale).to(dtype)
    tw = (torch.randn(v, ht, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    tb = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(n, generator=gen) > 0.3
    weights = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    seq_ids = torch.sort(torch.randint(0, 5, (n,), generator=gen)).values
    return hs, ws, bs, th, tw, tb, mask, weights, seq_ids


def _logits(h, w, b):
    return (h.detach().double() @ w.detach().double().T + b.detach().double()).numpy()


def _grads(loss, tensors):
    total = loss.sum() if loss.dim() else loss
    return torch.autograd.grad(total, tensors)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_kl_matches_oracle(gen, impl, kind, beta, reduction):
    hs, ws, bs, th, tw, tb, mask, weights, seq_ids = _problem(gen)
    temperature = 1.3
    loss = L.fused_linear_kl(hs, ws, th, tw, kind=kind, beta=beta, temperature=temperature, mask=mask,
                             weights=weights, reduction=reduction, seq_ids=seq_ids, student_bias=bs,
                             teacher_bias=tb, impl=impl, chunk_size=6)
    per_token = oracle.divergence(_logits(hs, ws, bs), _logits(th, tw, tb), kind, beta, temperature)
    expected = oracle.reduce(per_token, mask.numpy(), weights.numpy(), reduction, seq_ids.numpy())
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.7)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_kl_gradients_match_reference(gen, kind, beta, reduction):
    hs, ws, bs, th, tw, tb, mask, weights, seq_ids = _problem(gen, n=23, v=61)
    out = {}
    for impl in IMPLS:
        loss = L.fused_linear_kl(hs, ws, th, tw, kind=kind, beta=beta, temperature=0.8, mask=mask, weights=weights,
                                 reduction=reduction, seq_ids=seq_ids, student_bias=bs, teacher_bias=tb,
                                 impl=impl, chunk_size=5)
        out[impl] = _grads(loss * (torch.arange(loss.numel(), dtype=loss.dtype).reshape(loss.shape) + 1), (hs, ws, bs))
    for a, b in zip(out["reference"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_fused_kl_gradcheck(gen, kind):
    hs, ws, bs, th, tw, tb, mask, weights, seq_ids = _problem(gen, n=7, h=5, ht=4, v=11)
    for reduction in ("token_mean", "none"):
        def f(h, w, b):
            return L.fused_linear_kl(h, w, th, tw, kind=kind, beta=0.4, temperature=1.5, mask=mask,
                                     reduction=reduction, student_bias=b, teacher_bias=tb, impl="chunked", chunk_size=3)
        assert torch.autograd.gradcheck(f, (hs, ws, bs))


def test_reference_kl_on_logits_matches_oracle(gen):
    s = torch.randn(31, 53, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(31, 53, generator=gen, dtype=torch.float64) * 3
    for kind in ("forward", "reverse", "jsd"):
        got = L.kl_divergence(s, t, kind=kind, beta=0.25, temperature=2.0, reduction="none")
        np.testing.assert_allclose(got.numpy(), oracle.divergence(s.numpy(), t.numpy(), kind, 0.25, 2.0), rtol=1e-10)


def _topk_inputs(gen, n, v, k):
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    raw = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    logprobs = torch.log_softmax(raw, -1).gather(1, ids)
    # a few invalid slots: negative ids and ids >= V are ignored
    bad = torch.rand(n, k, generator=gen) < 0.15
    ids = torch.where(bad & (torch.rand(n, k, generator=gen) < 0.5), torch.full_like(ids, -1), ids)
    ids = torch.where(bad & (ids >= 0), ids + v, ids)
    return ids, logprobs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", ["renormalize", "tail"])
@pytest.mark.parametrize("kind", ["cross_entropy", "forward_kl"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_topk_distill_matches_oracle(gen, impl, normalize, kind, reduction):
    hs, ws, bs, _, _, _, mask, weights, seq_ids = _problem(gen, n=27, v=83)
    ids, logprobs = _topk_inputs(gen, 27, 83, 7)
    loss = L.fused_linear_topk_distill_loss(hs, ws, ids, logprobs, normalize=normalize, kind=kind, temperature=0.9,
                                            mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                                            student_bias=bs, impl=impl, chunk_size=4)
    per_token = oracle.topk_loss(_logits(hs, ws, bs), ids.numpy(), logprobs.numpy(), normalize, kind, 0.9)
    expected = oracle.reduce(per_token, mask.numpy(), weights.numpy(), reduction, seq_ids.numpy())
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    # the materialized-logit reference gives the same
    logits = torch.from_numpy(_logits(hs, ws, bs))
    ref = L.topk_distill_loss(logits, ids, logprobs, normalize=normalize, kind=kind, temperature=0.9, mask=mask,
                              weights=weights, reduction=reduction, seq_ids=seq_ids)
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize", ["renormalize", "tail"])
@pytest.mark.parametrize("reduction", ["seq_mean", "none"])
def test_fused_topk_distill_gradients(gen, normalize, reduction):
    hs, ws, bs, _, _, _, mask, weights, seq_ids = _problem(gen, n=17, v=41)
    ids, logprobs = _topk_inputs(gen, 17, 41, 5)
    out = {}
    for impl in IMPLS:
        loss = L.fused_linear_topk_distill_loss(hs, ws, ids, logprobs, normalize=normalize, temperature=1.7,
                                                mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                                                student_bias=bs, impl=impl, chunk_size=4)
        out[impl] = _grads(loss * 1.5, (hs, ws, bs))
    for a, b in zip(out["reference"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    small = _problem(gen, n=5, h=4, v=9)
    ids_s, lp_s = _topk_inputs(gen, 5, 9, 3)

    def f(h, w, b):
        return L.fused_linear_topk_distill_loss(h, w, ids_s, lp_s, normalize=normalize, kind="forward_kl",
                                                reduction=reduction, seq_ids=torch.tensor([0, 0, 1, 2, 2]),
                                                student_bias=b, impl="chunked", chunk_size=2)
    assert torch.autograd.gradcheck(f, small[:3])


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_topk_ids_and_logprobs(gen, impl):
    h = torch.randn(19, 11, generator=gen, dtype=torch.float64)
    w = torch.randn(67, 11, generator=gen, dtype=torch.float64)
    b = torch.randn(67, generator=gen, dtype=torch.float64)
    ids, logprobs = L.fused_linear_topk(h, w, 6, bias=b, temperature=0.7, impl=impl, chunk_size=4)
    logits = _logits(h, w, b) / 0.7
    expected_ids = np.argsort(-logits, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(ids.numpy(), expected_ids)
    full = np.log(oracle.softmax_rows(logits))
    np.testing.assert_allclose(logprobs.numpy(), np.take_along_axis(full, expected_ids, 1), rtol=1e-6, atol=1e-6)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_and_entropy(gen, impl):
    h = torch.randn(21, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(45, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 45, (21,), generator=gen)
    lp, ent = L.fused_linear_token_logprobs(h, w, tokens, temperature=1.2, impl=impl, chunk_size=4,
                                            return_entropy=True)
    logits = _logits(h, w, torch.zeros(45, dtype=torch.float64))
    np.testing.assert_allclose(lp.detach().numpy(), oracle.token_logprobs(logits, tokens.numpy(), 1.2), rtol=1e-10)
    np.testing.assert_allclose(ent.numpy(), oracle.entropy(logits, 1.2), rtol=1e-10)
    assert not ent.requires_grad

    def f(hh, ww):
        return L.fused_linear_token_logprobs(hh, ww, tokens, impl=impl, chunk_size=4)
    assert torch.autograd.gradcheck(f, (h, w))


def test_sampled_token_loss_matches_oracle(gen):
    n = 33
    student = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(n, generator=gen, dtype=torch.float64)
    sampler = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, generator=gen) > 0.2
    seq_ids = torch.arange(n) // 4
    for clip in (None, 1.5):
        for reduction in REDUCTIONS:
            got = L.sampled_token_loss(student, teacher, sampler, clip=clip, mask=mask, reduction=reduction,
                                       seq_ids=seq_ids)
            expected = oracle.reduce(oracle.sampled(student.detach().numpy(), teacher.numpy(), sampler.numpy(), clip),
                                     mask.numpy(), None, reduction, seq_ids.numpy())
            np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12)
    # gradient: d/ds [-r A] = -r A where not clipped, 0 where clipped
    loss = L.sampled_token_loss(student, teacher, sampler, clip=1.5, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    ratio = torch.exp(student.detach() - sampler)
    expected_grad = torch.where(ratio < 1.5, -ratio * (teacher - sampler), torch.zeros_like(ratio))
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, None, 1000])
def test_chunk_size_does_not_change_results(gen, chunk_size):
    hs, ws, bs, th, tw, tb, mask, weights, seq_ids = _problem(gen, n=13, v=37)
    loss = L.fused_linear_kl(hs, ws, th, tw, mask=mask, impl="chunked", chunk_size=chunk_size)
    ref = L.fused_linear_kl(hs, ws, th, tw, mask=mask, impl="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
