"""Full-vocabulary distillation (the paper's objective): a divergence between the student's and the
teacher's next-token distributions over the whole vocabulary at every completion position.

  forward: KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))  (every published SDFT result)
  reverse: KL(p_s || p_t)
  jsd:     beta KL(p_t || m) + (1 - beta) KL(p_s || m), log m = logsumexp(log p_s + log(1 - beta), log p_t + log beta)
with p = softmax(z / T). The teacher side is its hidden states and output layer, so the loss runs through
`sdft.losses.fused_linear_kl` without [N, V] logits. Local backend only (Tinker exposes top-K log-probs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence



from sdft.losses import fused_linear_kl
from sdft.objectives.base import (FullVocabTargets, Objective, StudentTokens, TeacherRequest, TinkerPlan)
from sdft.sampling.base import Rollout
from sdft.schema import Section, setting

__all__ = ["FullVocabSettings", "FullVocabObjective"]


@dataclass(frozen=True)
class FullVocabSettings(Section):
    """`objective.full`: the divergence of full-vocabulary distillation."""

    kind: Literal["forward", "reverse", "jsd"] = setting("forward", doc="forward KL (paper), reverse KL or JSD")
    beta: float = setting(0.5, ge=0, le=1, doc="jsd: the teacher's weight in the mixture m")


class FullVocabObjective(Objective):
    targets_type = FullVocabTargets

    def __init__(self, settings):
        super().__init__(settings)
        self.full = settings.full

    @property
    def teacher_request(self) -> TeacherRequest:
        s = self.settings
        return TeacherRequest("hidden", temperature=s.temperature, impl=s.impl, chunk_size=s.chunk_size)

    def per_token_loss(self, student: StudentTokens, targets: FullVocabTargets, student_logprobs, seq_is):
        s = self.settings
        device = student.hidden.device
        loss, per_token = fused_linear_kl(
            student.hidden, student.weight, student.select(targets.hidden), targets.weight.to(device),
            kind=self.full.kind, beta=self.full.beta, temperature=s.temperature, mask=student.mask,
            weights=self.is_scaled_weights(student, seq_is), reduction="sum", student_bias=student.bias,
            teacher_bias=None if targets.bias is None else targets.bias.to(device), chunk_size=s.chunk_size,
            impl=s.impl, return_per_token=True)
        return loss, per_token

    def tinker_plan(self, rollouts: Sequence[Rollout], targets, *, vocab_size: int) -> TinkerPlan:
        raise ValueError("full-vocabulary targets (objective.targets=full) need the teacher's hidden states, which "
                         "Tinker does not expose; use objective.targets=topk or objective.targets=sampled")


