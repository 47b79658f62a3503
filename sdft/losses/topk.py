"""Top-K distillation math on [N, K] tensors: the teacher's buckets, the rows that take part, and the
per-token losses from the student's log-probabilities at the teacher's top-K ids.

Per token: ids id_k [K] (slot k is valid iff 0 <= id_k < V; invalid slots are ignored whatever their
values), teacher log-probs lt_k, student log-probs ls_k = log p_s(id_k) normalized over the full vocabulary.
Teacher buckets:
  "renormalize"  log q_k = lt_k - logsumexp_{valid j} lt_j                       (q_tail = 0)
  "tail"         q_k = exp(lt_k),  q_tail = max(0, 1 - sum_k q_k),  student tail s_tail = 1 - sum_k p_s(id_k)
Per-token losses:
  cross_entropy  L = -sum_k q_k ls_k - q_tail log s_tail
  forward_kl     L = cross_entropy + sum_k q_k log q_k + q_tail log q_tail                (0 log 0 = 0)
  reverse_kl     (renormalize only) L = sum_{k in S} p_k (log p_k - log q_k) with S the valid slots with
                 q_k > 0 and p = softmax over S of the student inputs: the reverse KL between the student's and
                 the teacher's distributions renormalized over the top-K ids. A constant added to a row of
                 student inputs cancels, so the student logits at the ids serve as well as the log-probs.
Rows: a row without a valid slot takes no part, like a masked row (loss exactly 0 and zero gradient
whatever its other inputs and weight), but it still counts in the token_mean / seq_mean denominators.
Non-finite values in a row that takes part propagate: a NaN student or teacher value, or a teacher
log-prob of +inf, gives a NaN loss; a teacher log-prob of -inf is a bucket of probability 0 (a row whose
valid teacher log-probs are all -inf has no distribution to renormalize: NaN).
"""
from __future__ import annotations

import math

import torch

from ._checks import (
    TOPK_NORMALIZE, check_choice, check_float_tensor, check_token_vector, check_topk_inputs, check_topk_kind,
    check_vocab_size, compute_dtype,
)
from ._reduction import reduce_per_token, zero_inactive_rows


def valid_slots(topk_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, K] bool: True where 0 <= id < vocab_size."""
    return (topk_ids >= 0) & (topk_ids < vocab_size)


def active_rows(topk_ids: torch.Tensor, vocab_size: int, mask=None) -> torch.Tensor:
    """[N] bool: the rows that take part in a top-K loss, unmasked with at least one valid slot."""
    active = valid_slots(topk_ids, vocab_size).any(dim=-1)
    return active if mask is None else active & mask


def xlogx(x: torch.Tensor) -> torch.Tensor:
    """x log x with 0 log 0 = 0 (NaN stays NaN)."""
    nonzero = x != 0
    return torch.where(nonzero, x * torch.log(torch.where(nonzero, x, torch.ones_like(x))), torch.zeros_like(x))


def renormalized_teacher_logprobs(valid: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log q_k = lt_k - logsumexp over the valid slots [N, K] (-inf on invalid slots, 0 on rows without one),
    in float32 (float64 for float64 input); the teacher log-probs are not differentiated."""
    lp = topk_logprobs.detach().to(compute_dtype(topk_logprobs))
    any_valid = valid.any(dim=-1, keepdim=True)
    masked = torch.where(valid & any_valid, lp, torch.full_like(lp, -math.inf))
    lse = torch.logsumexp(torch.where(any_valid, masked, torch.zeros_like(lp)), dim=-1, keepdim=True)
    return torch.where(valid, masked - lse, torch.full_like(lp, -math.inf))


