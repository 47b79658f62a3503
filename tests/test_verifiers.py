import json
from pathlib import Path

import pytest

from sdft.verifiers import (VERIFIERS, balanced_json_end, check_expected, contains, exact_match,
                            extract_mcq_letter, get_verifier, regex_match, render_tool_calls,
                            score_mcq, score_tool_calls, strip_thinking, tool_calls_match)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEATHER = [{"Action": "getWeather", "Action_Input": '{"city": "Paris", "unit": "celsius"}'}]
NESTED = [{"Action": "updateProfile",
           "Action_Input": '{"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}'}]


# ------------------------------------------------------------------------------------- tool calls
@pytest.mark.parametrize("mode", ["strict", "robust"])
def test_exact_call_is_correct_in_both_modes(mode):
    text = 'Thought: I need the weather.\nAction: getWeather\nAction Input: {"city": "Paris", "unit": "celsius"}'
    assert score_tool_calls(text, WEATHER, mode)


@pytest.mark.parametrize("mode", ["strict", "robust"])
def test_wrong_action_or_value_is_wrong(mode):
    assert not score_tool_calls('Action: getForecast\nAction Input: {"city": "Paris", "unit": "celsius"}',
                                WEATHER, mode)
    assert not score_tool_calls('Action: getWeather\nAction Input: {"city": "Lyon", "unit": "celsius"}',
                                WEATHER, mode)
    assert not score_tool_calls("I cannot help with that.", WEATHER, mode)


@pytest.mark.parametrize("mode", ["strict", "robust"])
def test_type_and_empty_string_are_compared_exactly(mode):
    gold = [{"Action": "search", "Action_Input": '{"page": 1, "gender": ""}'}]
    assert score_tool_calls('Action: search\nAction Input: {"page": 1, "gender": ""}', gold, mode)
    assert not score_tool_calls('Action: search\nAction Input: {"page": "1", "gender": ""}', gold, mode)
    assert not score_tool_calls('Action: search\nAction Input: {"page": 1}', gold, mode)
    assert not score_tool_calls('Action: search\nAction Input: {"page": 1, "gender": "", "x": 2}', gold, mode)


def test_actions_mode_compares_tool_names_only():
    assert score_tool_calls('Action: getWeather\nAction Input: {"city": "Lyon"}', WEATHER, "actions")
    assert score_tool_calls("<think>Action: getForecast</think>\nAction: getWeather", WEATHER, "actions")
    assert not score_tool_calls('Action: getForecast\nAction Input: {"city": "Paris", "unit": "celsius"}',
                                WEATHER, "actions")
    assert not score_tool_calls("Action: getWeather\nAction: getWeather", WEATHER, "actions")  # counted
    assert not score_tool_calls("I cannot help with that.", WEATHER, "actions")


def test_nested_json_fails_strict_passes_robust():
    text = render_tool_calls(NESTED)
    assert "profileData" in text
    assert not score_tool_calls(text, NESTED, "strict")
    assert score_tool_calls(text, NESTED, "robust")


def test_strict_lazy_regex_drops_nested_block_on_both_sides_only_for_the_text():
    # Without any nested gold, a nested block in the text is simply skipped in strict mode.
    gold = [{"Action": "a", "Action_Input": '{"k": 1}'}]
    text = 'Action: a\nAction Input: {"k": 1}\nAction: b\nAction Input: {"n": {"deep": 2}}'
    assert not score_tool_calls(text, gold, "strict")  # the extra action b breaks the Counter
    gold_b = gold + [{"Action": "b", "Action_Input": "{}"}]
    assert score_tool_calls(text, gold_b, "strict")     # the nested block failed to parse: skipped
    assert not score_tool_calls(text, gold_b, "robust")  # robust parses it: extra key n


def test_actions_in_thinking_count_in_strict_not_in_robust():
    text = ('<think>Maybe Action: getForecast would work?</think>\n'
            'Action: getWeather\nAction Input: {"city": "Paris", "unit": "celsius"}')
    assert not score_tool_calls(text, WEATHER, "strict")
    assert score_tool_calls(text, WEATHER, "robust")
    reasoning = text.replace("<think>", "<reasoning>").replace("</think>", "</reasoning>")
    assert score_tool_calls(reasoning, WEATHER, "robust")


