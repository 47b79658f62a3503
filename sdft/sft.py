"""The SFT baseline: cross-entropy on the demonstration (student prompt -> demonstration + EOS), run by the
same shell as SDFT (`sdft.loop.run_training`): same data, batches, evaluation, logging and checkpoints."""
from __future__ import annotations

from typing import Sequence

from sdft.batches import EncodedExample
from sdft.config import Config
from sdft.loop import StepFn


def sft_step_fn(config: Config, *, rank: int = 0, world_size: int = 1) -> StepFn:
    """One SFT optimizer step on this process's share (positions rank, rank + world_size, ...) of the batch."""

    def step_fn(backend, batch: Sequence[EncodedExample], step: int) -> dict:
        batch = list(batch)[rank::world_size]
        return dict(backend.sft_step([b.student_ids for b in batch], [b.target_ids for b in batch]))
    return step_fn
