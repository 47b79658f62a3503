"""Sampled-token distillation (the cookbook's top-K = 0 fallback): only the teacher's log-prob of the
token the student sampled is known, and the loss is the importance-sampling estimate of the reverse KL
KL(p_s || p_t), per token
    -min(exp(log p_s(y) - log p_sampler(y)), is_clip) * (log p_t(y) - log p_sampler(y))
(`sdft.losses.sampled_token_loss`: the advantage log p_t - log p_sampler, the ratio clamped at is_clip when
set). Its metric `kl` is the sampled estimate log p_s(y) - log p_t(y).
"""
from __future__ import annotations

from typing import Sequence

import torch

from sdft.losses import fused_linear_token_logprobs, sampled_token_loss
from sdft.objectives.base import (Objective, SampledTargets, StepSums, StudentTokens, TeacherRequest, TinkerPlan,
                                  truncated_is_weight)
from sdft.sampling.base import Rollout

__all__ = ["SampledObjective"]


class SampledObjective(Objective):
    targets_type = SampledTargets

    @property
    def teacher_request(self) -> TeacherRequest:
        s = self.settings
        return TeacherRequest("logprobs", temperature=s.temperature, impl=s.impl, chunk_size=s.chunk_size)

    def student_logprobs(self, student: StudentTokens):
        """The sampled tokens' student log-probs WITH gradient (the loss is a function of them)."""
        s = self.settings
        return fused_linear_token_logprobs(student.hidden, student.weight, student.token_ids, bias=student.bias,
                                           temperature=s.temperature, chunk_size=s.chunk_size, impl=s.impl,
                                           return_entropy=True)

    def per_token_loss(self, student: StudentTokens, targets: SampledTargets, student_logprobs, seq_is):
        teacher = student.select(targets.teacher_logprobs)
        loss = sampled_token_loss(student_logprobs, teacher, student.sampler_logprobs, clip=self.settings.is_clip,
                                  mask=student.mask, weights=student.weights, reduction="sum")
        return loss, (student_logprobs.detach() - teacher)

    def tinker_plan(self, rollouts: Sequence[Rollout], targets: SampledTargets, *, vocab_size: int) -> TinkerPlan:
        """Built-in "importance_sampling" (advantages w_t (log p_t - log p_sampler), sampler log-probs) without
        a ratio clamp; with is_clip, a custom loss on the sampled tokens' log-probs."""
        clip = self.settings.is_clip
        weights = self.token_weights(rollouts)
        masks = [self.loss_mask(len(r.completion_ids)) for r in rollouts]
        samplers = [torch.tensor(r.sampler_logprobs, dtype=torch.float64) for r in rollouts]
        teachers = [t.to(torch.float64) for t in targets.teacher_logprobs]
        tokens = [torch.tensor(r.completion_ids, dtype=torch.long) for r in rollouts]

        def objective(lp: torch.Tensor, i: int) -> torch.Tensor:
            device, dtype = lp.device, lp.dtype
            return sampled_token_loss(lp, teachers[i].to(device, dtype), samplers[i].to(device, dtype), clip=clip,
                                      weights=weights[i].to(device, dtype), reduction="sum")

        def sums(logprobs: list[torch.Tensor]) -> StepSums:
            out = StepSums()
            for i, lp in enumerate(logprobs):
                lp = lp.double()
                out.loss += float(objective(lp, i))
                out.divergence += float((lp - teachers[i])[masks[i]].sum())
                if len(lp):
                    seq = torch.zeros(len(lp), dtype=torch.long)
                    out.is_weights.append(float(truncated_is_weight(lp, samplers[i], masks[i], seq, 1, clip)[0]))
            return out

        if clip is None:
            inputs = [{"logprobs": sampler.float(), "advantages": (w * (teacher - sampler)).float()}
                      for sampler, teacher, w in zip(samplers, teachers, weights)]
            return TinkerPlan(tokens, "importance_sampling", inputs, None, sums)

        def custom(logprobs: list[torch.Tensor]) -> torch.Tensor:
            return sum(objective(lp, i) for i, lp in enumerate(logprobs))
        return TinkerPlan(tokens, None, [{} for _ in rollouts], custom, sums)
