import pytest

from sdft.batches import TruncationReport, encode_examples, truncation_report
from sdft.data import PromptExample
from sdft.prompts import (DEMONSTRATION_CUT_MARK, DEMONSTRATION_FLOOR, TEACHER_TEMPLATES, RenderedPrompt,
                          render_prompt_ids, render_prompt_text, render_student_prompt, render_teacher_content,
                          render_teacher_prompt, resolve_teacher_template, student_messages, teacher_messages)

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


# ------------------------------------------------------------------------------------------ truncation
LONG_DEMO = "Action: getWeather\nThought: " + " ".join(f"step {i} of the plan." for i in range(120))


def _kept_demonstration_reference(tokenizer, ex, budget):
    """Independent reference: scan every demonstration prefix from the floor upwards and keep the longest
    whose whole teacher prompt (prefix + mark) fits, stopping at the first that does not."""
    demo_ids = tokenizer(ex.demonstration, add_special_tokens=False)["input_ids"]
    best = None
    for k in range(min(len(demo_ids), int(DEMONSTRATION_FLOOR * budget)), len(demo_ids)):
        shown = tokenizer.decode(demo_ids[:k], clean_up_tokenization_spaces=False) + DEMONSTRATION_CUT_MARK
        ids = render_prompt_ids(tokenizer, teacher_messages(ex, demonstration=shown))
        if len(ids) > budget:
            break
        best = ids
    return best


def test_teacher_prompt_that_fits_is_untouched(tiny_tokenizer):
    ex = example()
    full = render_prompt_ids(tiny_tokenizer, teacher_messages(ex))
    rendered = render_teacher_prompt(tiny_tokenizer, ex, max_prompt_tokens=len(full))
    assert rendered == RenderedPrompt(tuple(full), 0, False)
    assert render_teacher_prompt(tiny_tokenizer, ex, max_prompt_tokens=None).ids == tuple(full)


def test_a_long_demonstration_is_cut_from_its_end_and_the_question_stays(tiny_tokenizer):
    ex = PromptExample(id="w/0", messages=({"role": "user", "content": "What is the weather in Paris today?"},),
                       demonstration=LONG_DEMO)
    demo_tokens = len(tiny_tokenizer(LONG_DEMO, add_special_tokens=False)["input_ids"])
    budget = demo_tokens // 2 + 60   # shorter than the demonstration alone
    assert demo_tokens > budget
    full = render_prompt_ids(tiny_tokenizer, teacher_messages(ex))
    # what the official left truncation would keep: the demonstration's tail, no question at all
    official = tiny_tokenizer.decode(render_prompt_ids(tiny_tokenizer, teacher_messages(ex), budget))
    assert "What is the weather" not in official

    rendered = render_teacher_prompt(tiny_tokenizer, ex, max_prompt_tokens=budget)
    assert rendered.ids == tuple(_kept_demonstration_reference(tiny_tokenizer, ex, budget))
    assert len(rendered.ids) <= budget and rendered.demonstration_cut
    assert rendered.cut_tokens == len(full) - len(rendered.ids) > 0
    text = tiny_tokenizer.decode(rendered.ids)
    question_part, demo_part = text.split("This is an example for a response to the question:\n")
    assert question_part == "<|im_start|>user\n\nWhat is the weather in Paris today?\n\n"
    shown, closing = demo_part.split(DEMONSTRATION_CUT_MARK + "\n\n")
    assert LONG_DEMO.startswith(shown) and len(shown) > len(LONG_DEMO) // 3
    assert closing == ("Now answer with a response of your own, including the thinking process.\n"
                       "<|im_end|>\n<|im_start|>assistant\n")


