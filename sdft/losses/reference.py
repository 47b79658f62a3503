"""Plain-PyTorch losses on materialized logits [N, V]: the readable definitions and the test oracle.

Notation: z = logits [N, V], p = softmax(z / T), log p = log_softmax(z / T). Math runs in float32
(float64 when the inputs are float64); gradients flow through ordinary autograd. Every function
returns per-token losses [N] reduced as described in `sdft.losses._reduction` (mask, weights,
"none" | "sum" | "token_mean" | "seq_mean").
"""
from __future__ import annotations

import math

import torch

from ._checks import (
    KL_KINDS, TOPK_KINDS, TOPK_NORMALIZE, check_beta, check_choice, check_float_tensor, check_same_device,
    check_temperature, check_token_vector, check_topk_inputs,
)
from ._reduction import reduce_per_token


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast, never the reverse)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(z / T) in float32 (float64 for float64 input); [N, V] -> [N, V]."""
    return torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) per row, with 0 * (anything) = 0 where p == 0 (log p = -inf there)."""
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    terms = torch.where(p > 0, p * (safe_log_p - log_q), torch.zeros_like(p))
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


def _zero_masked_rows(x: torch.Tensor, mask) -> torch.Tensor:
    """Replace masked rows by zeros so that NaN or inf there cannot reach the loss or the gradient."""
    if mask is None or x.shape[0] != mask.shape[0]:
        return x
    keep = mask.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


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
        log_probs(_zero_masked_rows(student_logits, mask), temperature),
        log_probs(_zero_masked_rows(teacher_logits.detach(), mask), temperature), kind, beta,
    )
    return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)


def topk_teacher_weights(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int,
                         normalize: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher bucket probabilities from top-K log-probs.

    Returns (valid [N, K] bool, q [N, K], q_tail [N]). Slots whose id is < 0 or >= V are invalid and get
    weight 0. "renormalize": q = softmax of the valid log-probs (q_tail = 0); a row with no valid slot is
    all zeros. "tail": q = exp(log-probs) of the valid slots and q_tail = max(0, 1 - sum_k q_k).
    """
    check_choice("normalize", normalize, TOPK_NORMALIZE)
    valid = (topk_ids >= 0) & (topk_ids < vocab_size)
    lp = topk_logprobs.detach().to(compute_dtype(topk_logprobs))
    if normalize == "renormalize":
        masked = torch.where(valid, lp, torch.full_like(lp, -math.inf))
        any_valid = valid.any(dim=-1, keepdim=True)
        q = torch.where(valid & any_valid, torch.softmax(torch.where(any_valid, masked, torch.zeros_like(lp)), -1),
                        torch.zeros_like(lp))
        return valid, q, torch.zeros(lp.shape[0], dtype=lp.dtype, device=lp.device)
    q = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    return valid, q, (1.0 - q.sum(dim=-1)).clamp(min=0.0)


def topk_distill_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                      normalize: str = "renormalize", kind: str = "cross_entropy", temperature: float = 1.0,
                      mask=None, weights=None, reduction: str = "token_mean", seq_ids=None) -> torch.Tensor:
    """Distillation on the teacher's top-K tokens; student log-probs over the FULL vocabulary.

    renormalize (cookbook): w = softmax_k(teacher log-probs);
        cross_entropy: -sum_k w_k log p_s(id_k);   forward_kl: sum_k w_k (log w_k - log p_s(id_k)).
    tail: K + 1 buckets, teacher (q_k, q_tail = 1 - sum q_k), student (p_s(id_k), 1 - sum_k p_s(id_k)):
        cross_entropy: -sum_b q_b log s_b;          forward_kl: sum_b q_b (log q_b - log s_b).
    Invalid ids (< 0 or >= V) are ignored. Ids within a row are expected to be distinct.
    """
    check_float_tensor("student_logits", student_logits, 2)
    n, v = student_logits.shape
    check_topk_inputs(topk_ids, topk_logprobs, n, student_logits.device)
    check_choice("normalize", normalize, TOPK_NORMALIZE)
    check_choice("kind", kind, TOPK_KINDS)
    check_temperature(temperature)
    check_token_vector("mask", mask, n, student_logits.device, boolean=True)
    logp_s = log_probs(_zero_masked_rows(student_logits, mask), temperature)
    valid, q, q_tail = topk_teacher_weights(topk_ids, _zero_masked_rows(topk_logprobs, mask), v, normalize)
    q = q.to(logp_s.dtype)
    q_tail = q_tail.to(logp_s.dtype)
    safe_ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    student_lp_k = logp_s.gather(1, safe_ids)
    zero = torch.zeros_like(q)
    per_token = -torch.where(q > 0, q * student_lp_k, zero).sum(-1)
    if kind == "forward_kl":
        per_token = per_token + torch.where(q > 0, q * torch.log(torch.where(q > 0, q, torch.ones_like(q))), zero).sum(-1)
    if normalize == "tail":
        in_topk = torch.zeros_like(logp_s, dtype=torch.bool)
        in_topk[torch.arange(n, device=logp_s.device)[:, None].expand_as(safe_ids)[valid], safe_ids[valid]] = True
        student_tail_lp = torch.logsumexp(torch.where(in_topk, torch.full_like(logp_s, -math.inf), logp_s), dim=-1)
        has_tail = q_tail > 0
        safe_tail_lp = torch.where(has_tail, student_tail_lp, torch.zeros_like(student_tail_lp))
        tail_term = -torch.where(has_tail, q_tail * safe_tail_lp, torch.zeros_like(q_tail))
        if kind == "forward_kl":
            safe_q_tail = torch.where(has_tail, q_tail, torch.ones_like(q_tail))
            tail_term = tail_term + torch.where(has_tail, q_tail * torch.log(safe_q_tail), torch.zeros_like(q_tail))
        per_token = per_token + tail_term
    return reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)


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
    sampler = _zero_masked_rows(sampler_logprobs.detach().to(dtype), mask)
    advantage = _zero_masked_rows(teacher_logprobs.detach().to(dtype), mask) - sampler
    ratio = torch.exp(_zero_masked_rows(student_logprobs.to(dtype), mask) - sampler)
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    return reduce_per_token(-ratio * advantage, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids)
