"""An independent float64 NumPy oracle for sdft.losses, written from the definitions with plain
probability sums (no log-sum-exp shortcuts shared with the library)."""
from __future__ import annotations

import numpy as np


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_v p log(p / q) with 0 log 0 = 0."""
    keep = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def divergence(student_logits, teacher_logits, kind="forward", beta=0.5, temperature=1.0) -> np.ndarray:
    ps = softmax_rows(np.asarray(student_logits, np.float64) / temperature)
    pt = softmax_rows(np.asarray(teacher_logits, np.float64) / temperature)
    out = np.zeros(ps.shape[0])
    for n in range(ps.shape[0]):
        if kind == "forward" or (kind == "jsd" and beta == 0.0):
            out[n] = _kl(pt[n], ps[n])
        elif kind == "reverse" or (kind == "jsd" and beta == 1.0):
            out[n] = _kl(ps[n], pt[n])
        else:
            m = beta * pt[n] + (1.0 - beta) * ps[n]
            out[n] = beta * _kl(pt[n], m) + (1.0 - beta) * _kl(ps[n], m)
    return out


def _renormalized(lps: np.ndarray) -> np.ndarray:
    q = np.exp(lps - lps.max())
    return q / q.sum()


def _reverse_over_support(student_log: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) with p = softmax of the student's logits (or log-probs) at the slots, and p and q
    renormalized over the slots where q > 0."""
    keep = q > 0
    z = student_log[keep]
    p = np.exp(z - z.max())
    return _kl(p / p.sum(), q[keep] / q[keep].sum())


def topk_loss(student_logits, ids, logprobs, normalize="renormalize", kind="cross_entropy", temperature=1.0):
    ps = softmax_rows(np.asarray(student_logits, np.float64) / temperature)
    n_rows, vocab = ps.shape
    out = np.zeros(n_rows)
    for n in range(n_rows):
        slots = [(int(i), float(lp)) for i, lp in zip(ids[n], logprobs[n]) if 0 <= int(i) < vocab]
        if not slots:
            continue
        sid = [i for i, _ in slots]
        lps = np.array([lp for _, lp in slots])
        if kind == "reverse_kl":
            z = np.asarray(student_logits, np.float64)[n, sid] / temperature
            out[n] = _reverse_over_support(z, _renormalized(lps))
            continue
        if normalize == "renormalize":
            q = np.exp(lps - lps.max())
            q = q / q.sum()
            s = ps[n, sid]
            buckets_q, buckets_s = list(q), list(s)
        else:
            q = np.exp(lps)
            q_tail = max(0.0, 1.0 - q.sum())
            rest = np.ones(vocab, bool)
            rest[sid] = False
            buckets_q = list(q) + [q_tail]
            buckets_s = list(ps[n, sid]) + [ps[n, rest].sum()]
        total = 0.0
        for qb, sb in zip(buckets_q, buckets_s):
            if qb > 0:
                total += -qb * np.log(sb)
                if kind == "forward_kl":
                    total += qb * np.log(qb)
        out[n] = total
    return out


def topk_loss_from_logprobs(student_lp, ids, logprobs, vocab, normalize="renormalize", kind="cross_entropy"):
    """The top-K losses from the student's log-probs at the ids [N, K] (full-vocabulary normalized)."""
    student_lp = np.asarray(student_lp, np.float64)
    out = np.zeros(student_lp.shape[0])
    for n in range(student_lp.shape[0]):
        keep = [k for k, i in enumerate(ids[n]) if 0 <= int(i) < vocab]
        if not keep:
            continue
        ls = student_lp[n, keep]
        lps = np.asarray(logprobs[n], np.float64)[keep]
        if kind == "reverse_kl":
            out[n] = _reverse_over_support(ls, _renormalized(lps))
            continue
        if normalize == "renormalize":
            q, student, q_tail, s_tail = _renormalized(lps), ls, 0.0, 1.0
        else:
            q, student = np.exp(lps), ls
            q_tail, s_tail = max(0.0, 1.0 - q.sum()), 1.0 - np.exp(ls).sum()
        total = -float(np.sum(q * student))
        if q_tail > 0:
            total -= q_tail * np.log(s_tail)
        if kind == "forward_kl":
            total += float(np.sum(q[q > 0] * np.log(q[q > 0]))) + (q_tail * np.log(q_tail) if q_tail > 0 else 0.0)
        out[n] = total
    return out


def token_logprobs(logits, token_ids, temperature=1.0):
    p = softmax_rows(np.asarray(logits, np.float64) / temperature)
    return np.log(p[np.arange(p.shape[0]), np.asarray(token_ids)])


def entropy(logits, temperature=1.0):
    p = softmax_rows(np.asarray(logits, np.float64) / temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def sampled(student_lp, teacher_lp, sampler_lp, clip=None):
    ratio = np.exp(np.asarray(student_lp) - np.asarray(sampler_lp))
    if clip is not None:
        ratio = np.minimum(ratio, clip)
    return -ratio * (np.asarray(teacher_lp) - np.asarray(sampler_lp))


def reduce(per_token, mask=None, weights=None, reduction="token_mean", seq_ids=None):
    per_token = np.asarray(per_token, np.float64)
    n = per_token.shape[0]
    m = np.ones(n) if mask is None else np.asarray(mask, np.float64)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    vals = np.where(m > 0, per_token, 0.0) * m * w
    if reduction == "none":
        return vals
    if reduction == "sum":
        return vals.sum()
    if reduction == "token_mean":
        return vals.sum() / max(m.sum(), 1.0)
    seqs = sorted(set(np.asarray(seq_ids).tolist()))
    means = []
    for s in seqs:
        sel = np.asarray(seq_ids) == s
        means.append(vals[sel].sum() / max(m[sel].sum(), 1.0))
    return float(np.mean(means)) if means else 0.0
