"""Benchmark settings of a training step, and the one place where they become a run configuration.

Every config key a benchmark sets is written in `step_config`; `objective` reads the section that holds the
objective (targets, divergence kind, top-K, importance-weight clip, skipped tokens).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepSettings:
    """One training step of a benchmark: model (the packaged name or a save_pretrained folder), prompts
    per step (one completion each, at most `new_tokens` new tokens, all in one sampling call), prompts
    per forward/backward (None: all at once), objective (`targets` full-vocabulary forward KL or the
    teacher's top-`topk`), teacher mode, student mode (LoRA of `lora_rank` or full), weights' dtype."""
    model: str = "SmolLM2-135M-Instruct"
    data: str | None = None
    prompts: int = 8
    new_tokens: int = 128
    micro_batch_size: int | None = None
    targets: str = "full"
    topk: int = 20
    teacher: str = "static"
    student: str = "lora"
    lora_rank: int = 16
    dtype: str = "float32"
    lr: float = 1e-4
    seed: int = 0


def step_config(settings: StepSettings):
    """The run configuration (sdft.config) every column of a step benchmark is built from."""
    from sdft.config import load_config

    s = settings
    return load_config(None, [
        f"seed={s.seed}", f"model.name={s.model}", f"model.dtype={s.dtype}",
        f"student.mode={s.student}", f"student.lora_rank={s.lora_rank}", f"teacher.mode={s.teacher}",
        f"objective.targets={s.targets}", "objective.full.kind=forward", f"objective.topk.k={s.topk}",
        f"optim.lr={s.lr}", "optim.schedule=constant", "optim.warmup_ratio=0.0",
        f"optim.batch_size={s.prompts}", f"optim.micro_batch_size={s.micro_batch_size or s.prompts}",
        f"generation.max_new_tokens={s.new_tokens}", f"generation.batch_size={s.prompts}",
        f"data.path={s.data or 'built-in'}",
    ])


def objective(config):
    """The objective section of a run configuration."""
    return config.objective
