"""sdft.losses: distillation losses for SDFT, importable on their own (only torch is required).

Materialized-logit references (the readable definitions, and the test oracle):
    kl_divergence, topk_distill_loss, sampled_token_loss
Top-K losses from the student's log-probs at the teacher's top-K ids [N, K] (backends without logits, e.g. Tinker):
    topk_loss_from_logprobs
Fused-linear versions from hidden states and output-layer weights, never building [N, V] logits:
    fused_linear_kl, fused_linear_topk_distill_loss, fused_linear_topk, fused_linear_token_logprobs
Every loss takes mask [N] (bool), weights [N] and reduction in {"none", "sum", "token_mean", "seq_mean"}
(seq_mean needs seq_ids [N]); fused functions take impl in {"auto", "reference", "chunked", "triton"}.
Top-K kinds: cross_entropy, forward_kl (normalize "renormalize" or "tail") and reverse_kl ("renormalize").
Masked tokens contribute exactly 0 and get exactly 0 gradient whatever their values; a NaN in an unmasked
token gives a NaN loss and NaN gradients, on every path.
"""
from .fused import (
    fused_linear_kl, fused_linear_token_logprobs, fused_linear_topk, fused_linear_topk_distill_loss, resolve_impl,
)
from .reference import kl_divergence, sampled_token_loss, topk_distill_loss
from .topk import topk_loss_from_logprobs

__all__ = [
    "kl_divergence",
    "topk_distill_loss",
    "sampled_token_loss",
    "topk_loss_from_logprobs",
    "fused_linear_kl",
    "fused_linear_topk",
    "fused_linear_topk_distill_loss",
    "fused_linear_token_logprobs",
    "resolve_impl",
]
