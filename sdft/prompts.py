"""Student and teacher prompts: chat messages, the teacher's in-context demonstration template, and
chat-template rendering to token ids with truncation to a token budget.

The student sees the example's messages unchanged. The teacher sees the same messages with the last
user turn wrapped by a `string.Template` that also shows the gold demonstration, or (template "turns") with
the demonstration given as an earlier assistant reply to the same user turn.

Truncation to `max_prompt_tokens`: the student prompt keeps its last tokens (left truncation, as in the
official code). The teacher prompt is cut from the demonstration's side instead, so that a long
demonstration cannot push the question out (left truncation of prompt + demonstration would keep only
the demonstration's tail): the demonstration loses tokens from its end, marked by DEMONSTRATION_CUT_MARK,
while the chat framing, the whole question and the template's closing instruction stay. The
demonstration is the reason the teacher exists, so it is never cut below DEMONSTRATION_FLOOR *
max_prompt_tokens tokens (or its whole length, if shorter); when the question leaves less room than
that, the rest is taken from the start of the teacher prompt, as for the student.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

DEMONSTRATION_CUT_MARK = " [...]"
DEMONSTRATION_FLOOR = 0.5   # a cut demonstration keeps at least this share of max_prompt_tokens

TEACHER_TEMPLATES = {
    # Official SDFT code: starts and ends with a newline.
    "official": (
        "\n$orig_content\n\nThis is an example for a response to the question:\n$output_text\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    ),
    # Tinker cookbook: the same text without the leading and trailing newline.
    "cookbook": (
        "$orig_content\n\nThis is an example for a response to the question:\n$output_text\n\n"
        "Now answer with a response of your own, including the thinking process."
    ),
}
TEMPLATE_PLACEHOLDERS = ("orig_content", "output_text")
DEMONSTRATION_TURNS = "turns"
"""The teacher.template name that shows the demonstration as an earlier exchange instead of quoting it: the
teacher's conversation is the user turn, the demonstration as the assistant's reply, then the same user turn
again (no text added). A small model follows a demonstration given as a previous answer, as it follows
few-shot examples, far more readily than one quoted inside the user turn."""


def _template_identifiers(text: str) -> set[str]:
    """The `$name` / `${name}` placeholders of a string.Template text."""
    names = set()
    for match in string.Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


def resolve_teacher_template(template: str) -> str:
    """The template text for a name in TEACHER_TEMPLATES, or a custom template text, validated: it must
    contain both `$orig_content` and `$output_text` and no other placeholder."""
    if not isinstance(template, str):
        raise ValueError(f"teacher template must be a string, got {type(template).__name__}")
    if template == DEMONSTRATION_TURNS:
        return template
    if template in TEACHER_TEMPLATES:
        return TEACHER_TEMPLATES[template]
    names = _template_identifiers(template)
    missing = [name for name in TEMPLATE_PLACEHOLDERS if name not in names]
    if missing:
        raise ValueError(
            f"teacher template {template!r} is neither a known name "
            f"{sorted([*TEACHER_TEMPLATES, DEMONSTRATION_TURNS])} nor a "
            f"custom template: it lacks the placeholder(s) {', '.join('$' + m for m in missing)} "
            f"(a custom template must contain both $orig_content and $output_text)")
    extra = sorted(names - set(TEMPLATE_PLACEHOLDERS))
    if extra:
        raise ValueError(f"teacher template {template!r} has unknown placeholder(s) "
                         f"{', '.join('$' + e for e in extra)}; allowed: $orig_content, $output_text "
                         "(write $$ for a literal dollar sign)")
    return template


def render_teacher_content(user_content: str, demonstration: str, template: str = "official") -> str:
    """The teacher's last user turn: the template with the original user turn and the demonstration."""
    if template == DEMONSTRATION_TURNS:
        raise ValueError(f"teacher template {DEMONSTRATION_TURNS!r} is a sequence of turns, not the text of one "
                         "user turn: use teacher_messages")
    return string.Template(resolve_teacher_template(template)).substitute(
        orig_content=user_content, output_text=demonstration)


def _messages(example: Any) -> list[dict]:
    messages = example.messages if hasattr(example, "messages") else example["messages"]
    if not messages:
        raise ValueError(f"example {getattr(example, 'id', '?')!r} has no messages")
    if messages[-1].get("role") != "user":
        raise ValueError(f"example {getattr(example, 'id', '?')!r}: the last message must be the user turn, "
                         f"got role {messages[-1].get('role')!r}")
    return [dict(message) for message in messages]


def student_messages(example: Any) -> list[dict]:
    """The student's chat messages: the example's messages (optional system, then the user turn)."""
    return _messages(example)


def _demonstration(example: Any) -> str:
    return example.demonstration if hasattr(example, "demonstration") else example["demonstration"]


