"""Fused-linear losses: from hidden states and output-layer weights, without [N, V] logits.

`impl` picks the path explicitly:
  "reference" - materialize the logits in float32 and call `sdft.losses.reference` (the oracle);
  "chunked"   - `sdft.losses.chunked`: token chunks, any device;
  "triton"    - fused Triton kernels (CUDA tensors, or CPU tensors under the Triton interpreter);
  "auto"      - "triton" for CUDA tensors when Triton is importable, else "chunked".
Every path honours the same contract for non-finite values (`sdft.losses._reduction`): masked rows give
exactly 0 and zero gradient whatever their inputs; a NaN in an unmasked row gives a NaN loss and NaN
gradients.
"""
from __future__ import annotations

import importlib.util

import torch

from . import chunked, reference, topk
from ._checks import (
    IMPLS, KL_KINDS, check_beta, check_chunk_size, check_choice, check_linear, check_temperature,
    check_token_vector, check_topk_inputs, check_topk_kind, compute_dtype,
)
from ._reduction import reduce_per_token, token_scale, zero_inactive_rows

TRITON_ALTERNATIVES = "impl='chunked' (any device) or impl='auto' (Triton on CUDA when installed, else chunked)"


def check_triton_runs(device: torch.device) -> None:
    """Raise a ValueError unless the Triton kernels can run on tensors on `device`: Triton must be installed,
    and the tensors on CUDA, or the kernels built for the Triton interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("impl='triton' needs the triton package, which is not installed: "
                         f"pip install 'sdft[triton]', or use {TRITON_ALTERNATIVES}")
    if device.type == "cuda":
        return
    from .triton_common import kernels_run_in_interpreter
    if not kernels_run_in_interpreter():
        raise ValueError(f"impl='triton' got tensors on device '{device}', where the Triton kernels cannot run; "
                         "allowed: CUDA tensors, or, for debugging, CPU tensors with TRITON_INTERPRET=1 set before "
                         f"Python starts (the slow Triton interpreter); otherwise use {TRITON_ALTERNATIVES}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map "auto" to a concrete path for tensors on `device`; check that an explicit "triton" can run there."""
    check_choice("impl", impl, IMPLS)
    if impl == "triton":
        check_triton_runs(device)
    if impl != "auto":
        return impl
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "chunked"


def _materialized_logits(hidden, weight, bias, active=None) -> torch.Tensor:
    """[N, V] logits in float32 (float64 for float64 inputs); rows of hidden outside `active` are zeroed first
    so that non-finite values there reach neither the loss nor the weight gradient."""
    dtype = compute_dtype(hidden, weight)
    logits = zero_inactive_rows(hidden, active).to(dtype) @ weight.to(dtype).T
    return logits if bias is None else logits + bias.to(dtype)


def _chunk_rows(chunk_size, vocab_size: int) -> int:
    check_chunk_size(chunk_size)
    return chunk_size if chunk_size is not None else chunked.auto_chunk_size(vocab_size)


def _coefficients(hidden, weight, *, mask, weights, reduction, seq_ids, active=None) -> torch.Tensor:
    dtype = compute_dtype(hidden, weight)
    return token_scale(hidden.shape[0], hidden.device, mask=mask, weights=weights, reduction=reduction,
                       seq_ids=seq_ids, dtype=dtype, active=active)


def _finish(out: torch.Tensor, per_token: torch.Tensor, reduction: str, return_per_token: bool):
    out = out if reduction == "none" else out.reshape(())
    return (out, per_token) if return_per_token else out


def _reduced(per_token: torch.Tensor, *, mask, weights, reduction, seq_ids, return_per_token: bool, active=None):
    """Paths with differentiable per-token losses [N]: reduce them (optionally returned, detached, beside)."""
    out = reduce_per_token(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                           active=active)
    return (out, per_token.detach()) if return_per_token else out


