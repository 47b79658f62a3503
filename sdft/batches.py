"""Token-level training examples and the deterministic order in which batches visit them."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from sdft.data import PromptExample
from sdft.prompts import render_prompt_ids, student_messages, teacher_messages


@dataclass(frozen=True)
class EncodedExample:
    """A PromptExample with its token ids: the student prompt, the teacher prompt (prompt + demonstration
    in context) and the SFT target (`example.target`, normally the demonstration, followed by EOS)."""

    example: PromptExample
    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


def encode_examples(tokenizer, examples: Sequence[PromptExample], *, template: str = "official",
                    max_prompt_tokens: int | None = 1024) -> list[EncodedExample]:
    """Render student and teacher prompts with the chat template (left-truncated to max_prompt_tokens)."""
    eos = tokenizer.eos_token_id
    encoded = []
    for example in examples:
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
        encoded.append(EncodedExample(
            example=example,
            student_ids=tuple(render_prompt_ids(tokenizer, student_messages(example), max_prompt_tokens)),
            teacher_ids=tuple(render_prompt_ids(tokenizer, teacher_messages(example, template), max_prompt_tokens)),
            target_ids=tuple(target) + ((eos,) if eos is not None else ()),
        ))
    return encoded


def total_steps(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """max_steps when given, else ceil(epochs * n_examples / batch_size) (at least 1)."""
    if n_examples < 1:
        raise ValueError("the training set is empty: there is nothing to train on")
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / batch_size))


def batch_indices(step: int, *, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (1-based).

    The examples form one stream: epoch e is a permutation drawn with random.Random(seed + e), and step s
    takes stream positions [(s - 1) * batch_size, s * batch_size). It depends only on its arguments, so a
    resumed run sees exactly the batches it would have seen.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    out = []
    for position in range((step - 1) * batch_size, step * batch_size):
        epoch, offset = divmod(position, n_examples)
        order = list(range(n_examples))
        random.Random(seed + epoch).shuffle(order)
        out.append(order[offset])
    return out