def teacher_messages(example: Any, template: str = "official", keep_system: bool = True,
                     demonstration: str | None = None) -> list[dict]:
    """The teacher's chat messages: the example's messages with the last user turn replaced by the
    template around it and the example's demonstration (or `demonstration`, when given); with the template
    DEMONSTRATION_TURNS, the last user turn, the demonstration as an assistant turn, and the last user turn again.

    keep_system=True keeps a system message if the example has one (the official code's behaviour for
    science); keep_system=False drops it (the cookbook's behaviour).
    """
    messages = _messages(example)
    if demonstration is None:
        demonstration = _demonstration(example)
    last = messages[-1]
    if template == DEMONSTRATION_TURNS:
        messages[-1:] = [dict(last), {"role": "assistant", "content": demonstration}, dict(last)]
    else:
        last["content"] = render_teacher_content(last["content"], demonstration, template)
    if not keep_system:
        messages = [message for message in messages if message.get("role") != "system"]
    return messages


def render_prompt_text(tokenizer, messages: Sequence[Mapping[str, str]],
                       chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The chat-templated prompt text, ending with the assistant generation prompt; `chat_template_kwargs`
    are extra template variables (e.g. {"enable_thinking": False} for Qwen3 templates)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
                         "has no chat template; prompts need one (use an instruct/chat model)")
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=True, **dict(chat_template_kwargs or {}))


def _check_budget(max_prompt_tokens: int | None) -> None:
    if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool)
                                          or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {max_prompt_tokens!r}")


def _full_ids(tokenizer, messages: Sequence[Mapping[str, str]],
              chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    text = render_prompt_text(tokenizer, messages, chat_template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]],
                      max_prompt_tokens: int | None = None,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """The chat-templated prompt as token ids; if longer than max_prompt_tokens, its LAST
    max_prompt_tokens tokens are kept (left truncation, as in the official code)."""
    _check_budget(max_prompt_tokens)
    ids = _full_ids(tokenizer, messages, chat_template_kwargs)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt's token ids and what truncation took from its full rendering: `cut_tokens` = full length
    - kept length (0: nothing cut), `demonstration_cut` = whether the demonstration lost its end."""

    ids: tuple[int, ...]
    cut_tokens: int = 0
    demonstration_cut: bool = False


def render_student_prompt(tokenizer, example: Any, max_prompt_tokens: int | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None) -> RenderedPrompt:
    """The student prompt, left-truncated to max_prompt_tokens (official)."""
    _check_budget(max_prompt_tokens)
    full = _full_ids(tokenizer, student_messages(example), chat_template_kwargs)
    kept = full if max_prompt_tokens is None else full[-max_prompt_tokens:]
    return RenderedPrompt(tuple(kept), cut_tokens=len(full) - len(kept))


def render_teacher_prompt(tokenizer, example: Any, template: str = "official",
                          max_prompt_tokens: int | None = None, keep_system: bool = True,
                          chat_template_kwargs: Mapping[str, Any] | None = None) -> RenderedPrompt:
    """The teacher prompt within max_prompt_tokens, cut from the demonstration's side (module docstring).

    With D the demonstration's token ids, the kept demonstration is decode(D[:k]) + DEMONSTRATION_CUT_MARK
    for the largest k in [min(len(D), floor(DEMONSTRATION_FLOOR * max_prompt_tokens)), len(D)) whose
    rendered prompt fits (found by bisection, one rendering per probe: token counts do not add up across
    a cut, so each candidate is rendered in full). If none fits, the prompt with the shortest allowed
    demonstration keeps its last max_prompt_tokens tokens.
    """
    _check_budget(max_prompt_tokens)
    full = _full_ids(tokenizer, teacher_messages(example, template, keep_system), chat_template_kwargs)
    if max_prompt_tokens is None or len(full) <= max_prompt_tokens:
        return RenderedPrompt(tuple(full))
    demo_ids = list(tokenizer(_demonstration(example), add_special_tokens=False)["input_ids"])

    def render(k: int) -> list[int]:
        shown = tokenizer.decode(demo_ids[:k], clean_up_tokenization_spaces=False) + DEMONSTRATION_CUT_MARK
        return _full_ids(tokenizer, teacher_messages(example, template, keep_system, demonstration=shown),
                         chat_template_kwargs)

    floor = min(len(demo_ids), int(DEMONSTRATION_FLOOR * max_prompt_tokens))
    if floor == len(demo_ids):  # the demonstration is short: only the question can give way
        return RenderedPrompt(tuple(full[-max_prompt_tokens:]), cut_tokens=len(full) - max_prompt_tokens)
    best = render(floor)
    if len(best) > max_prompt_tokens:
        kept = best[-max_prompt_tokens:]
        return RenderedPrompt(tuple(kept), cut_tokens=len(full) - len(kept), demonstration_cut=True)
    low, high = floor, len(demo_ids) - 1  # render(low) fits; find the largest k <= high that fits
    while low < high:
        middle = (low + high + 1) // 2
        candidate = render(middle)
        if len(candidate) <= max_prompt_tokens:
            low, best = middle, candidate
        else:
            high = middle - 1
    return RenderedPrompt(tuple(best), cut_tokens=len(full) - len(best), demonstration_cut=True)