def test_inputs_in_thinking_are_merged_in_strict():
    text = ('<think>Action Input: {"draft": true}</think>\n'
            'Action: getWeather\nAction Input: {"city": "Paris", "unit": "celsius"}')
    assert not score_tool_calls(text, WEATHER, "strict")
    assert score_tool_calls(text, WEATHER, "robust")


@pytest.mark.parametrize("mode", ["strict", "robust"])
def test_duplicate_actions_are_counted(mode):
    gold = [{"Action": "getVerse", "Action_Input": '{"verse": 1}'},
            {"Action": "getVerse", "Action_Input": '{"verse": 2}'}]
    once = 'Action: getVerse\nAction Input: {"verse": 2}'
    twice = 'Action: getVerse\nAction Input: {"verse": 1}\nAction: getVerse\nAction Input: {"verse": 2}'
    thrice = twice + '\nAction: getVerse\nAction Input: {"verse": 2}'
    # Inputs merge into one dict ({"verse": 2} either way), so only the Counter tells these apart.
    assert not score_tool_calls(once, gold, mode)
    assert score_tool_calls(twice, gold, mode)
    assert not score_tool_calls(thrice, gold, mode)


@pytest.mark.parametrize("mode", ["strict", "robust"])
def test_unparsable_block_is_skipped(mode):
    text = ("Action: getWeather\nAction Input: {city: Paris}\n"
            'Action Input: {"city": "Paris", "unit": "celsius"}')
    assert score_tool_calls(text, WEATHER, mode)
    assert not score_tool_calls("Action: getWeather\nAction Input: {'city': 'Paris', 'unit': 'celsius'}",
                                WEATHER, mode)


def test_braces_inside_strings_and_code_fences_in_robust():
    gold = [{"Action": "post", "Action_Input": '{"body": "use {x} and }", "n": {"m": [1, {"k": "\\"}"}]}}'}]
    text = render_tool_calls(gold)
    assert not score_tool_calls(text, gold, "strict")
    assert score_tool_calls(text, gold, "robust")
    fenced = 'Action: getWeather\nAction Input: ```json\n{"city": "Paris", "unit": "celsius"}\n```'
    assert score_tool_calls(fenced, WEATHER, "robust")


def test_optional_tag_on_gold_action_name():
    gold = [{"Action": "getUser", "Action_Input": '{"id": "1"}'},
            {"Action": "[Optional]updateUser", "Action_Input": '{"id": "1", "name": "x"}'}]
    text = render_tool_calls(gold)
    assert "Action: [Optional]updateUser" in text
    assert not score_tool_calls(text, gold, "strict")  # \w+ cannot match "[Optional]..."
    assert score_tool_calls(text, gold, "robust")
    plain = text.replace("[Optional]", "")
    assert score_tool_calls(plain, gold, "robust")


def test_golden_answer_forms_and_errors():
    text = render_tool_calls(WEATHER)
    assert score_tool_calls(text, json.dumps(WEATHER))
    as_dict = [{"Action": "getWeather", "Action_Input": {"city": "Paris", "unit": "celsius"}}]
    assert score_tool_calls(text, as_dict)
    assert score_tool_calls("Action: ping\nAction Input: {}", [{"Action": "ping", "Action_Input": "{}"}])
    with pytest.raises(ValueError, match="golden_answer"):
        score_tool_calls(text, "not json")
    with pytest.raises(ValueError, match=r"golden_answer\[0\]"):
        score_tool_calls(text, [{"Name": "x"}])
    with pytest.raises(ValueError, match="'strict', 'robust'"):
        score_tool_calls(text, WEATHER, mode="fuzzy")


def test_balanced_json_end_and_strip_thinking():
    text = 'x {"a": {"b": "}"}} tail'
    assert text[2:balanced_json_end(text, 2)] == '{"a": {"b": "}"}}'
    assert balanced_json_end('{"a": 1', 0) is None
    assert balanced_json_end("abc", 0) is None
    assert strip_thinking("a<think>x</think>b<THINK>y</THINK>c") == "abc"
    assert strip_thinking("answer <think>never closed") == "answer "
    assert strip_thinking("prompt opened it</think>final") == "final"