def fused_linear_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, *, kind: str = "forward", beta: float = 0.5,
                    temperature: float = 1.0, mask=None, weights=None, reduction: str = "token_mean", seq_ids=None,
                    student_bias=None, teacher_bias=None, chunk_size=None, impl: str = "auto",
                    return_per_token: bool = False):
    """Full-vocabulary divergence between student logits h_s W_s^T (+ b_s) and teacher logits h_t W_t^T (+ b_t).

    Shapes: student_hidden [N, H], student_weight [V, H], teacher_hidden [N, Ht], teacher_weight [V, Ht]
    (H and Ht may differ; V must match). Divergences as in `reference.per_token_divergence`; reductions
    as in `sdft.losses._reduction`. Gradients reach student_hidden, student_weight and student_bias (when
    they require grad), never the teacher inputs. `return_per_token=True` returns (loss, L) with L [N] the
    detached per-token divergences before weights (0 on masked rows): the metric of the same pass, at no
    extra cost.
    """
    n, _, v = check_linear("student", student_hidden, student_weight, student_bias)
    nt, _, vt = check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if vt != v:
        raise ValueError(f"vocabulary mismatch: student_weight has V={v} rows but teacher_weight has V={vt}; "
                         "teacher and student must share one vocabulary")
    if nt != n:
        raise ValueError(f"teacher_hidden has {nt} tokens but student_hidden has {n}; they must be aligned")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher inputs are on {teacher_hidden.device} but student inputs on {student_hidden.device}")
    check_choice("kind", kind, KL_KINDS)
    check_beta(beta)
    check_temperature(temperature)
    check_token_vector("mask", mask, n, student_hidden.device, boolean=True)
    impl = resolve_impl(impl, student_hidden.device)
    if impl == "reference":
        per_token = reference.kl_divergence(
            _materialized_logits(student_hidden, student_weight, student_bias, mask),
            _materialized_logits(teacher_hidden.detach(), teacher_weight.detach(),
                                 None if teacher_bias is None else teacher_bias.detach(), mask),
            kind=kind, beta=beta, temperature=temperature, mask=mask, reduction="none")
        return _reduced(per_token, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                        return_per_token=return_per_token)
    coeff = _coefficients(student_hidden, student_weight, mask=mask, weights=weights, reduction=reduction,
                          seq_ids=seq_ids)
    if impl == "triton":
        from .triton_dispatch import triton_kl
        out, per_token = triton_kl(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                   teacher_bias, coeff, mask, reduction=reduction, kind=kind, beta=beta,
                                   temperature=temperature)
        return _finish(out, per_token, reduction, return_per_token)
    dtype = compute_dtype(student_hidden, student_weight)
    teacher_w = chunked._upcast(teacher_weight, dtype)
    teacher_b = chunked._scaled_bias(teacher_bias, dtype, temperature)
    teacher_may_be_inf = teacher_bias is not None and not bool(torch.isfinite(teacher_bias).all())
    if teacher_b is not None and teacher_may_be_inf:
        teacher_b = teacher_b.clamp(min=-1e30)  # -inf stays "probability 0" without inf - inf = nan
    plan = chunked.ChunkPlan(
        kernel=chunked.KLKernel(
            chunked.LinearSide(teacher_hidden.detach(), teacher_w, teacher_b, temperature), kind, float(beta),
            teacher_may_be_inf,
        ),
        temperature=temperature, chunk_size=_chunk_rows(chunk_size, v), reduce=reduction != "none", active=mask,
    )
    out, per_token = chunked.run(student_hidden, student_weight, student_bias, coeff, plan)
    return _finish(out, per_token, reduction, return_per_token)


