"""Top-K losses from the student's log-probs at the teacher's top-K ids (no logits, no output layer):
what a backend that only returns per-token log-probs of chosen ids (the Tinker API) can train on."""
from __future__ import annotations

import math

import torch

from ._checks import TOPK_NORMALIZE, check_choice, check_float_tensor
from ._reduction import reduce_per_token
from .reference import topk_teacher_weights

TOPK_LOGPROB_KINDS = ("cross_entropy", "forward_kl", "reverse_kl")


def topk_loss_from_logprobs(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                            *, vocab_size: int, normalize: str = "renormalize", kind: str = "cross_entropy",
                            mask=None, weights=None, reduction: str = "none", seq_ids=None) -> torch.Tensor:
    """Top-K loss from student_logprobs [N, K] = log p_s(id_k), normalized over the FULL vocabulary (for
    kind="reverse_kl" any per-row constant may be added, e.g. the student logits at the ids may be passed).

    topk_ids [N, K]: slots with id < 0 or >= vocab_size are invalid and ignored. teacher_logprobs [N, K].
    With q (and q_tail) the teacher weights of `reference.topk_teacher_weights`:
      cross_entropy: -sum_k q_k log p_s(id_k)    forward_kl: sum_k q_k (log q_k - log p_s(id_k))
        (tail adds the bucket -q_tail log s_tail, resp. q_tail (log q_tail - log s_tail), with
        s_tail = 1 - sum_k p_s(id_k)): the values of `topk_distill_loss`.
      reverse_kl (renormalize only): with p~ = softmax over the valid slots of the student log-probs,
        sum_k p~_k (log p~_k - log q_k), the reverse KL between the two renormalized top-K distributions.
    A row without a valid slot gives 0. Mask, weights and reduction as in the other losses. Computed in
    float32 (float64 for float64 student inputs); differentiable in student_logprobs.
    """
    check_float_tensor("student_logprobs", student_logprobs, 2)
    check_choice("kind", kind, TOPK_LOGPROB_KINDS)
    check_choice("normalize", normalize, TOPK_NORMALIZE)
    if kind == "reverse_kl" and normalize != "renormalize":
        raise ValueError(f"kind='reverse_kl' needs normalize='renormalize', got {normalize!r}")
    if topk_ids.shape != student_logprobs.shape or teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)}, topk_ids {tuple(topk_ids.shape)} and "
                         f"teacher_logprobs {tuple(teacher_logprobs.shape)} must all be [N, K]")
    dtype = torch.float64 if student_logprobs.dtype == torch.float64 else torch.float32
    lp = student_logprobs.to(dtype)
    valid, q, q_tail = topk_teacher_weights(topk_ids, teacher_logprobs, vocab_size, normalize)
    q, q_tail = q.to(dtype), q_tail.to(dtype)
    zero = torch.zeros_like(lp)
    any_valid = valid.any(dim=-1)
    if kind == "reverse_kl":
        masked = torch.where(valid, lp, torch.full_like(lp, -math.inf))
        lse = torch.logsumexp(torch.where(any_valid[:, None], masked, zero), dim=-1, keepdim=True)
        log_p = torch.where(valid, lp - lse, zero)
        p = torch.where(valid, log_p.exp(), zero)
        log_q = torch.log(torch.where(q > 0, q, torch.ones_like(q)))
        per_token = torch.where(valid & (q > 0), p * (log_p - log_q), zero).sum(-1)
    else:
        safe_lp = torch.where(valid, lp, zero)
        per_token = -torch.where(q > 0, q * safe_lp, zero).sum(-1)
        if kind == "forward_kl":
            per_token = per_token + torch.where(q > 0, q * torch.log(torch.where(q > 0, q, torch.ones_like(q))),
                                                zero).sum(-1)
        if normalize == "tail":
            mass = torch.where(valid, safe_lp.exp(), zero).sum(-1)
            log_tail = torch.log1p(-mass.clamp(max=1.0 - torch.finfo(dtype).eps))
            has_tail = q_tail > 0
            safe_q_tail = torch.where(has_tail, q_tail, torch.ones_like(q_tail))
            tail = -q_tail * log_tail
            if kind == "forward_kl":
                tail = tail + q_tail * torch.log(safe_q_tail)
            per_token = per_token + torch.where(has_tail, tail, torch.zeros_like(tail))
    return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)