def topk_teacher_weights(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int,
                         normalize: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher bucket probabilities from top-K log-probs (module docstring).

    Returns (valid [N, K] bool, q [N, K], q_tail [N]): q = 0 on invalid slots, a row without a valid slot is
    all zeros; "renormalize" has q_tail = 0. A NaN or +inf log-prob at a valid slot makes the row's weights NaN.
    """
    check_choice("normalize", normalize, TOPK_NORMALIZE)
    valid = valid_slots(topk_ids, vocab_size)
    if normalize == "renormalize":
        q = renormalized_teacher_logprobs(valid, topk_logprobs).exp()
        return valid, q, torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
    lp = topk_logprobs.detach().to(compute_dtype(topk_logprobs))
    lp = torch.where(valid, lp, torch.full_like(lp, -math.inf))
    lp = torch.where(lp == math.inf, torch.full_like(lp, math.nan), lp)  # exp(+inf) would hide the error
    # q_tail = 1 - sum_k q_k = -expm1(logsumexp_k lt_k): accurate also when the tail is small
    return valid, lp.exp(), (-torch.expm1(torch.logsumexp(lp, dim=-1))).clamp(min=0.0)


def bucket_loss(student_lp: torch.Tensor, student_tail_lp, valid: torch.Tensor, q: torch.Tensor,
                q_tail: torch.Tensor, kind: str) -> torch.Tensor:
    """cross_entropy / forward_kl per token [N] from the student's log-probs at the ids [N, K] and, for the tail
    bucket, log s_tail [N] (None for "renormalize"). Student values at invalid slots, and at slots whose teacher
    weight is 0, are not read (a bucket without teacher mass contributes 0, also where log p_s = -inf)."""
    q = q.to(student_lp.dtype)
    read = valid & (q != 0)  # a NaN weight is read, and propagates
    lp = torch.where(read, student_lp, torch.zeros_like(student_lp))
    per_token = -(q * lp).sum(dim=-1)
    if kind == "forward_kl":
        per_token = per_token + xlogx(q).sum(dim=-1)
    if student_tail_lp is not None:
        q_tail = q_tail.to(lp.dtype)
        has_tail = q_tail != 0
        safe_tail_lp = torch.where(has_tail, student_tail_lp, torch.zeros_like(student_tail_lp))
        tail = -q_tail * safe_tail_lp
        if kind == "forward_kl":
            tail = tail + xlogx(q_tail)
        per_token = per_token + torch.where(has_tail, tail, torch.zeros_like(tail))
    return per_token


def reverse_kl(student: torch.Tensor, valid: torch.Tensor, teacher_logq: torch.Tensor) -> torch.Tensor:
    """Reverse KL per token [N] between the student inputs [N, K] (log-probs or logits at the ids) and the
    renormalized teacher log q [N, K], both renormalized over S = valid slots with q > 0 (module docstring)."""
    dtype = student.dtype
    log_q = teacher_logq.to(dtype)
    support = valid & (log_q != -math.inf)  # NaN stays in the support and propagates
    any_support = support.any(dim=-1, keepdim=True)
    masked = torch.where(support, student, torch.full_like(student, -math.inf))
    lse = torch.logsumexp(torch.where(any_support, masked, torch.zeros_like(student)), dim=-1, keepdim=True)
    log_p = torch.where(support, student - lse, torch.zeros_like(student))
    p = torch.where(support, log_p.exp(), torch.zeros_like(student))
    # 0 log 0 = 0 where the student has no mass; the where()s keep -inf out of the gradient there too
    nonzero = p != 0
    safe_log_p = torch.where(nonzero, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(support, log_q, torch.zeros_like(log_q))
    return torch.where(nonzero, p * (safe_log_p - safe_log_q), torch.zeros_like(p)).sum(dim=-1)


def topk_per_token(student: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                   vocab_size: int, normalize: str, kind: str, active: torch.Tensor) -> torch.Tensor:
    """Per-token top-K loss [N] from the student's log-probs (or, for reverse_kl, logits) at the ids [N, K];
    exactly 0, with zero gradient, on rows outside `active` [N] bool. Arguments already checked."""
    lp = zero_inactive_rows(student, active).to(compute_dtype(student))
    teacher = zero_inactive_rows(teacher_logprobs.detach(), active)
    valid = valid_slots(topk_ids, vocab_size)
    if kind == "reverse_kl":
        per_token = reverse_kl(lp, valid, renormalized_teacher_logprobs(valid, teacher))
    else:
        _, q, q_tail = topk_teacher_weights(topk_ids, teacher, vocab_size, normalize)
        tail_lp = None
        if normalize == "tail":
            # log s_tail = log(1 - exp(lse)) with lse = log sum_k p_s(id_k), kept below log(1 - eps); expm1 keeps
            # a small tail accurate, and a NaN passes the where() with its gradient
            lse = torch.logsumexp(torch.where(valid, lp, torch.full_like(lp, -math.inf)), dim=-1)
            cap = math.log1p(-torch.finfo(lp.dtype).eps)
            tail_lp = torch.log(-torch.expm1(torch.where(lse > cap, torch.full_like(lse, cap), lse)))
        per_token = bucket_loss(lp, tail_lp, valid, q, q_tail, kind)
    return torch.where(active, per_token, torch.zeros_like(per_token))


def topk_loss_from_logprobs(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                            *, vocab_size: int, normalize: str = "renormalize", kind: str = "cross_entropy",
                            mask=None, weights=None, reduction: str = "none", seq_ids=None) -> torch.Tensor:
    """Top-K distillation loss from the student's log-probs at the teacher's top-K ids (backends without
    logits, e.g. Tinker). Per-token output [N] by default (reduction="none").

    student_logprobs [N, K]: log p_s(id_k) normalized over the FULL vocabulary of `vocab_size` tokens (for
    kind="reverse_kl" a constant may be added to each row, e.g. the student logits at the ids; divide them by
    the temperature first). topk_ids [N, K] integer, slots with id < 0 or >= vocab_size ignored;
    teacher_logprobs [N, K] the teacher's log-probs (not differentiated). Losses as in the module docstring:
    "renormalize" | "tail" with cross_entropy | forward_kl, or "renormalize" with reverse_kl; the values of
    `topk_distill_loss` on the same student. The tail's student mass is formed from the K log-probs,
    s_tail = -expm1(logsumexp_k ls_k), kept >= eps (the full-logit losses form it exactly from the other
    logits instead). Gradients flow to student_logprobs; math in float32 (float64 for float64 input). Mask,
    weights and reduction as in `sdft.losses._reduction`.
    """
    check_float_tensor("student_logprobs", student_logprobs, 2)
    n = student_logprobs.shape[0]
    check_topk_inputs(topk_ids, teacher_logprobs, n, student_logprobs.device, logprobs_name="teacher_logprobs")
    if student_logprobs.shape != topk_ids.shape:
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)} must have the shape of topk_ids "
                         f"{tuple(topk_ids.shape)} (the student's log-prob at every top-K id)")
    check_vocab_size(vocab_size)
    check_topk_kind(kind, normalize)
    check_token_vector("mask", mask, n, student_logprobs.device, boolean=True)
    active = active_rows(topk_ids, vocab_size, mask)
    per_token = topk_per_token(student_logprobs, topk_ids, teacher_logprobs, vocab_size=vocab_size,
                               normalize=normalize, kind=kind, active=active)
    return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                            active=active)
