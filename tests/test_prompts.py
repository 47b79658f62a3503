import pytest

from sdft.data import PromptExample
from sdft.prompts import (TEACHER_TEMPLATES, render_prompt_ids, render_prompt_text, render_teacher_content,
                          resolve_teacher_template, student_messages, teacher_messages)

SYSTEM = {"role": "system", "content": "Answer in the <answer> format."}


def example(system: bool = False) -> PromptExample:
    user = {"role": "user", "content": "What is the capital of France?"}
    return PromptExample(id="q/0", messages=(SYSTEM, user) if system else (user,),
                         demonstration="The capital of France is Paris.", answer="Paris")


def test_template_texts_are_exactly_the_reference_strings():
    assert TEACHER_TEMPLATES["official"] == (
        "\n$orig_content\n\nThis is an example for a response to the question:\n$output_text\n\n"
        "Now answer with a response of your own, including the thinking process.\n")
    assert TEACHER_TEMPLATES["cookbook"] == TEACHER_TEMPLATES["official"][1:-1]


def test_teacher_turn_wraps_question_and_demonstration():
    messages = teacher_messages(example(), "official")
    assert messages == [{"role": "user", "content": (
        "\nWhat is the capital of France?\n\nThis is an example for a response to the question:\n"
        "The capital of France is Paris.\n\nNow answer with a response of your own, including the "
        "thinking process.\n")}]
    cookbook = teacher_messages(example(), "cookbook")[0]["content"]
    assert cookbook == messages[0]["content"][1:-1]


def test_student_messages_are_the_example_messages_and_copies():
    ex = example(system=True)
    messages = student_messages(ex)
    assert messages == list(ex.messages)
    messages[1]["content"] = "changed"
    assert ex.messages[1]["content"] == "What is the capital of France?"


def test_system_message_kept_by_default_and_dropped_on_request():
    kept = teacher_messages(example(system=True))
    assert [m["role"] for m in kept] == ["system", "user"]
    assert kept[0] == SYSTEM
    assert "The capital of France is Paris." in kept[1]["content"]
    dropped = teacher_messages(example(system=True), keep_system=False)
    assert [m["role"] for m in dropped] == ["user"]
    assert dropped[0]["content"] == kept[1]["content"]


def test_demonstration_with_dollar_signs_is_not_substituted():
    ex = PromptExample(id="d", messages=({"role": "user", "content": "Price of $item?"},),
                       demonstration="It costs $5 and $output_text stays literal.")
    content = teacher_messages(ex)[0]["content"]
    assert "Price of $item?" in content and "It costs $5 and $output_text stays literal." in content


def test_custom_template_and_its_errors():
    assert render_teacher_content("Q", "D", "Q: $orig_content | A: ${output_text}") == "Q: Q | A: D"
    with pytest.raises(ValueError, match=r"\$output_text"):
        resolve_teacher_template("Only $orig_content here")
    with pytest.raises(ValueError, match=r"\$orig_content"):
        resolve_teacher_template("Only $output_text here")
    with pytest.raises(ValueError, match=r"\$extra"):
        resolve_teacher_template("$orig_content $output_text $extra")
    with pytest.raises(ValueError, match="official"):
        resolve_teacher_template("offical")


def test_render_prompt_ids_uses_chat_template_with_generation_prompt(tiny_tokenizer):
    messages = student_messages(example(system=True))
    text = render_prompt_text(tiny_tokenizer, messages)
    assert text == ("<|im_start|>system\nAnswer in the <answer> format.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = render_prompt_ids(tiny_tokenizer, messages)
    assert tiny_tokenizer.decode(ids) == text
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_left_truncation_keeps_the_last_tokens(tiny_tokenizer):
    messages = teacher_messages(example())
    full = render_prompt_ids(tiny_tokenizer, messages)
    assert render_prompt_ids(tiny_tokenizer, messages, max_prompt_tokens=len(full)) == full
    assert render_prompt_ids(tiny_tokenizer, messages, max_prompt_tokens=10 * len(full)) == full
    short = render_prompt_ids(tiny_tokenizer, messages, max_prompt_tokens=7)
    assert short == full[-7:]
    assert tiny_tokenizer.decode(short).endswith("assistant\n")
    assert tiny_tokenizer.decode(full).endswith(tiny_tokenizer.decode(short))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_prompt_tokens"):
            render_prompt_ids(tiny_tokenizer, messages, max_prompt_tokens=bad)


def test_tokenizer_without_chat_template_is_an_error(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt_ids(plain, student_messages(example()))


def test_last_message_must_be_user_turn():
    with pytest.raises(ValueError, match="user"):
        student_messages({"messages": [{"role": "assistant", "content": "hi"}], "demonstration": "x"})