def fused_linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, bias=None, temperature: float = 1.0,
                      chunk_size=None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The K most likely ids [N, K] (int64, by descending log-prob) and their log-probs [N, K] (float32),
    normalized over the full vocabulary, of softmax((h W^T + b) / T). No gradient. A row of hidden with a
    NaN gets NaN log-probs (its ids are then meaningless); the other rows are unaffected."""
    n, _, v = check_linear("teacher", hidden, weight, bias)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= v:
        raise ValueError(f"k={k!r} must be an int in [1, V={v}]")
    check_temperature(temperature)
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        ids, logprobs = reference.topk_logprobs(_materialized_logits(hidden, weight, bias), k, temperature=temperature)
        return ids, logprobs.to(torch.float32)
    if impl == "triton":
        from .triton_dispatch import triton_topk
        return triton_topk(hidden, weight, bias, k, temperature=temperature)
    return chunked.chunked_topk(hidden, weight, bias, k, temperature, _chunk_rows(chunk_size, v))


def fused_linear_topk_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                   topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                                   normalize: str = "renormalize", kind: str = "cross_entropy",
                                   temperature: float = 1.0, mask=None, weights=None, reduction: str = "token_mean",
                                   seq_ids=None, student_bias=None, chunk_size=None, impl: str = "auto",
                                   return_per_token: bool = False):
    """Top-K distillation (see `reference.topk_distill_loss` and `sdft.losses.topk`) from student hidden states
    [N, H] and the output layer [V, H] (+ bias [V]); gradients reach student_hidden, student_weight and
    student_bias when they require grad.

    cross_entropy / forward_kl: the student's log-probs are over the full vocabulary, built chunk by chunk
    (Triton kernels for impl="triton"). reverse_kl (normalize="renormalize" only): only the student logits at
    the K ids are needed, z_k = (h . W[id_k] + b[id_k]) / T; every impl except "reference" gathers the K rows
    of W per token, chunk_size tokens at a time ([chunk, K, H], never [N, V]), and needs no Triton kernel.
    `return_per_token=True` returns (loss, per-token losses [N] detached, 0 on masked rows and on rows without
    a valid slot), as `fused_linear_kl`.
    """
    n, h_size, v = check_linear("student", student_hidden, student_weight, student_bias)
    k = check_topk_inputs(topk_ids, topk_logprobs, n, student_hidden.device)
    check_topk_kind(kind, normalize)
    check_temperature(temperature)
    check_token_vector("mask", mask, n, student_hidden.device, boolean=True)
    impl = resolve_impl(impl, student_hidden.device)
    active = topk.active_rows(topk_ids, v, mask)
    reduced = dict(mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                   return_per_token=return_per_token, active=active)
    if impl == "reference":
        per_token = reference.topk_distill_loss(
            _materialized_logits(student_hidden, student_weight, student_bias, active), topk_ids, topk_logprobs,
            normalize=normalize, kind=kind, temperature=temperature, mask=mask, reduction="none")
        return _reduced(per_token, **reduced)
    valid = topk.valid_slots(topk_ids, v)
    safe_ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    if kind == "reverse_kl":
        check_chunk_size(chunk_size)
        rows = torch.nonzero(active).view(-1)
        z = chunked.logits_at_ids(student_hidden, student_weight, student_bias, safe_ids, rows, temperature,
                                  chunk_size or chunked.auto_gather_rows(k, h_size))
        per_token = topk.topk_per_token(z, topk_ids, topk_logprobs, vocab_size=v, normalize=normalize, kind=kind,
                                        active=active)
        return _reduced(per_token, **reduced)
    coeff = _coefficients(student_hidden, student_weight, mask=mask, weights=weights, reduction=reduction,
                          seq_ids=seq_ids, active=active)
    teacher = zero_inactive_rows(topk_logprobs.detach(), active)
    if impl == "triton":
        from .triton_dispatch import triton_topk_distill
        out, per_token = triton_topk_distill(student_hidden, student_weight, student_bias, topk_ids, teacher, coeff,
                                             active, reduction=reduction, normalize=normalize, kind=kind,
                                             temperature=temperature)
        return _finish(out, per_token, reduction, return_per_token)
    _, q, q_tail = topk.topk_teacher_weights(topk_ids, teacher, v, normalize)
    q_logq = topk.xlogx(q).sum(-1) + topk.xlogx(q_tail)
    plan = chunked.ChunkPlan(
        kernel=chunked.TopKKernel(safe_ids, valid, q, q_tail, q_logq, normalize == "tail", kind == "forward_kl"),
        temperature=temperature, chunk_size=_chunk_rows(chunk_size, v), reduce=reduction != "none", active=active,
    )
    out, per_token = chunked.run(student_hidden, student_weight, student_bias, coeff, plan)
    return _finish(out, per_token, reduction, return_per_token)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *, bias=None,
                                temperature: float = 1.0, chunk_size=None, impl: str = "auto",
                                return_entropy: bool = False):
    """log p(token_ids[n]) [N] (float32) under softmax((h W^T + b) / T), differentiable wrt hidden, weight
    and bias; with return_entropy=True also the entropy H(p) [N] (detached). Used for the sampled-token
    loss, importance weights, SFT cross-entropy (= -mean log p) and entropy metrics."""
    n, _, v = check_linear("hidden", hidden, weight, bias)
    check_token_vector("token_ids", token_ids, n, hidden.device, integer=True)
    check_temperature(temperature)
    if n and (int(token_ids.min()) < 0 or int(token_ids.max()) >= v):
        raise ValueError(f"token_ids must lie in [0, {v}) (the vocabulary), got min {int(token_ids.min())}, "
                         f"max {int(token_ids.max())}")
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        logits = _materialized_logits(hidden, weight, bias)
        values = reference.token_logprobs(logits, token_ids, temperature=temperature)
        if return_entropy:
            return values, reference.entropy(logits.detach(), temperature=temperature)
        return values
    # the Triton kernels cover the losses; log-probs of given tokens use the chunked path on every device
    plan = chunked.ChunkPlan(kernel=chunked.TokenLogprobKernel(token_ids.long(), return_entropy),
                             temperature=temperature, chunk_size=_chunk_rows(chunk_size, v), reduce=False)
    coeff = torch.ones(n, dtype=compute_dtype(hidden, weight), device=hidden.device)
    values, entropy = chunked.run(hidden, weight, bias, coeff, plan)
    if values.dtype != torch.float64:
        values = values.to(torch.float32)
    return (values, entropy.to(values.dtype)) if return_entropy else values
