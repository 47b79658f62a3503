"""Pure scoring functions: tool calls, multiple-choice letters, and the evsys in-process verifiers.

Every verifier takes the model's decoded completion and a reference and returns a bool; none of them
imports torch or touches files.

Tool use (`score_tool_calls`), three modes:

- ``"strict"`` reproduces the official SDFT scorer rule for rule. Action names are
  ``re.findall(r"Action:\\s*(\\w+)", text)``; action inputs are the dict-merge (later keys win) of
  ``json.loads`` over ``re.findall(r"Action Input:\\s*({.*?})", text, re.DOTALL)``, skipping blocks that
  fail to parse. The gold side takes the names and ``json.loads(Action_Input)`` straight from the
  ``golden_answer`` fields. Correct iff ``Counter(names) == Counter(gold names)`` and the merged inputs
  equal the merged gold inputs exactly (``"1" != 1``, ``""`` is a value like any other). Quirks kept on
  purpose, because published numbers depend on them:

  * the lazy ``{.*?}`` stops at the first ``}``, so any nested JSON input fails to parse and is dropped,
    while the gold side parses it fully: a perfect answer with a nested input scores False (2 of the 97
    tool-use eval items; the gold answers themselves score 95/97);
  * ``\\w+`` cannot match a name such as ``[Optional]updateUserProfile`` (1 eval item's gold);
  * actions and inputs are found anywhere, including inside thinking text, drafts and repeated calls:
    every occurrence counts toward the Counter and every input block is merged;
  * merging means inputs are compared as one dict: the split of keys between calls is not checked and
    a repeated key keeps only its last value.

- ``"robust"`` fixes the parsing and nothing else: ``<think>``/``<reasoning>`` blocks are removed first
  (an unclosed opening tag drops the rest of the text; a closing tag without an opening one drops
  everything before it); each ``Action Input:`` is parsed with a balanced-brace scanner that respects
  JSON strings and escapes (so nested objects and braces inside strings work; an optional Markdown code
  fence before the object is skipped); a leading bracketed tag such as ``[Optional]`` is removed from
  action names on both sides. The comparison is the same as strict. The gold answers score 97/97.

- ``"actions"``: the robust parsing, comparing only the multiset of action names (inputs ignored): a
  partial-credit diagnostic for models that learn which tool to call before they get its arguments
  exactly right. Not comparable with published numbers.

Multiple choice (`score_mcq`): ``"official"`` is
``text.split("<answer>")[-1].split("</answer>")[0].strip() == answer``; ``"lenient"`` accepts that, else
extracts a letter with the fallbacks, in order: the last "The answer is X", the last line that is
exactly one of A-D or starts with an option label, the last standalone A-D letter.

Echoed options are not answers. An option-label line starts with a letter A-D and ``:``, ``.`` or ``)``
(``^\\s*[A-D]\\s*[:.)]``), followed by the option text or by nothing (an echo cut off after its last label).
When the label lines of a completion carry two or more distinct letters ("A: 53.2 mmHg\nB: 55."), they
are an echo of the options: every label line is ignored by all three fallbacks, so an echo alone gives
no answer and a later "The answer is B" or a line "B" still does. Label lines that carry a single
letter ("B: 55.7 mmHg") are an answer: that letter.

Degenerate references are refused (ValueError), by `check_expected` at load and by the verifiers
themselves, because they would score a completion without looking at it: a blank ``contains`` string
(contained in every completion); a blank ``exact_match`` string (it rewards only an empty reply, which
no benchmark means to ask for); a ``regex_match`` pattern that matches the empty string (``""``,
``.*``, ``x?``, ``$``: it accepts an empty completion and usually every completion); a tool-use golden
answer with no calls (every completion without a tool call would be correct) or a call with a blank
action name (no completion could be correct).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from types import MappingProxyType
from typing import Any, Callable, Mapping

TOOLUSE_MODES = ("strict", "robust", "actions")
MCQ_MODES = ("official", "lenient")
MCQ_LETTERS = ("A", "B", "C", "D")

_STRICT_ACTION = re.compile(r"Action:\s*(\w+)")
_STRICT_INPUT = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)
_ROBUST_ACTION = re.compile(r"Action:\s*(?:\[[^\]\n]*\]\s*)?(\w+)")
_ROBUST_INPUT = re.compile(r"Action Input:\s*(?:```(?:json)?\s*)?(?={)")
_BRACKET_TAG = re.compile(r"^\s*\[[^\]\n]*\]\s*")
_THINKING_TAGS = ("think", "reasoning")
_ANSWER_IS = re.compile(r"(?i:the answer is)\s*:?\s*[(*]*([A-D])\b")
_STANDALONE_LETTER = re.compile(r"\b([A-D])\b")
_OPTION_LABEL = re.compile(r"^\s*([A-D])\s*[:.)]")


# ----------------------------------------------------------------------------------------- tool use
def score_tool_calls(text: str, golden_answer: Any, mode: str = "strict") -> bool:
    """True iff the tool calls in `text` match `golden_answer` (see the module docstring for the rules).

    `golden_answer`: a list of ``{"Action": str, "Action_Input": JSON string or dict}`` (a JSON string
    of such a list is accepted too). `mode`: "strict" (official), "robust" or "actions" (names only).
    """
    if mode not in TOOLUSE_MODES:
        raise ValueError(f"tool-use scoring mode {mode!r} is not one of {list(TOOLUSE_MODES)}")
    gold_names, gold_inputs = _gold_calls(golden_answer, robust=mode != "strict")
    if mode == "strict":
        names, inputs = _strict_calls(text)
    else:
        names, inputs = _robust_calls(strip_thinking(text))
    if mode == "actions":
        return Counter(names) == Counter(gold_names)
    return Counter(names) == Counter(gold_names) and inputs == gold_inputs


def parse_golden_answer(golden_answer: Any) -> list[tuple[str, Any]]:
    """Validate a tool-use golden answer; returns (action name, Action_Input as given) pairs."""
    if isinstance(golden_answer, str):
        try:
            golden_answer = json.loads(golden_answer)
        except json.JSONDecodeError as err:
            raise ValueError(f"golden_answer: the string {golden_answer[:80]!r} is not JSON ({err}); "
                             "expected a list of {'Action': str, 'Action_Input': JSON string}") from None
    if not isinstance(golden_answer, (list, tuple)):
        raise ValueError(f"golden_answer: got {type(golden_answer).__name__} {golden_answer!r:.80}; "
                         "expected a list of {'Action': str, 'Action_Input': JSON string}")
    if not golden_answer:
        raise ValueError("golden_answer: an empty list of calls would score every completion without a tool "
                         "call as correct; expected at least one {'Action': str, 'Action_Input': JSON string}")
    calls = []
    for index, call in enumerate(golden_answer):
        if not isinstance(call, Mapping) or not isinstance(call.get("Action"), str) or not call["Action"].strip():
            raise ValueError(f"golden_answer[{index}]: got {call!r:.120}; expected a dict with a non-empty "
                             "string 'Action' and an 'Action_Input' (JSON string or dict)")
        action_input = call.get("Action_Input", "{}")
        if not isinstance(action_input, (str, Mapping)):
            raise ValueError(f"golden_answer[{index}]['Action_Input']: got "
                             f"{type(action_input).__name__} {action_input!r:.80}; expected a JSON string or dict")
        calls.append((call["Action"], action_input))
    return calls


def render_tool_calls(golden_answer: Any) -> str:
    """The gold calls written the way a model answers: ``"Action: X\\nAction Input: {...}"`` per call."""
    lines = []
    for name, action_input in parse_golden_answer(golden_answer):
        text_input = action_input if isinstance(action_input, str) else json.dumps(dict(action_input))
        lines.append(f"Action: {name}\nAction Input: {text_input}")
    return "\n".join(lines)


def _gold_calls(golden_answer: Any, robust: bool) -> tuple[list[str], dict]:
    names, inputs = [], {}
    for name, action_input in parse_golden_answer(golden_answer):
        names.append(_BRACKET_TAG.sub("", name) if robust else name)
        if isinstance(action_input, Mapping):
            inputs.update(action_input)
            continue
        try:
            parsed = json.loads(action_input)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            inputs.update(parsed)
    return names, inputs


def _strict_calls(text: str) -> tuple[list[str], dict]:
    inputs: dict = {}
    for block in _STRICT_INPUT.findall(text):
        try:
            inputs.update(json.loads(block))
        except json.JSONDecodeError:
            continue
    return _STRICT_ACTION.findall(text), inputs


def _robust_calls(text: str) -> tuple[list[str], dict]:
    inputs: dict = {}
    for match in _ROBUST_INPUT.finditer(text):
        end = balanced_json_end(text, match.end())
        if end is None:
            continue
        try:
            parsed = json.loads(text[match.end():end])
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            inputs.update(parsed)
    return _ROBUST_ACTION.findall(text), inputs


def balanced_json_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` that closes the ``{`` at `text[start]`, or None if it never closes.

    Braces inside JSON strings (with backslash escapes) do not count.
    """
    if start >= len(text) or text[start] != "{":
        return None
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def strip_thinking(text: str, tags: tuple[str, ...] = _THINKING_TAGS) -> str:
    """Remove ``<tag>...</tag>`` blocks for each tag (case-insensitive).

    An opening tag that never closes removes the rest of the text (the model was still thinking); a
    closing tag left without an opening one (templates that put ``<think>`` in the prompt) removes
    everything before it.
    """
    for tag in tags:
        text = re.sub(rf"<{tag}>.*?</{tag}>", "", text, flags=re.DOTALL | re.IGNORECASE)
        text = re.sub(rf"<{tag}>.*\Z", "", text, flags=re.DOTALL | re.IGNORECASE)
        text = re.sub(rf"\A.*</{tag}>", "", text, flags=re.DOTALL | re.IGNORECASE)
    return text


