"""Token masks, per-token weights and reductions, shared by every loss path.

For per-token losses L [N], mask m [N] (False = excluded) and weights w [N] (default 1):
  "none"       -> m * w * L                                  [N]
  "sum"        -> sum_n m_n w_n L_n
  "token_mean" -> sum_n m_n w_n L_n / max(sum_n m_n, 1)
  "seq_mean"   -> mean over sequences s of  sum_{n in s} m_n w_n L_n / max(sum_{n in s} m_n, 1)
                  (every sequence id present counts, also one whose tokens are all masked)
All of these are linear in L: `token_scale` returns the coefficient c_n with loss = sum_n c_n L_n, which
lets fused paths compute gradients during the forward pass.
"""
from __future__ import annotations

import torch

from ._checks import REDUCTIONS, check_choice, check_token_vector


def token_scale(n: int, device, *, mask=None, weights=None, reduction: str = "token_mean", seq_ids=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coefficients c [N] such that the reduced loss equals sum_n c_n L_n ("none": c = m * w)."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_token_vector("mask", mask, n, device, boolean=True)
    check_token_vector("weights", weights, n, device)
    check_token_vector("seq_ids", seq_ids, n, device, integer=True)
    scale = torch.ones(n, dtype=dtype, device=device)
    if mask is not None:
        scale = scale * mask.to(dtype)
    count = scale.clone()  # 1 for every counted token
    if weights is not None:
        scale = scale * weights.detach().to(dtype)
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
                     seq_ids=None) -> torch.Tensor:
    """Apply mask, weights and reduction to per-token losses [N] (differentiable in `per_token`).

    Masked entries are replaced by exact zeros with `torch.where`, so a NaN or inf there cannot leak
    into the loss or its gradient.
    """
    n = per_token.shape[0]
    dtype = torch.float64 if per_token.dtype == torch.float64 else torch.float32
    scale = token_scale(n, per_token.device, mask=mask, weights=weights, reduction=reduction, seq_ids=seq_ids,
                        dtype=dtype)
    keep = scale != 0
    contrib = torch.where(keep, per_token.to(dtype), torch.zeros_like(per_token, dtype=dtype)) * scale
    return contrib if reduction == "none" else contrib.sum()
