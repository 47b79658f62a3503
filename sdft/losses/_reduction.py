"""Token masks, per-token weights and reductions, shared by every loss path.

For per-token losses L [N], mask m [N] (False = excluded) and weights w [N] (default 1):
  "none"       -> m * w * L                                  [N]
  "sum"        -> sum_n m_n w_n L_n
  "token_mean" -> sum_n m_n w_n L_n / max(sum_n m_n, 1)
  "seq_mean"   -> mean over sequences s of  sum_{n in s} m_n w_n L_n / max(sum_{n in s} m_n, 1)
                  (every sequence id present counts, also one whose tokens are all masked)
All of these are linear in L: `token_scale` returns the coefficient c_n with loss = sum_n c_n L_n, which
lets fused paths compute gradients during the forward pass.

Non-finite values: a masked token contributes exactly 0 and gets exactly 0 gradient whatever its inputs and
its weight (NaN, +inf, -inf): "m * w * L" above reads "w * L where m, else 0". An unmasked token follows
IEEE arithmetic: a NaN weight or loss there makes the loss NaN (a weight of 0 does not mask a NaN loss).
A loss may take further rows out (`active`, e.g. top-K rows without a valid slot): they contribute 0 like
masked rows but still count in the denominators.
"""
from __future__ import annotations

import torch

from ._checks import REDUCTIONS, check_choice, check_token_vector


def zero_inactive_rows(x: torch.Tensor, active) -> torch.Tensor:
    """Rows of x [N, ...] outside `active` [N] bool replaced by zeros (None: x unchanged), so that NaN or inf
    there reaches neither the loss nor any gradient (torch.where sends no gradient to the branch not taken)."""
    if active is None:
        return x
    keep = active.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def token_scale(n: int, device, *, mask=None, weights=None, reduction: str = "token_mean", seq_ids=None,
                dtype: torch.dtype = torch.float32, active=None) -> torch.Tensor:
    """Coefficients c [N] such that the reduced loss equals sum_n c_n L_n ("none": c = m * w).

    c_n is exactly 0 for masked tokens and for tokens outside `active` [N] bool (default: the mask), whatever
    their weights; the denominators count the unmasked tokens.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_token_vector("mask", mask, n, device, boolean=True)
    check_token_vector("weights", weights, n, device)
    check_token_vector("seq_ids", seq_ids, n, device, integer=True)
    check_token_vector("active", active, n, device, boolean=True)
    count = torch.ones(n, dtype=dtype, device=device) if mask is None else mask.to(dtype)  # 1 per counted token
    scale = count if weights is None else weights.detach().to(dtype)
    keep = mask if active is None else active
    if keep is not None:
        scale = torch.where(keep, scale, torch.zeros((), dtype=dtype, device=device))
    if reduction in ("none", "sum"):
        return scale
    if reduction == "token_mean":
        return scale / count.sum().clamp(min=1.0)
    if seq_ids is None:
        raise ValueError("reduction='seq_mean' needs seq_ids [N] (the sequence index of every token)")
    if n == 0:
        return scale
    _, inverse = torch.unique(seq_ids, return_inverse=True)
    n_seqs = int(inverse.max().item()) + 1
    per_seq_count = torch.zeros(n_seqs, dtype=dtype, device=device).index_add_(0, inverse, count)
    return scale / per_seq_count.clamp(min=1.0)[inverse] / n_seqs


def reduce_per_token(per_token: torch.Tensor, *, mask=None, weights=None, reduction: str = "token_mean",
                     seq_ids=None, active=None) -> torch.Tensor:
    """Apply mask, weights and reduction to per-token losses [N] (differentiable in `per_token`).

    Tokens outside `active` (default: the mask) become exact zeros through `torch.where`, so that a NaN or
    inf there can reach neither the loss nor its gradient.
    """
    n = per_token.shape[0]
    dtype = torch.float64 if per_token.dtype == torch.float64 else torch.float32
    scale = token_scale(n, per_token.device, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                        dtype=dtype, active=active)
    keep = mask if active is None else active
    contrib = per_token.to(dtype) * scale
    if keep is not None:
        contrib = torch.where(keep, contrib, torch.zeros((), dtype=dtype, device=per_token.device))
    return contrib if reduction == "none" else contrib.sum()
