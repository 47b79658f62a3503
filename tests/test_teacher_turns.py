"""The teacher template "turns": the demonstration as an earlier assistant reply to the same user turn."""
import pytest

from sdft.config import load_config
from sdft.data import PromptExample
from sdft.prompts import (DEMONSTRATION_CUT_MARK, render_prompt_ids, render_teacher_content, render_teacher_prompt,
                          teacher_messages)


def _example(system: bool = False, demonstration: str = "Action: f\nAction Input: {}") -> PromptExample:
    messages = ({"role": "system", "content": "Be brief."},) if system else ()
    return PromptExample(id="x", messages=messages + ({"role": "user", "content": "Tools: f()\nRequest: do f"},),
                         demonstration=demonstration)


def test_turns_put_the_demonstration_before_the_same_question():
    user = {"role": "user", "content": "Tools: f()\nRequest: do f"}
    assert teacher_messages(_example(), "turns") == [
        user, {"role": "assistant", "content": "Action: f\nAction Input: {}"}, user]
    system = {"role": "system", "content": "Be brief."}
    assert teacher_messages(_example(system=True), "turns")[0] == system
    assert teacher_messages(_example(system=True), "turns", keep_system=False)[0] == user
    assert teacher_messages(_example(), "turns", demonstration="D")[1] == {"role": "assistant", "content": "D"}
    with pytest.raises(ValueError, match="sequence of turns"):
        render_teacher_content("q", "d", "turns")
    assert load_config(None, ["data.path=x.jsonl", "teacher.template=turns"]).teacher.template == "turns"


def test_turns_prompt_is_cut_from_the_demonstrations_end(tiny_tokenizer):
    example = _example(demonstration=" ".join(f"word{i}" for i in range(80)))
    full = render_prompt_ids(tiny_tokenizer, teacher_messages(example, "turns"))
    assert render_teacher_prompt(tiny_tokenizer, example, "turns").ids == tuple(full)
    budget = len(full) - 40
    rendered = render_teacher_prompt(tiny_tokenizer, example, "turns", max_prompt_tokens=budget)
    assert len(rendered.ids) <= budget and rendered.demonstration_cut and rendered.cut_tokens >= 40
    text = tiny_tokenizer.decode(list(rendered.ids))
    assert DEMONSTRATION_CUT_MARK.strip() in text and text.count("Request: do f") == 2  # both questions kept
