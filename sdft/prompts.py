"""Student and teacher prompts: chat messages, the teacher's in-context demonstration template, and
chat-template rendering to token ids with left truncation.

The student sees the example's messages unchanged. The teacher sees the same messages with the last
user turn wrapped by a `string.Template` that also shows the gold demonstration.
"""
from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

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
    if template in TEACHER_TEMPLATES:
        return TEACHER_TEMPLATES[template]
    names = _template_identifiers(template)
    missing = [name for name in TEMPLATE_PLACEHOLDERS if name not in names]
    if missing:
        raise ValueError(
            f"teacher template {template!r} is neither a known name {sorted(TEACHER_TEMPLATES)} nor a "
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


def teacher_messages(example: Any, template: str = "official", keep_system: bool = True) -> list[dict]:
    """The teacher's chat messages: the example's messages with the last user turn replaced by the
    template around it and the example's demonstration.

    keep_system=True keeps a system message if the example has one (the official code's behaviour for
    science); keep_system=False drops it (the cookbook's behaviour).
    """
    messages = _messages(example)
    demonstration = example.demonstration if hasattr(example, "demonstration") else example["demonstration"]
    last = messages[-1]
    last["content"] = render_teacher_content(last["content"], demonstration, template)
    if not keep_system:
        messages = [message for message in messages if message.get("role") != "system"]
    return messages


def render_prompt_text(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The chat-templated prompt text, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
                         "has no chat template; prompts need one (use an instruct/chat model)")
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=True)


def render_prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]],
                      max_prompt_tokens: int | None = None) -> list[int]:
    """The chat-templated prompt as token ids; if longer than max_prompt_tokens, its LAST
    max_prompt_tokens tokens are kept (left truncation, as in the official code)."""
    if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool)
                                          or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {max_prompt_tokens!r}")
    text = render_prompt_text(tokenizer, messages)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids
