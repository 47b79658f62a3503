"""The Sampler interface and what it returns: on-policy rollouts and greedy completions.

A sampler decodes a student: `sample` draws one completion per prompt (temperature, nucleus top-p) and
keeps the log-probability of every sampled token under the distribution it was drawn from (the sampler
side of the truncated importance weight); `greedy` gives argmax completions for evaluation. Both stop at
the first end-of-turn token (`stop_token_ids`, the one rule for which ids end a completion), which is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["SamplingParams", "Rollout", "Sampler", "stop_token_ids", "padding_token_id", "check_token_lists",
           "check_positive_int", "checked_sample_request", "checked_greedy_request"]


@dataclass(frozen=True)
class SamplingParams:
    """On-policy sampling: up to `max_new_tokens` tokens from softmax(z / temperature), nucleus `top_p`."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        check_positive_int("max_new_tokens", self.max_new_tokens)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite float > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion.

    `completion_ids` ends with a stop token when `finished` is True (stop token included, padding never);
    otherwise it stopped at `max_new_tokens`. `sampler_logprobs[j]` is the log-probability of
    `completion_ids[j]` under the distribution it was sampled from (temperature and top_p applied).
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]
    finished: bool

    def __post_init__(self):
        if len(self.prompt_ids) == 0:
            raise ValueError("prompt_ids must hold at least one token, got an empty sequence")
        if len(self.sampler_logprobs) != len(self.completion_ids):
            raise ValueError(
                f"sampler_logprobs must have one entry per completion token: got {len(self.sampler_logprobs)} "
                f"log-probs for {len(self.completion_ids)} completion tokens"
            )


@runtime_checkable
class Sampler(Protocol):
    """Decodes the current student. `stop_ids`: the ids that end a completion (`stop_token_ids`);
    `generator`: the torch.Generator that draws stream seeds for calls without seeds (kept in checkpoints)."""

    stop_ids: list[int]
    generator: "torch.Generator"

    def weights_changed(self) -> None:
        """The student's weights changed (an optimizer step, a loaded checkpoint): a sampler that holds its
        own copy refreshes it before it decodes again."""
        ...

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        """One completion per prompt. With `seeds`, prompt i is drawn from its own random stream seeded by
        seeds[i], so its completion does not depend on batching, sharding across processes or order."""
        ...

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
               batch_size: int | None = None) -> list[list[int]]:
        """Argmax completions (stop token included when produced), `batch_size` prompts at a time."""
        ...


def stop_token_ids(tokenizer, generation_config=None, override: Sequence[int] | None = None) -> list[int]:
    """The token ids that end a completion: `override` when given; else the tokenizer's eos token, then the
    generation config's eos ids (an int or a list), without repeats. An error when there is none."""
    if override is not None:
        ids = [int(i) for i in override]
        if not ids:
            raise ValueError("eos_token_ids must hold at least one id, got an empty list")
        return ids
    ids: list[int] = []
    config_eos = getattr(generation_config, "eos_token_id", None)
    for token_id in [getattr(tokenizer, "eos_token_id", None)] + (
            list(config_eos) if isinstance(config_eos, (list, tuple)) else [config_eos]):
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ValueError("no stop token: neither the tokenizer nor the generation config defines an eos token; "
                         "pass eos_token_ids")
    return ids


def padding_token_id(tokenizer, stop_ids: Sequence[int]) -> int:
    """The tokenizer's pad token, else the first stop token (padding is never fed as a real token)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else stop_ids[0])


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_token_lists(name: str, value) -> list[list[int]]:
    """Non-empty sequences of token ids, as lists."""
    lists = [list(seq) for seq in value]
    if not lists:
        raise ValueError(f"{name} must hold at least one sequence, got none")
    for i, seq in enumerate(lists):
        if not seq:
            raise ValueError(f"{name}[{i}] must hold at least one token, got an empty sequence")
    return lists


def checked_sample_request(prompt_ids, params, seeds, generator) -> tuple[list[list[int]], list[int]]:
    """The checked arguments of `Sampler.sample`: (prompts as lists, one seed per prompt; drawn from
    `generator` when `seeds` is None)."""
    from sdft.sampling.draw import draw_seeds

    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    prompts = check_token_lists("prompt_ids", prompt_ids)
    if seeds is None:
        return prompts, draw_seeds(generator, len(prompts))
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must have one entry per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
    return prompts, [int(seed) for seed in seeds]


def checked_greedy_request(prompt_ids, max_new_tokens, batch_size) -> list[list[int]]:
    """The checked arguments of `Sampler.greedy`: the prompts as lists."""
    check_positive_int("max_new_tokens", max_new_tokens)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    return check_token_lists("prompt_ids", prompt_ids)
