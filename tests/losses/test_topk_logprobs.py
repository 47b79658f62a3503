"""`topk_loss_from_logprobs`: the top-K losses a backend without logits (Tinker) trains on."""
import pytest
import torch


@pytest.mark.parametrize("normalize, kind", [("renormalize", "cross_entropy"), ("renormalize", "forward_kl"),
                                             ("tail", "cross_entropy"), ("tail", "forward_kl")])
def test_topk_loss_from_logprobs_matches_the_reference_loss(normalize, kind):
    """The top-K loss from log-probs at the teacher's ids equals the logits reference (float64),
    values and gradients, with invalid slots and a row without any valid slot."""
    from sdft.losses import topk_distill_loss, topk_loss_from_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(6, 40, generator=gen, dtype=torch.float64), -1)
    ids = teacher.topk(5, dim=-1).indices
    lps = teacher.gather(1, ids).float()
    ids[1, 2], ids[2, 0], ids[3] = -1, 99, -1  # an invalid slot, an id outside V, a row without valid slot
    expected = topk_distill_loss(logits, ids, lps, normalize=normalize, kind=kind, reduction="none")
    student = torch.log_softmax(logits, -1).gather(1, torch.where((ids >= 0) & (ids < 40), ids, 0))
    got = topk_loss_from_logprobs(student, ids, lps, vocab_size=40, normalize=normalize, kind=kind)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grad_expected, = torch.autograd.grad(expected.sum(), logits)
    grad_got, = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-9, atol=1e-12)


def test_reverse_topk_kl_is_the_kl_between_renormalized_top_k_distributions():
    from sdft.losses import topk_loss_from_logprobs

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 30, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[4, 9, 2], [7, -1, 1], [-1, -1, -1]])
    lps = torch.tensor([[-0.3, -1.5, -2.0], [-0.1, -9.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float32)
    got = topk_loss_from_logprobs(torch.log_softmax(logits, -1).gather(1, ids.clamp(min=0)), ids, lps,
                                  vocab_size=30, normalize="renormalize", kind="reverse_kl")
    for row, valid in ((0, [0, 1, 2]), (1, [0, 2])):
        p = torch.softmax(logits[row, ids[row, valid]], -1)
        q = torch.softmax(lps[row, valid].double(), -1)
        # q is formed in the teacher log-probs' float32, as by the local backend's top-K losses
        assert float(got[row]) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-6)
    assert float(got[2]) == 0.0
    shifted = topk_loss_from_logprobs(logits.gather(1, ids.clamp(min=0)) + 3.0, ids, lps, vocab_size=30,
                                      normalize="renormalize", kind="reverse_kl")
    torch.testing.assert_close(shifted, got)  # logits at the ids are enough
    with pytest.raises(ValueError, match=r"reverse_kl' needs normalize='renormalize'"):
        topk_loss_from_logprobs(logits[:, :3], ids, lps, vocab_size=30, normalize="tail", kind="reverse_kl")
