"""Top-K distillation (the Tinker cookbook's objective): the teacher's K most likely tokens at every
completion position, with log-probs normalized over the full vocabulary.

With q the teacher's top-K probabilities (renormalize: q / sum q, the cookbook; tail: q as they are, plus
the bucket q_tail = 1 - sum q of everything else) and log p_s the student's FULL-vocabulary log-softmax:
  cross_entropy: -sum_k q_k log p_s(id_k)        (tail: - q_tail log(1 - sum_k p_s(id_k)) added)
  forward_kl:    sum_k q_k (log q_k - log p_s(id_k))  (tail likewise)
  reverse_kl:    sum_k p~_k (log p~_k - log q_k), p~ the student renormalized over the K ids (renormalize only)
Slots with an id outside the vocabulary are ignored (the cookbook drops ids >= the tokenizer length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from sdft.losses import fused_linear_topk_distill_loss, topk_loss_from_logprobs
from sdft.losses.topk import topk_teacher_weights
from sdft.objectives.base import (Objective, StepSums, StudentTokens, TeacherRequest, TinkerPlan, TopKTargets,
                                  truncated_is_weight)
from sdft.sampling.base import Rollout
from sdft.schema import Section, setting

__all__ = ["TopKSettings", "TopKObjective"]


@dataclass(frozen=True)
class TopKSettings(Section):
    """`objective.topk`: the teacher's top-K targets."""

    k: int = setting(20, ge=1, doc="the teacher's top K log-probs per position (cookbook: 20)")
    normalize: Literal["renormalize", "tail"] = setting(
        "renormalize", doc="renormalize over the K ids (cookbook), or keep them and add a tail bucket")
    kind: Literal["cross_entropy", "forward_kl", "reverse_kl"] = setting(
        "cross_entropy", doc="cross_entropy (cookbook), forward_kl, or reverse_kl between the renormalized top-K")

    def check(self) -> str | None:
        if self.kind == "reverse_kl" and self.normalize != "renormalize":
            return (f"objective.topk.kind=reverse_kl compares the renormalized top-K distributions; got "
                    f"objective.topk.normalize={self.normalize}, allowed: objective.topk.normalize=renormalize")
        return None


class TopKObjective(Objective):
    targets_type = TopKTargets

    def __init__(self, settings):
        super().__init__(settings)
        self.topk = settings.topk

    @property
    def teacher_request(self) -> TeacherRequest:
        s = self.settings
        return TeacherRequest("topk", k=self.topk.k, temperature=s.temperature, impl=s.impl, chunk_size=s.chunk_size)

    def per_token_loss(self, student: StudentTokens, targets: TopKTargets, student_logprobs, seq_is):
        s = self.settings
        return fused_linear_topk_distill_loss(
            student.hidden, student.weight, student.select(targets.ids), student.select(targets.logprobs),
            normalize=self.topk.normalize, kind=self.topk.kind, temperature=s.temperature, mask=student.mask,
            weights=self.is_scaled_weights(student, seq_is), reduction="sum", student_bias=student.bias,
            chunk_size=s.chunk_size, impl=s.impl, return_per_token=True)

    def extra_metrics(self, targets: TopKTargets) -> dict[str, float]:
        """teacher_topk_invalid_frac: the fraction of top-K slots without a usable id (dropped by the loss)."""
        slots = sum(t.numel() for t in targets.ids)
        invalid = sum(int((t < 0).sum()) for t in targets.ids)
        return {"teacher_topk_invalid_frac": invalid / slots if slots else 0.0}

    # ------------------------------------------------------------------------------------------ tinker
    def tinker_plan(self, rollouts: Sequence[Rollout], targets: TopKTargets, *, vocab_size: int) -> TinkerPlan:
        """Built-in "cross_entropy" on [T, K] targets with weights w_t q_tk when that is the whole objective
        (renormalize, cross_entropy or forward_kl, no IS weight: forward_kl differs by the constant
        sum w q log q, added to the reported loss); otherwise a custom loss on the log-probs of the K ids and,
        last, the sampled token (for the truncated IS weight)."""
        s, topk = self.settings, self.topk
        weights = self.token_weights(rollouts)
        masks = [self.loss_mask(len(r.completion_ids)) for r in rollouts]
        valid_ids = [torch.where((ids >= 0) & (ids < vocab_size), ids, torch.zeros_like(ids)).long()
                     for ids in targets.ids]
        builtin = s.is_clip is None and topk.normalize == "renormalize" and topk.kind != "reverse_kl"

        def per_token(lp: torch.Tensor, i: int) -> torch.Tensor:
            return topk_loss_from_logprobs(lp, targets.ids[i].to(lp.device), targets.logprobs[i].to(lp.device),
                                           vocab_size=vocab_size, normalize=topk.normalize, kind=topk.kind,
                                           reduction="none")

        def is_weight(sampled_lp: torch.Tensor, i: int) -> torch.Tensor:
            rollout = rollouts[i]
            sampler = torch.tensor(rollout.sampler_logprobs, dtype=torch.float64, device=sampled_lp.device)
            seq = torch.zeros(len(rollout.completion_ids), dtype=torch.long, device=sampled_lp.device)
            return truncated_is_weight(sampled_lp.double(), sampler, masks[i].to(sampled_lp.device), seq, 1,
                                       s.is_clip)[0]

        if builtin:
            inputs = []
            for i, rollout in enumerate(rollouts):
                _, q, _ = topk_teacher_weights(targets.ids[i], targets.logprobs[i], vocab_size, "renormalize")
                inputs.append({"weights": (weights[i][:, None] * q.to(torch.float64)).float()})

            def sums(logprobs: list[torch.Tensor]) -> StepSums:
                out = StepSums()
                for i, lp in enumerate(logprobs):
                    values = per_token(lp.double(), i)
                    out.loss += float((values * weights[i]).sum())
                    out.divergence += float(values[masks[i]].sum())
                return out
            return TinkerPlan(valid_ids, "cross_entropy", inputs, None, sums)

        tokens = [torch.cat([ids, torch.tensor(r.completion_ids, dtype=torch.long)[:, None]], dim=1)
                  for ids, r in zip(valid_ids, rollouts)]

        def objective(lp: torch.Tensor, i: int) -> torch.Tensor:
            k = lp.shape[1] - 1
            w = weights[i].to(lp.device, lp.dtype)
            if s.is_clip is not None:
                w = w * is_weight(lp[:, k].detach(), i).to(lp.dtype)
            return (per_token(lp[:, :k], i) * w).sum()

        def custom(logprobs: list[torch.Tensor]) -> torch.Tensor:
            return sum(objective(lp, i) for i, lp in enumerate(logprobs))

        def sums(logprobs: list[torch.Tensor]) -> StepSums:
            out = StepSums()
            for i, lp in enumerate(logprobs):
                lp = lp.double()
                k = lp.shape[1] - 1
                out.loss += float(objective(lp, i))
                out.divergence += float(per_token(lp[:, :k], i)[masks[i]].sum())
                if len(rollouts[i].completion_ids):
                    out.is_weights.append(float(is_weight(lp[:, k], i)))
            return out
        return TinkerPlan(tokens, None, [{} for _ in rollouts], custom, sums)