def test_a_long_question_with_a_long_demonstration_keeps_the_demonstration_floor(tiny_tokenizer):
    question = "Which tool? " + " ".join(f"tool {i} does thing {i}." for i in range(80))
    ex = PromptExample(id="w/1", messages=({"role": "user", "content": question},), demonstration=LONG_DEMO)
    budget = 120
    demo_ids = tiny_tokenizer(LONG_DEMO, add_special_tokens=False)["input_ids"]
    floor = int(DEMONSTRATION_FLOOR * budget)
    shown = tiny_tokenizer.decode(demo_ids[:floor], clean_up_tokenization_spaces=False) + DEMONSTRATION_CUT_MARK
    expected = render_prompt_ids(tiny_tokenizer, teacher_messages(ex, demonstration=shown))[-budget:]
    rendered = render_teacher_prompt(tiny_tokenizer, ex, max_prompt_tokens=budget)
    assert rendered.ids == tuple(expected) and rendered.demonstration_cut
    assert tiny_tokenizer.decode(rendered.ids).endswith(
        "thinking process.\n<|im_end|>\n<|im_start|>assistant\n")


def test_a_short_demonstration_is_kept_whole_and_the_question_cut_from_the_left(tiny_tokenizer):
    question = "Which tool? " + " ".join(f"tool {i} does thing {i}." for i in range(80))
    ex = PromptExample(id="w/2", messages=({"role": "user", "content": question},),
                       demonstration="Action: getWeather")
    rendered = render_teacher_prompt(tiny_tokenizer, ex, max_prompt_tokens=100)
    official = render_prompt_ids(tiny_tokenizer, teacher_messages(ex), 100)
    assert rendered.ids == tuple(official) and not rendered.demonstration_cut and rendered.cut_tokens > 0


def test_student_prompt_keeps_the_official_left_truncation(tiny_tokenizer):
    ex = example(system=True)
    full = render_prompt_ids(tiny_tokenizer, student_messages(ex))
    rendered = render_student_prompt(tiny_tokenizer, ex, max_prompt_tokens=9)
    assert rendered == RenderedPrompt(tuple(full[-9:]), len(full) - 9, False)
    assert render_student_prompt(tiny_tokenizer, ex, None) == RenderedPrompt(tuple(full), 0, False)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        render_teacher_prompt(tiny_tokenizer, ex, max_prompt_tokens=0)


def test_encode_examples_records_and_counts_what_truncation_cut(tiny_tokenizer):
    short = example()
    long_demo = PromptExample(id="w/0", messages=({"role": "user", "content": "Weather in Paris?"},),
                              demonstration=LONG_DEMO)
    long_question = PromptExample(id="w/1", demonstration="Action: getWeather", messages=(
        {"role": "user", "content": "Which tool? " + " ".join(f"tool {i}." for i in range(60))},))
    budget = 100
    encoded = encode_examples(tiny_tokenizer, [short, long_demo, long_question], max_prompt_tokens=budget)
    assert [e.student_cut > 0 for e in encoded] == [False, False, True]
    assert [e.teacher_cut > 0 for e in encoded] == [False, True, True]
    assert [e.demonstration_cut for e in encoded] == [False, True, False]
    assert encoded[1].teacher_ids == render_teacher_prompt(tiny_tokenizer, long_demo, "official", budget).ids
    assert encoded[2].student_ids == tuple(render_prompt_ids(tiny_tokenizer, student_messages(long_question), budget))
    report = truncation_report(encoded, budget)
    assert report == TruncationReport(examples=3, student=1, teacher=2, teacher_demonstration=1,
                                      max_prompt_tokens=budget)
    assert report.note == ("prompt truncation at data.max_prompt_tokens=100: 1 of 3 student prompts cut from the "
                           "left; 2 of 3 teacher prompts cut (1 of them by shortening the demonstration, "
                           "marked '[...]')")
    untouched = truncation_report(encode_examples(tiny_tokenizer, [short], max_prompt_tokens=budget), budget)
    assert untouched.note is None
    assert untouched.describe() == ("prompt truncation at data.max_prompt_tokens=100: none of 1 student or "
                                    "teacher prompts cut")
