"""Objectives: what an SDFT step optimizes, one file per kind of teacher target.

    full_vocab.py  full-vocabulary divergence (forward KL: the paper)        objective.targets=full
    topk.py        the teacher's top-K log-probs (the Tinker cookbook)        objective.targets=topk
    sampled.py     the sampled token's log-prob only (top-K = 0 fallback)     objective.targets=sampled
    base.py        the Objective interface, token weights, the truncated importance weight, metrics
    config.py      the `objective` config section

`build_objective` turns the section into the Objective of `objective.targets`. This package is the only
place that branches on the kind of target.
"""
from __future__ import annotations

from sdft.objectives.base import (FullVocabTargets, Objective, SampledTargets, StepSums, StudentTokens, Targets,
                                  TeacherRequest, TinkerPlan, TopKTargets, truncated_is_weight)
from sdft.objectives.config import ObjectiveConfig
from sdft.objectives.full_vocab import FullVocabObjective, FullVocabSettings
from sdft.objectives.sampled import SampledObjective
from sdft.objectives.topk import TopKObjective, TopKSettings

__all__ = ["ObjectiveConfig", "build_objective", "Objective", "TeacherRequest", "Targets", "FullVocabTargets",
           "TopKTargets", "SampledTargets", "StudentTokens", "TinkerPlan", "StepSums", "FullVocabSettings",
           "TopKSettings", "FullVocabObjective", "TopKObjective", "SampledObjective", "truncated_is_weight"]

_OBJECTIVES = {"full": FullVocabObjective, "topk": TopKObjective, "sampled": SampledObjective}


def build_objective(config: ObjectiveConfig) -> Objective:
    """The Objective that `config.targets` names."""
    return _OBJECTIVES[config.targets](config)
