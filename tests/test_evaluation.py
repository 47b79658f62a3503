import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdft.evaluation import (Benchmark, EvalItem, EvalResult, benchmark_from_examples, evaluate,
                             load_task_benchmark)
from sdft.prompts import render_prompt_ids
from sdft.sampling import NativeSampler
from sdft.stats import wilson_interval
from sdft.verifiers import render_tool_calls

WEATHER = [{"Action": "getWeather", "Action_Input": '{"city": "Paris", "unit": "celsius"}'}]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NESTED = [{"Action": "update", "Action_Input": '{"id": "u1", "data": {"url": "x"}}'}]


def _write_tasks(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _task(task_id, instruction, fn_name, expected, kind="in_process"):
    return {"task_id": task_id, "instruction": instruction,
            "verifier": {"kind": kind, "fn_name": fn_name, "expected": expected}}


def _user(text):
    return ({"role": "user", "content": text},)


def _fixed_generate(tokenizer, text, seen=None):
    """A GenerateFn that answers `text` to every prompt (and records the prompts it was given)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(prompts, max_new_tokens):
        if seen is not None:
            seen.append((prompts, max_new_tokens))
        return [list(ids) + [tokenizer.eos_token_id] for _ in prompts]
    return generate


# ------------------------------------------------------------------------------------------- loading
def test_load_task_benchmark(tmp_path):
    folder = _write_tasks(tmp_path / "capitals", [
        _task("val_0", "Capital of Germany?", "contains", "Berlin"),
        "",
        _task("val_1", "Capital of Japan?", "exact_match", ["Tokyo", "Tōkyō"]),
        _task("val_2", "Answer with a number.", "regex_match", r"\b\d+\b"),
        _task(3, "Get the weather.", "tool_calls_match", WEATHER),
    ])
    bench = load_task_benchmark(folder, run_every=5, max_new_tokens=32)
    assert (bench.name, bench.split, bench.run_every, bench.max_new_tokens) == ("capitals", "val", 5, 32)
    assert [item.id for item in bench.items] == ["val_0", "val_1", "val_2", "3"]
    assert bench.items[0].messages == ({"role": "user", "content": "Capital of Germany?"},)
    assert bench.items[0].reference == "Berlin"
    checks = [("It is BERLIN.", "Nope"), (" Tokyo\n", "tokyo"), ("It is 42.", "forty-two"),
              (render_tool_calls(WEATHER), "Action: getWeather")]
    for item, (good, bad) in zip(bench.items, checks):
        assert item.verifier(good) is True
        assert item.verifier(bad) is False
    named = load_task_benchmark(folder, name="held_out", split="test")
    assert (named.name, named.split, named.run_every) == ("held_out", "test", None)


@pytest.mark.parametrize("line,message", [
    ('{"task_id": "a", "instruction": ', r"tasks\.jsonl:2: not valid JSON"),
    ('["a list"]', r"tasks\.jsonl:2: expected a JSON object"),
    (json.dumps({"task_id": "a", "verifier": {}}), r"tasks\.jsonl:2: missing key\(s\) \['instruction'\]"),
    (json.dumps(_task("a", "q", "fuzzy", "x")),
     r"tasks\.jsonl:2: verifier fn_name 'fuzzy' is not one of \['contains', 'exact_match', 'regex_match'"),
    (json.dumps(_task("a", "q", "contains", "x", kind="harbor")),
     r"tasks\.jsonl:2: verifier kind 'harbor' is not supported; allowed: \['in_process'\]"),
    (json.dumps({"task_id": "a", "instruction": "q", "verifier": {"kind": "in_process", "fn_name": "contains"}}),
     r"tasks\.jsonl:2: verifier is missing key\(s\) \['expected'\]"),
    (json.dumps(_task("a", "q", "regex_match", "(")), r"tasks\.jsonl:2: .*not a valid regular expression"),
    (json.dumps(_task("a", "q", "tool_calls_match", "call it")), r"tasks\.jsonl:2: .*golden_answer"),
    (json.dumps(_task("a", "", "contains", "x")), r"tasks\.jsonl:2: instruction must be a non-empty string"),
    (json.dumps(_task("first", "q", "contains", "x")), r"tasks\.jsonl:2: task_id 'first' already used on line 1"),
])
def test_load_task_benchmark_errors_name_file_and_line(tmp_path, line, message):
    folder = _write_tasks(tmp_path / "bench", [_task("first", "q", "contains", "x"), line])
    with pytest.raises(ValueError, match=message):
        load_task_benchmark(folder)


@pytest.mark.parametrize("fn_name, expected, problem", [
    ("contains", "", r"contains: expected '' is blank \(every completion contains it\); allowed: a string"),
    ("contains", ["Berlin", ""], r"contains: expected '' is blank"),
    ("exact_match", "  ", r"exact_match: expected '  ' is blank \(it rewards only an empty reply\)"),
    ("regex_match", "", r"regex_match: expected '' matches the empty string .*allowed: a pattern"),
    ("regex_match", r"\d*", r"regex_match: expected '\\\\d\*' matches the empty string"),
    ("tool_calls_match", [], r"golden_answer: an empty list of calls .*expected at least one"),
])
def test_degenerate_expected_is_refused_at_load_with_file_line_and_field(tmp_path, fn_name, expected, problem):
    folder = _write_tasks(tmp_path / "bench", [_task("first", "q", "contains", "x"),
                                               _task("second", "q", fn_name, expected)])
    with pytest.raises(ValueError, match=rf"tasks\.jsonl:2: field 'verifier\.expected': {problem}"):
        load_task_benchmark(folder)


def test_tasks_file_that_is_not_utf8_names_file_and_line(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    good = json.dumps(_task("a", "q", "contains", "x")).encode()
    bad = json.dumps(_task("b", "Caf\u00e9?", "contains", "x"), ensure_ascii=False).encode("latin-1")
    (folder / "tasks.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"tasks\.jsonl:2: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        load_task_benchmark(folder)


def test_benchmark_from_examples_refuses_a_blank_generic_answer():
    example = SimpleNamespace(id="g", task="generic", answer=" ", messages=_user("q"))
    with pytest.raises(ValueError, match=r"benchmark 'b', example 'g': contains: expected ' ' is blank"):
        benchmark_from_examples("b", [example])


def test_load_task_benchmark_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="no tasks.jsonl"):
        load_task_benchmark(tmp_path)
    (tmp_path / "tasks.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no tasks"):
        load_task_benchmark(tmp_path)


def test_benchmark_validation():
    item = EvalItem("a", _user("q"), lambda text: True, None)
    with pytest.raises(ValueError, match="has no items"):
        Benchmark("b", ())
    with pytest.raises(ValueError, match="run_every"):
        Benchmark("b", (item,), run_every=0)
    with pytest.raises(ValueError, match="'a' appears more than once"):
        Benchmark("b", (item, item))
    with pytest.raises(ValueError, match="no '/'"):
        Benchmark("a/b", (item,))


def test_benchmark_from_examples():
    from sdft.data import PromptExample

    examples = [
        PromptExample(id="t1", messages=_user("weather?"), demonstration=render_tool_calls(NESTED),
                      answer=NESTED, task="tooluse"),
        PromptExample(id="s1", messages=({"role": "system", "content": "Answer in tags."}, *_user("Which?")),
                      demonstration="<answer>\nB\n</answer>", answer="B", task="science"),
        PromptExample(id="g1", messages=_user("Capital of France?"), demonstration="Paris", answer="Paris"),
    ]
    strict = benchmark_from_examples("mixed", examples)
    robust = benchmark_from_examples("mixed", examples, tooluse_mode="robust", mcq_mode="lenient",
                                     generic_verifier="exact_match", split="test")
    assert [item.id for item in strict.items] == ["t1", "s1", "g1"]
    assert strict.items[1].messages == examples[1].messages
    assert [item.reference for item in strict.items] == [NESTED, "B", "Paris"]
    assert robust.split == "test"
    tool_text = render_tool_calls(NESTED)
    assert strict.items[0].verifier(tool_text) is False and robust.items[0].verifier(tool_text) is True
    assert strict.items[1].verifier("The answer is B.") is False
    assert robust.items[1].verifier("The answer is B.") is True
    assert strict.items[2].verifier("It is paris.") is True and robust.items[2].verifier("It is paris.") is False

    with pytest.raises(ValueError, match="benchmark 'b', example 'x': task 'math' is not one of"):
        benchmark_from_examples("b", [SimpleNamespace(id="x", messages=_user("q"), answer="a", task="math")])
    with pytest.raises(ValueError, match="example 'y': .*golden_answer"):
        benchmark_from_examples("b", [PromptExample(id="y", messages=_user("q"), demonstration="d",
                                                    answer=None, task="tooluse")])
    with pytest.raises(ValueError, match="tooluse_mode"):
        benchmark_from_examples("b", examples, tooluse_mode="loose")
    with pytest.raises(ValueError, match="verifier fn_name"):
        benchmark_from_examples("b", examples, generic_verifier="nope")


# -------------------------------------------------------------------------------------- evaluation
def test_evaluate_scores_and_writes_predictions(tmp_path, tiny_tokenizer):
    folder = _write_tasks(tmp_path / "capitals", [
        _task("q0", "Capital of France?", "contains", "Paris"),
        _task("q1", "Capital of Germany?", "contains", "Berlin"),
        _task("q2", "Capital of France, one word?", "exact_match", "Paris"),
    ])
    bench = load_task_benchmark(folder, max_new_tokens=7)
    seen = []
    out = tmp_path / "out" / "predictions" / "capitals.jsonl"
    result = evaluate(bench, _fixed_generate(tiny_tokenizer, "Paris", seen), tiny_tokenizer,
                      predictions_path=out)
    assert isinstance(result, EvalResult)
    assert result.per_item == [True, False, True]
    assert (result.n, result.correct, result.pass_at_1) == (3, 2, pytest.approx(2 / 3))
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(2, 3))
    assert result.metrics() == {"val/capitals/pass@1": pytest.approx(2 / 3),
                                "val/capitals/ci_low": result.ci_low, "val/capitals/ci_high": result.ci_high,
                                "val/capitals/n": 3}
    prompts, max_new = seen[0]
    assert max_new == 7
    assert prompts[0] == render_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "Capital of France?"}])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"id": "q0", "prompt": "Capital of France?", "completion": "Paris", "correct": True, "reference": "Paris"},
        {"id": "q1", "prompt": "Capital of Germany?", "completion": "Paris", "correct": False, "reference": "Berlin"},
        {"id": "q2", "prompt": "Capital of France, one word?", "completion": "Paris", "correct": True,
         "reference": "Paris"},
    ]
    assert [p.name for p in out.parent.iterdir()] == ["capitals.jsonl"]  # no temporary file left behind


def test_evaluate_max_items_and_prompt_truncation(tiny_tokenizer):
    items = tuple(EvalItem(f"i{k}", ({"role": "system", "content": "Be brief."}, *_user("word " * 40)),
                           lambda text: False, None) for k in range(4))
    seen = []
    result = evaluate(Benchmark("long", items, split="test"), _fixed_generate(tiny_tokenizer, "x", seen),
                      tiny_tokenizer, max_prompt_tokens=16, max_items=2)
    assert (result.n, result.correct, result.pass_at_1) == (2, 0, 0.0)
    assert list(result.metrics()) == ["test/long/pass@1", "test/long/ci_low", "test/long/ci_high", "test/long/n"]
    full = render_prompt_ids(tiny_tokenizer, list(items[0].messages))
    assert len(full) > 16 and seen[0][0] == [full[-16:], full[-16:]]
    with pytest.raises(ValueError, match="max_items"):
        evaluate(Benchmark("long", items), _fixed_generate(tiny_tokenizer, "x"), tiny_tokenizer, max_items=0)
    with pytest.raises(ValueError, match="returned 0 completions for 4 prompts"):
        evaluate(Benchmark("long", items), lambda prompts, n: [], tiny_tokenizer)


def test_evaluate_in_chunks_reports_progress_and_keeps_the_order(tiny_model, tiny_tokenizer):
    items = tuple(EvalItem(f"c{k}", _user(f"Question {k}: " + "word " * k), lambda text: True, None)
                  for k in range(7))
    generate = NativeSampler(tiny_model, tiny_tokenizer, batch_size=1).greedy
    calls, done = [], []

    def recording(prompts, n):
        calls.append(len(prompts))
        return generate(prompts, n)
    whole = evaluate(Benchmark("c", items, max_new_tokens=5), generate, tiny_tokenizer)
    chunked = evaluate(Benchmark("c", items, max_new_tokens=5), recording, tiny_tokenizer, chunk_size=3,
                       on_progress=done.append)
    assert calls == [3, 3, 1] and done == [3, 3, 1] and chunked == whole
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate(Benchmark("c", items), generate, tiny_tokenizer, chunk_size=0)
    with pytest.raises(ValueError, match="returned 0 completions for 3 prompts"):
        evaluate(Benchmark("c", items), lambda prompts, n: [], tiny_tokenizer, chunk_size=3)


def test_evaluate_on_tiny_model_with_known_verifiers(tmp_path, tiny_model, tiny_tokenizer):
    items = tuple(EvalItem(f"q{k}", _user(q), verifier, ref) for k, (q, verifier, ref) in enumerate([
        ("What is the capital of France?", lambda text: True, "always"),
        ("Action: getWeather", lambda text: False, "never"),
        ("The answer is", lambda text: isinstance(text, str), "str"),
    ]))
    generate = NativeSampler(tiny_model, tiny_tokenizer, batch_size=2).greedy
    path = tmp_path / "preds.jsonl"
    result = evaluate(Benchmark("tiny", items, max_new_tokens=6), generate, tiny_tokenizer, predictions_path=path)
    assert result.per_item == [True, False, True]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    completions = generate([render_prompt_ids(tiny_tokenizer, list(item.messages)) for item in items], 6)
    assert [row["completion"] for row in rows] == [
        tiny_tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    assert [row["prompt"] for row in rows] == [item.messages[-1]["content"] for item in items]
    assert [row["reference"] for row in rows] == ["always", "never", "str"]


def test_evaluate_real_tooluse_gold_answers_through_the_whole_path(tmp_path, tiny_tokenizer):
    """Real eval rows -> PromptExamples -> benchmark -> evaluate, answering each item with its gold
    calls: 95/97 in strict mode (the official scorer's nested-JSON quirk), 97/97 in robust mode."""
    folder = DATA / "tooluse" / "eval_data"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    from sdft.data import load_tooluse

    examples = load_tooluse(folder)
    answers = [render_tool_calls(example.answer) for example in examples]

    def gold_generate(prompts, max_new_tokens):
        assert len(prompts) == len(answers) and max_new_tokens == 1024
        return [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in answers]

    for mode, expected in (("strict", 95), ("robust", 97)):
        bench = benchmark_from_examples("tooluse", examples, tooluse_mode=mode, max_new_tokens=1024)
        path = tmp_path / f"{mode}.jsonl"
        result = evaluate(bench, gold_generate, tiny_tokenizer, max_prompt_tokens=1024, predictions_path=path)
        assert (result.n, result.correct) == (97, expected)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [row["completion"] for row in rows] == answers
        assert rows[0]["reference"] == examples[0].answer
