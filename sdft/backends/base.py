"""The Backend protocol: the mechanisms one SDFT step needs, whatever runs the model.

One SDFT step is `sample -> teacher_targets -> train_step -> update_teacher`. What the loss is, which
teacher outputs it needs and how tokens are weighted is the objective's business (`sdft.objectives`); a
backend only computes: it samples the student, runs the teacher as the objective's `TeacherRequest` asks,
gives the objective the student's outputs, steps the optimizer and keeps the teacher's weights.
Rollouts hold token ids as tuples of ints and targets one tensor per rollout (no padding), so that a
backend decides its own batching.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from sdft.objectives import Objective, Targets
from sdft.sampling.base import Rollout, SamplingParams, check_token_lists

__all__ = ["Backend", "check_rollouts", "check_sft_batch", "check_teacher_prompts"]


@runtime_checkable
class Backend(Protocol):
    """A model that can be sampled, scored as a teacher and trained; the loop sees only this."""

    tokenizer: Any
    notes: list[str]  # lines about the backend for the run's summary.md

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        ...

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        """One on-policy completion per prompt from the student (see `sdft.sampling.Sampler.sample`)."""
        ...

    def generate_greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                        batch_size: int | None = None) -> list[list[int]]:
        """Greedy completions from the student (stop token included when produced)."""
        ...

    def teacher_targets(self, teacher_prompt_ids: Sequence[Sequence[int]], rollouts: Sequence[Rollout],
                        objective: Objective) -> Targets:
        """Score each rollout's completion with the teacher on [teacher prompt | completion], computing what
        `objective.teacher_request` asks for."""
        ...

    def train_step(self, rollouts: Sequence[Rollout], targets: Targets, objective: Objective) -> dict[str, float]:
        """One optimizer step of the objective over the whole batch; its metrics."""
        ...

    def update_teacher(self, step: int) -> None:
        """Called after optimizer step number `step` (1-based): EMA update or periodic sync."""
        ...

    def sft_step(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]) -> dict[str, float]:
        """One optimizer step of cross-entropy on the target tokens, token mean over the batch."""
        ...

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        ...

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        ...

    def optimizer_state(self) -> dict:
        ...

    def load_optimizer_state(self, state: dict) -> None:
        ...


def check_rollouts(rollouts) -> list[Rollout]:
    rollouts = list(rollouts)
    if not rollouts:
        raise ValueError("rollouts must hold at least one Rollout, got none")
    for i, r in enumerate(rollouts):
        if not isinstance(r, Rollout):
            raise ValueError(f"rollouts[{i}] must be a Rollout, got {type(r).__name__}")
    return rollouts


def check_teacher_prompts(teacher_prompt_ids, rollouts) -> tuple[list[list[int]], list[Rollout]]:
    """The arguments of `Backend.teacher_targets`: one non-empty teacher prompt per rollout."""
    prompts = check_token_lists("teacher_prompt_ids", teacher_prompt_ids)
    rollouts = check_rollouts(rollouts)
    if len(prompts) != len(rollouts):
        raise ValueError(f"teacher_prompt_ids must have one prompt per rollout: got {len(prompts)} prompts for "
                         f"{len(rollouts)} rollouts")
    return prompts, rollouts


def check_sft_batch(prompt_ids, target_ids) -> tuple[list[list[int]], list[list[int]]]:
    """The arguments of `Backend.sft_step`: one non-empty target per non-empty prompt, as lists."""
    prompts = check_token_lists("prompt_ids", prompt_ids)
    targets = check_token_lists("target_ids", target_ids)
    if len(prompts) != len(targets):
        raise ValueError(f"target_ids must have one target per prompt: got {len(targets)} targets for "
                         f"{len(prompts)} prompts")
    return prompts, targets
