"""Autograd wrappers that connect the Triton kernels (triton_kl, triton_topk) to the public API.

The kernels take per-token coefficients c [N] (mask, weights and reduction folded in, see `_reduction`) and
the active rows [N] (inactive rows: loss 0 and zero gradient whatever their inputs), and return the
per-token losses L [N] together with gradients already scaled by c: dh [N, H], and on request dW [V, H]
and db [V], all in float32. A reduced loss is sum_n c_n L_n and its backward only multiplies by grad_output. For reduction "none" (output c_n L_n per token) the hidden-state gradient is
rescaled per row, and a weight or bias gradient is obtained by calling the kernels once more with the
coefficients c * grad_output. Each wrapper returns (loss, per-token losses L [N] detached).
"""
from __future__ import annotations

from typing import Callable

import torch

Compute = Callable[[torch.Tensor, bool], tuple]
"""(coefficients [N], need_weight_grad) -> (loss [N], dh [N,H], dW [V,H] or None, db [V] or None)."""


class PrecomputedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, coeff, compute: Compute, reduce: bool):
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, dh, dw, db = compute(coeff, reduce and need_w)
        coeff32 = coeff.to(torch.float32)
        out = (loss * coeff32).sum() if reduce else loss * coeff32
        ctx.compute, ctx.reduce = compute, reduce
        ctx.flags = (ctx.needs_input_grad[0], need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(dh, dw if reduce and need_w else None, db if reduce and need_b else None, coeff)
        per_token = loss.detach()
        ctx.mark_non_differentiable(per_token)
        return out, per_token

    @staticmethod
    def backward(ctx, grad_out, _grad_per_token):
        dh, dw, db, coeff = ctx.saved_tensors
        need_h, need_w, need_b = ctx.flags
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.detach().to(torch.float32)
        out_h = out_w = out_b = None
        if ctx.reduce:
            out_h = (dh * g).to(h_dtype) if need_h else None
            out_w = (dw * g).to(w_dtype) if need_w else None
            out_b = (db * g).to(b_dtype) if need_b else None
            return out_h, out_w, out_b, None, None, None
        if need_h:
            out_h = (dh * g[:, None]).to(h_dtype)
        if need_w or need_b:
            _, _, dw2, db2 = ctx.compute(coeff.to(torch.float32) * g, need_w)
            out_w = dw2.to(w_dtype) if need_w else None
            out_b = db2.to(b_dtype) if need_b else None
        return out_h, out_w, out_b, None, None, None


def _same_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernels need one dtype per hidden/weight pair: hidden follows the weight (its gradient is cast back)."""
    return hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype)


def _all_rows(active, n: int, device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool, device=device) if active is None else active


def triton_kl(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, coeff,
              active, *, reduction: str, kind: str, beta: float, temperature: float):
    """`active` [N] bool or None (all rows)."""
    from .triton_kl import triton_fused_linear_kl

    s_hidden = _same_dtype(student_hidden.detach(), student_weight)
    t_hidden = _same_dtype(teacher_hidden.detach(), teacher_weight)
    rows = _all_rows(active, s_hidden.shape[0], s_hidden.device)

    def compute(token_scale, need_weight_grad):
        return triton_fused_linear_kl(
            s_hidden, student_weight.detach(), t_hidden, teacher_weight.detach(), kind=kind, beta=beta,
            temperature=temperature, token_scale=token_scale.to(torch.float32), active=rows,
            student_bias=None if student_bias is None else student_bias.detach(),
            teacher_bias=None if teacher_bias is None else teacher_bias.detach(), need_weight_grad=need_weight_grad)
    return PrecomputedLinearLoss.apply(student_hidden, student_weight, student_bias, coeff, compute, reduction != "none")


def triton_topk_distill(student_hidden, student_weight, student_bias, topk_ids, topk_logprobs, coeff, active, *,
                        reduction: str, normalize: str, kind: str, temperature: float):
    """`active` [N] bool (the rows that take part)."""
    from .triton_topk import triton_fused_linear_topk_distill

    s_hidden = _same_dtype(student_hidden.detach(), student_weight)

    def compute(token_scale, need_weight_grad):
        return triton_fused_linear_topk_distill(
            s_hidden, student_weight.detach(), topk_ids, topk_logprobs, normalize=normalize, kind=kind,
            temperature=temperature, token_scale=token_scale.to(torch.float32), active=active,
            student_bias=None if student_bias is None else student_bias.detach(), need_weight_grad=need_weight_grad)
    return PrecomputedLinearLoss.apply(student_hidden, student_weight, student_bias, coeff, compute, reduction != "none")


def triton_topk(hidden, weight, bias, k: int, *, temperature: float):
    from .triton_topk import triton_fused_linear_topk

    return triton_fused_linear_topk(_same_dtype(hidden.detach(), weight), weight.detach(), k,
                                    bias=None if bias is None else bias.detach(), temperature=temperature)
