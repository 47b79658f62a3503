"""Token-level training examples and the deterministic order in which batches visit them."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sdft.data import PromptExample
from sdft.prompts import DEMONSTRATION_CUT_MARK, render_student_prompt, render_teacher_prompt


@dataclass(frozen=True)
class EncodedExample:
    """A PromptExample with its token ids: the student prompt, the teacher prompt (prompt + demonstration
    in context) and the SFT target (`example.target`, normally the demonstration, followed by EOS).

    student_cut / teacher_cut: tokens that truncation to max_prompt_tokens removed from each prompt
    (0: none); demonstration_cut: the teacher's demonstration lost its end.
    """

    example: PromptExample
    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    student_cut: int = 0
    teacher_cut: int = 0
    demonstration_cut: bool = False


def encode_examples(tokenizer, examples: Sequence[PromptExample], *, template: str = "official",
                    max_prompt_tokens: int | None = 1024,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> list[EncodedExample]:
    """Render student and teacher prompts with the chat template, within max_prompt_tokens: the student
    prompt left-truncated (official), the teacher prompt cut from its demonstration's end first
    (`sdft.prompts.render_teacher_prompt`). Each example records what was cut; `truncation_report`
    counts it. `chat_template_kwargs` are extra chat-template variables for both prompts."""
    eos = tokenizer.eos_token_id
    encoded = []
    for example in examples:
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
        student = render_student_prompt(tokenizer, example, max_prompt_tokens, chat_template_kwargs)
        teacher = render_teacher_prompt(tokenizer, example, template, max_prompt_tokens,
                                        chat_template_kwargs=chat_template_kwargs)
        encoded.append(EncodedExample(
            example=example, student_ids=student.ids, teacher_ids=teacher.ids,
            target_ids=tuple(target) + ((eos,) if eos is not None else ()),
            student_cut=student.cut_tokens, teacher_cut=teacher.cut_tokens,
            demonstration_cut=teacher.demonstration_cut,
        ))
    return encoded


@dataclass(frozen=True)
class TruncationReport:
    """How many of `examples` encoded prompts truncation cut: student prompts (from the left), teacher
    prompts (any cut) and, among those, teacher prompts whose demonstration lost its end."""

    examples: int
    student: int
    teacher: int
    teacher_demonstration: int
    max_prompt_tokens: int | None

    def describe(self) -> str:
        """One line with the counts (also when nothing was cut)."""
        head = f"prompt truncation at data.max_prompt_tokens={self.max_prompt_tokens}: "
        if not (self.student or self.teacher):
            return head + f"none of {self.examples} student or teacher prompts cut"
        return (head + f"{self.student} of {self.examples} student prompts cut from the left; {self.teacher} of "
                f"{self.examples} teacher prompts cut ({self.teacher_demonstration} of them by shortening the "
                f"demonstration, marked {DEMONSTRATION_CUT_MARK.strip()!r})")

    @property
    def note(self) -> str | None:
        """`describe()` when any prompt was cut (a line for summary.md and the one warning), else None."""
        return self.describe() if self.student or self.teacher else None


def truncation_report(encoded: Sequence[EncodedExample], max_prompt_tokens: int | None) -> TruncationReport:
    """The truncation counts of `encode_examples(..., max_prompt_tokens=max_prompt_tokens)`'s output."""
    return TruncationReport(examples=len(encoded), student=sum(e.student_cut > 0 for e in encoded),
                            teacher=sum(e.teacher_cut > 0 for e in encoded),
                            teacher_demonstration=sum(e.demonstration_cut for e in encoded),
                            max_prompt_tokens=max_prompt_tokens)


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

