"""Plain-PyTorch losses on materialized logits [N, V]: the readable definitions and the test oracle.

Notation: z = logits [N, V], p = softmax(z / T), log p = log_softmax(z / T). Math runs in float32
(float64 when the inputs are float64); gradients flow through ordinary autograd. Every function
returns per-token losses [N] reduced as described in `sdft.losses._reduction` (mask, weights,
"none" | "sum" | "token_mean" | "seq_mean").

Non-finite values: masked rows are replaced by zeros before any math, so they contribute exactly 0 and get
exactly 0 gradient. In unmasked rows NaN propagates to the loss and the gradient (never dropped by a
"p > 0" test); a -inf logit or teacher log-prob is a token of probability 0, well defined.
"""
from __future__ import annotations

import math

import torch

from . import topk
from ._checks import (
    KL_KINDS, check_beta, check_choice, check_float_tensor, check_same_device, check_temperature,
    check_token_vector, check_topk_inputs, check_topk_kind, compute_dtype,
)
from ._reduction import reduce_per_token, zero_inactive_rows
from .topk import topk_teacher_weights  # noqa: F401  (its home is sdft.losses.topk)


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(z / T) in float32 (float64 for float64 input); [N, V] -> [N, V]."""
    return torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) per row, with 0 * (anything) = 0 where p == 0 (log p = -inf there); a NaN in p
    stays NaN."""
    nonzero = p != 0
    safe_log_p = torch.where(nonzero, log_p, torch.zeros_like(log_p))
    terms = torch.where(nonzero, p * (safe_log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def per_token_divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "forward",
                         beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence [N] between log-distributions [N, V].

    forward: KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)        (the official SDFT loss)
    reverse: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)
    jsd:     beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s,
             with the endpoints special-cased: beta = 0 is forward KL, beta = 1 is reverse KL.
    """
    check_choice("kind", kind, KL_KINDS)
    p_s, p_t = student_logp.exp(), teacher_logp.exp()
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        return _xlogy_diff(p_t, teacher_logp, student_logp)
    if kind == "reverse":
        return _xlogy_diff(p_s, student_logp, teacher_logp)
    log_m = torch.logaddexp(student_logp + math.log(1.0 - beta), teacher_logp + math.log(beta))
    return beta * _xlogy_diff(p_t, teacher_logp, log_m) + (1.0 - beta) * _xlogy_diff(p_s, student_logp, log_m)


def _check_logits_pair(student_logits, teacher_logits) -> None:
    check_float_tensor("student_logits", student_logits, 2)
    check_float_tensor("teacher_logits", teacher_logits, 2)
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[1]} but teacher_logits has "
            f"V={teacher_logits.shape[1]}; teacher and student must share one vocabulary"
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student_logits has {student_logits.shape[0]} tokens but teacher_logits has {teacher_logits.shape[0]}"
        )
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward",
                  beta: float = 0.5, temperature: float = 1.0, mask=None, weights=None,
                  reduction: str = "token_mean", seq_ids=None) -> torch.Tensor:
    """Full-vocabulary divergence between student and teacher logits [N, V] (see `per_token_divergence`).

    The teacher side is detached: gradients flow to `student_logits` only.
    """
    _check_logits_pair(student_logits, teacher_logits)
    check_choice("kind", kind, KL_KINDS)
    check_beta(beta)
    check_temperature(temperature)
    check_token_vector("mask", mask, student_logits.shape[0], student_logits.device, boolean=True)
    per_token = per_token_divergence(
        log_probs(zero_inactive_rows(student_logits, mask), temperature),
        log_probs(zero_inactive_rows(teacher_logits.detach(), mask), temperature), kind, beta,
    )
    return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)


def topk_distill_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                      normalize: str = "renormalize", kind: str = "cross_entropy", temperature: float = 1.0,
                      mask=None, weights=None, reduction: str = "token_mean", seq_ids=None) -> torch.Tensor:
    """Distillation on the teacher's top-K tokens from student logits [N, V] (the math: `sdft.losses.topk`).

    renormalize (cookbook): q = softmax_k(teacher log-probs);
        cross_entropy: -sum_k q_k log p_s(id_k);   forward_kl: sum_k q_k (log q_k - log p_s(id_k));
        reverse_kl: the reverse KL between the student's and the teacher's distributions renormalized over
        the K ids (it reads only the student logits at the ids).
    tail: K + 1 buckets, teacher (q_k, q_tail = 1 - sum q_k), student (p_s(id_k), 1 - sum_k p_s(id_k)), the
        student's tail formed exactly as the log-sum-exp of the other logits:
        cross_entropy: -sum_b q_b log s_b;          forward_kl: sum_b q_b (log q_b - log s_b).
    Student log-probs are over the FULL vocabulary, log_softmax(z / T). Invalid ids (< 0 or >= V) are ignored;
    a row without a valid id takes no part (loss 0, zero gradient). Ids within a row are expected to be distinct.
    """
    check_float_tensor("student_logits", student_logits, 2)
    n, v = student_logits.shape
    check_topk_inputs(topk_ids, topk_logprobs, n, student_logits.device)
    check_topk_kind(kind, normalize)
    check_temperature(temperature)
    check_token_vector("mask", mask, n, student_logits.device, boolean=True)
    active = topk.active_rows(topk_ids, v, mask)
    logits = zero_inactive_rows(student_logits, active)
    teacher = zero_inactive_rows(topk_logprobs.detach(), active)
    valid = topk.valid_slots(topk_ids, v)
    safe_ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    if kind == "reverse_kl":
        student_k = (logits.to(compute_dtype(logits)) / temperature).gather(1, safe_ids)
        per_token = topk.reverse_kl(student_k, valid, topk.renormalized_teacher_logprobs(valid, teacher))
        return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                                active=active)
    logp_s = log_probs(logits, temperature)
    _, q, q_tail = topk.topk_teacher_weights(topk_ids, teacher, v, normalize)
    tail_lp = None
    if normalize == "tail":
        rows = torch.arange(n, device=logp_s.device)[:, None].expand_as(safe_ids)
        in_topk = torch.zeros_like(logp_s, dtype=torch.bool)
        in_topk[rows[valid], safe_ids[valid]] = True
        tail_lp = torch.logsumexp(torch.where(in_topk, torch.full_like(logp_s, -math.inf), logp_s), dim=-1)
    per_token = topk.bucket_loss(logp_s.gather(1, safe_ids), tail_lp, valid, q, q_tail, kind)
    return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                            active=active)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log p(token_ids[n]) under softmax(z_n / T): [N, V], [N] -> [N] (float32, or float64)."""
    check_float_tensor("logits", logits, 2)
    check_token_vector("token_ids", token_ids, logits.shape[0], logits.device, integer=True)
    check_temperature(temperature)
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= logits.shape[1]):
        raise ValueError(f"token_ids must lie in [0, {logits.shape[1]}) (the vocabulary), got "
                         f"min {int(token_ids.min())}, max {int(token_ids.max())}")
    return log_probs(logits, temperature).gather(1, token_ids.long()[:, None]).squeeze(1)


def entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """H(p) = -sum_v p log p per row: [N, V] -> [N]."""
    logp = log_probs(logits, temperature)
    return -torch.where(logp.exp() > 0, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


def topk_logprobs(logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The K most likely ids [N, K] (int64) and their log-probs [N, K], normalized over the full vocabulary."""
    check_float_tensor("logits", logits, 2)
    if not isinstance(k, int) or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k={k!r} must be an int in [1, V={logits.shape[1]}]")
    logp = log_probs(logits.detach(), temperature)
    values, ids = torch.topk(logp, k, dim=-1)
    return ids, values


def sampled_token_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                       sampler_logprobs: torch.Tensor, *, clip: float | None = None, mask=None, weights=None,
                       reduction: str = "token_mean", seq_ids=None) -> torch.Tensor:
    """Sampled-token fallback (top-K = 0): importance-weighted policy gradient with advantage
    A = log p_teacher(y) - log p_sampler(y) (detached) and ratio r = exp(log p_student(y) - log p_sampler(y)),
    clamped at `clip` when given (no gradient where clamped). Per token: L = -r * A, so that
    grad L = -r A grad log p_student(y): a sampled-token estimator of the reverse KL. Inputs [N]."""
    check_float_tensor("student_logprobs", student_logprobs, 1)
    n = student_logprobs.shape[0]
    for name, t in (("teacher_logprobs", teacher_logprobs), ("sampler_logprobs", sampler_logprobs)):
        check_float_tensor(name, t, 1)
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}] like student_logprobs, got {tuple(t.shape)}")
    check_same_device(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs,
                      sampler_logprobs=sampler_logprobs)
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip={clip!r} must be None or a number > 0 (the maximum importance ratio)")
    check_token_vector("mask", mask, n, student_logprobs.device, boolean=True)
    dtype = compute_dtype(student_logprobs)
    sampler = zero_inactive_rows(sampler_logprobs.detach().to(dtype), mask)
    advantage = zero_inactive_rows(teacher_logprobs.detach().to(dtype), mask) - sampler
    ratio = torch.exp(zero_inactive_rows(student_logprobs.to(dtype), mask) - sampler)
    if clip is not None:  # not clamp(): its gradient at a NaN ratio is 0, which would hide the NaN
        ratio = torch.where(ratio > clip, torch.full_like(ratio, float(clip)), ratio)
    return reduce_per_token(-ratio * advantage, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)