def _tooluse_rows():
    datasets = pytest.importorskip("datasets")
    folder = DATA / "tooluse" / "eval_data"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    return list(datasets.load_from_disk(str(folder)))


def test_gold_answers_score_95_of_97_strict_and_97_robust():
    rows = _tooluse_rows()
    assert len(rows) == 97
    strict = [score_tool_calls(render_tool_calls(r["golden_answer"]), r["golden_answer"], "strict") for r in rows]
    robust = [score_tool_calls(render_tool_calls(r["golden_answer"]), r["golden_answer"], "robust") for r in rows]
    assert sum(strict) == 95
    assert sum(robust) == 97
    failing = [r["golden_answer"] for r, ok in zip(rows, strict) if not ok]
    assert all(any("{" in json.dumps(json.loads(c["Action_Input"]))[1:] for c in g) for g in failing)


# ------------------------------------------------------------------------------------------- MCQ
def test_mcq_official():
    assert score_mcq("<reasoning>\npolar\n</reasoning>\n<answer>\nB\n</answer>", "B")
    assert not score_mcq("<reasoning>\npolar\n</reasoning>\n<answer>\nB\n</answer>", "A")
    assert score_mcq("<answer>A</answer> then <answer> C </answer>", "C")  # the last tag wins
    assert score_mcq("  D  ", "D")  # no tag: the whole text, stripped
    assert not score_mcq("<answer>\nB: the second option\n</answer>", "B")
    assert not score_mcq("The answer is B.", "B")


def test_mcq_lenient_fallbacks_in_order():
    assert score_mcq("<answer>\nB\n</answer>", "B", mode="lenient")
    assert score_mcq("Options A and C are wrong. The answer is B.", "B", mode="lenient")
    assert score_mcq("the answer is: (D)", "D", mode="lenient")
    assert not score_mcq("The answer is a polar molecule, so\nC", "A", mode="lenient")
    assert score_mcq("The answer is a polar molecule, so\nC", "C", mode="lenient")
    assert score_mcq("I compared A with B.\nC\nThat is all about D.", "C", mode="lenient")  # line beats last
    assert score_mcq("I compared A with B, so D it is", "D", mode="lenient")  # the last letter
    assert not score_mcq("nothing here", "A", mode="lenient")
    assert extract_mcq_letter("The answer is A. Wait, the answer is C.") == "C"
    assert extract_mcq_letter("no letter") is None


def test_mcq_lenient_ignores_echoed_options():
    echo = "A: 53.2 mmHg\nB: 55.7 mmHg\nC: 58.3 mmHg\nD: 51.4 mmHg"
    assert extract_mcq_letter(echo) is None  # not "D", the last letter of the echo
    assert extract_mcq_letter(echo + "\nThe answer is B.") == "B"
    assert extract_mcq_letter(echo + "\n\nC") == "C"  # a line that is exactly a letter
    assert extract_mcq_letter("A) 53.2\nB. 55.7\nC:") is None  # any label style, an echo cut off after C
    # science/2 of the tiny ablation (16 new tokens): an echo cut short, not the answer B
    assert not score_mcq("A: 53.2 mmHg\nB: 55.", "B", mode="lenient")
    assert extract_mcq_letter("A: -2.36\nB: 0.38\n") is None


def test_mcq_lenient_single_labelled_line_is_an_answer():
    assert score_mcq("B: 55.7 mmHg", "B", mode="lenient")
    assert extract_mcq_letter("D: CCOC(=O)C(C") == "D"  # the label, not the last standalone letter (C)
    assert extract_mcq_letter("C:\n\nC:\n\nC:") == "C"  # one letter repeated is not an echo
    assert extract_mcq_letter("Thinking about it.\nB: 55.7 mmHg because of Raoult's law") == "B"
    assert not score_mcq("B: 55.7 mmHg", "B")  # official unchanged


def test_mcq_errors():
    with pytest.raises(ValueError, match="'official', 'lenient'"):
        score_mcq("A", "A", mode="loose")
    with pytest.raises(ValueError, match="MCQ answer"):
        score_mcq("A", None)