# ------------------------------------------------------------------------------------ multiple choice
def score_mcq(text: str, answer: str, mode: str = "official") -> bool:
    """True iff the completion's answer letter equals `answer` (see the module docstring for the modes)."""
    if mode not in MCQ_MODES:
        raise ValueError(f"MCQ scoring mode {mode!r} is not one of {list(MCQ_MODES)}")
    if not isinstance(answer, str):
        raise ValueError(f"MCQ answer: got {type(answer).__name__} {answer!r}; expected a string such as 'A'")
    if text.split("<answer>")[-1].split("</answer>")[0].strip() == answer:
        return True
    return mode == "lenient" and extract_mcq_letter(text) == answer.strip()


def extract_mcq_letter(text: str) -> str | None:
    """The lenient fallbacks, in order: the last "The answer is X", the last line that is exactly A-D or
    an option label, the last standalone A-D; label lines are skipped when they echo several options."""
    lines = text.splitlines()
    labels = [_OPTION_LABEL.match(line) for line in lines]
    if len({match.group(1) for match in labels if match}) > 1:  # an echo of the options
        lines = [line for line, match in zip(lines, labels) if not match]
        labels = [None] * len(lines)
    kept = "\n".join(lines)
    found = _ANSWER_IS.findall(kept)
    if found:
        return found[-1]
    answers = [match.group(1) if match else line.strip() for line, match in zip(lines, labels)
               if match or line.strip() in MCQ_LETTERS]
    if answers:
        return answers[-1]
    found = _STANDALONE_LETTER.findall(kept)
    return found[-1] if found else None