def test_science_data_gold_letters_score_in_both_modes():
    datasets = pytest.importorskip("datasets")
    folder = DATA / "science" / "eval_data"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    rows = list(datasets.load_from_disk(str(folder)))
    assert len(rows) == 507
    for row in rows:
        perfect = f"<reasoning>\n...\n</reasoning>\n<answer>\n{row['answer']}\n</answer>"
        assert score_mcq(perfect, row["answer"]) and score_mcq(perfect, row["answer"], "lenient")


# --------------------------------------------------------------------------------- evsys verifiers
def test_contains():
    assert contains("The capital is PARIS.", "Paris")
    assert contains("It is Tokyo", ["Kyoto", "tokyo"])
    assert not contains("It is Berlin", ["Paris", "Rome"])


def test_exact_match():
    assert exact_match("  Paris\n", "Paris")
    assert not exact_match("paris", "Paris")
    assert not exact_match("Paris, France", "Paris")
    assert exact_match("Rome", ["Paris", "Rome"])


def test_regex_match():
    assert regex_match("first line\nanswer: 42", r"line.answer: \d+")  # DOTALL: '.' matches newline
    assert not regex_match("answer: x", r"answer: \d+")
    assert regex_match("b", ["^a$", "^b$"])


def test_tool_calls_match_defaults_to_strict():
    text = render_tool_calls(NESTED)
    assert not tool_calls_match(text, NESTED)
    assert tool_calls_match(text, NESTED, mode="robust")
    assert tool_calls_match(render_tool_calls(WEATHER), WEATHER)


def test_registry_and_expected_checks():
    assert set(VERIFIERS) == {"contains", "exact_match", "regex_match", "tool_calls_match"}
    with pytest.raises(TypeError):
        VERIFIERS["new"] = contains
    assert get_verifier("contains") is contains
    with pytest.raises(ValueError, match="'contains', 'exact_match', 'regex_match', 'tool_calls_match'"):
        get_verifier("fuzzy")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        check_expected("regex_match", "(unclosed")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        check_expected("contains", 5)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        contains("x", [])
    with pytest.raises(ValueError, match="golden_answer"):
        check_expected("tool_calls_match", {"Action": "x"})
    check_expected("tool_calls_match", WEATHER)


@pytest.mark.parametrize("fn_name, expected, message", [
    ("contains", "", r"contains: expected '' is blank \(every completion contains it\); allowed: a string with"),
    ("contains", ["Paris", " "], r"contains: expected ' ' is blank"),
    ("exact_match", "", r"exact_match: expected '' is blank \(it rewards only an empty reply\); allowed: "),
    ("exact_match", "\n", r"exact_match: expected '\\n' is blank"),
    ("regex_match", "", r"regex_match: expected '' matches the empty string .*allowed: a pattern that needs"),
    ("regex_match", ".*", r"regex_match: expected '\.\*' matches the empty string"),
    ("regex_match", ["Paris", "(Lyon)?"], r"regex_match: expected '\(Lyon\)\?' matches the empty string"),
    ("regex_match", "^$", r"regex_match: expected '\^\$' matches the empty string"),
    ("tool_calls_match", [], r"golden_answer: an empty list of calls would score every completion without a "
                             r"tool call as correct; expected at least one"),
    ("tool_calls_match", "[]", r"golden_answer: an empty list of calls"),
    ("tool_calls_match", [{"Action": "", "Action_Input": "{}"}], r"golden_answer\[0\].*non-empty string 'Action'"),
])
def test_degenerate_references_are_refused(fn_name, expected, message):
    with pytest.raises(ValueError, match=message):
        check_expected(fn_name, expected)
    with pytest.raises(ValueError, match=message):  # the verifier itself refuses too: never a silent True
        VERIFIERS[fn_name]("any completion at all", expected)


def test_non_degenerate_references_still_score():
    check_expected("regex_match", r"\bParis\b")
    assert regex_match("It is Paris.", r"\bParis\b") and not regex_match("", r"\bParis\b")
    assert contains("an eyas", ["eyas", "falcon"]) and exact_match(" B ", "B")