# --------------------------------------------------------------------------------- evsys verifiers
def contains(text: str, expected: Any) -> bool:
    """Case-insensitive substring test; a list of strings passes if any one is contained."""
    options = _string_options("contains", expected)
    lowered = text.lower()
    return any(option.lower() in lowered for option in options)


def exact_match(text: str, expected: Any) -> bool:
    """``text.strip() == expected.strip()``, case-sensitive; a list passes if any one matches."""
    options = _string_options("exact_match", expected)
    stripped = text.strip()
    return any(stripped == option.strip() for option in options)


def regex_match(text: str, expected: Any) -> bool:
    """``re.search(expected, text, re.DOTALL)`` finds a match; a list passes if any pattern does."""
    options = _string_options("regex_match", expected)
    return any(_compile("regex_match", pattern).search(text) is not None for pattern in options)


def tool_calls_match(text: str, expected: Any, mode: str = "strict") -> bool:
    """`score_tool_calls` with the golden answer as `expected` (strict by default)."""
    return score_tool_calls(text, expected, mode=mode)


VERIFIERS: Mapping[str, Callable[[str, Any], bool]] = MappingProxyType({
    "contains": contains,
    "exact_match": exact_match,
    "regex_match": regex_match,
    "tool_calls_match": tool_calls_match,
})


def get_verifier(fn_name: str) -> Callable[[str, Any], bool]:
    """The evsys verifier called `fn_name`."""
    if fn_name not in VERIFIERS:
        raise ValueError(f"verifier fn_name {fn_name!r} is not one of {sorted(VERIFIERS)}")
    return VERIFIERS[fn_name]


def check_expected(fn_name: str, expected: Any) -> None:
    """Raise ValueError if `expected` is not a valid reference for verifier `fn_name` (see the module
    docstring for the degenerate references that are refused)."""
    get_verifier(fn_name)
    if fn_name == "tool_calls_match":
        parse_golden_answer(expected)
        return
    for option in _string_options(fn_name, expected):
        if fn_name == "regex_match":
            _compile(fn_name, option)


_BLANK_REASONS = {
    "contains": "every completion contains it",
    "exact_match": "it rewards only an empty reply",
}


def _string_options(fn_name: str, expected: Any) -> list[str]:
    options = [expected] if isinstance(expected, str) else expected
    if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{fn_name}: expected must be a string or a non-empty list of strings, "
                         f"got {type(expected).__name__} {expected!r:.80}")
    for option in options:
        if fn_name in _BLANK_REASONS and not option.strip():
            raise ValueError(f"{fn_name}: expected {option!r} is blank ({_BLANK_REASONS[fn_name]}); allowed: a "
                             "string with at least one non-space character, or a non-empty list of such strings")
    return list(options)


def _compile(fn_name: str, pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"{fn_name}: expected {pattern!r} is not a valid regular expression ({err})") from None
    if compiled.search("") is not None:
        raise ValueError(f"{fn_name}: expected {pattern!r} matches the empty string (it accepts an empty "
                         "completion and usually every completion); allowed: a pattern that needs at least "
                         "one character to match")
    return compiled
