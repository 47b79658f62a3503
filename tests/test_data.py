import json
import re
from pathlib import Path

import pytest

from sdft.data import (QUICKSTART_DIR, THINKING_SYSTEM_PROMPT, PromptExample, example_group, load_examples,
                       load_hf_dataset, load_jsonl_examples, load_science, load_tooluse, split_examples)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOOLUSE_EVAL = SHARED_DATA / "tooluse" / "eval_data"
SCIENCE_EVAL = SHARED_DATA / "science" / "eval_data"

SCIENCE_SYSTEM = "Answer with <reasoning> and <answer> blocks."


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def save_rows(folder: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def tooluse_row(name: str, question: str, calls: list[tuple[str, dict]], response: list[str] | None):
    row = {"prompt": f"Tools of {name}.\nQuestion: {question}", "name": name, "description": f"{name} API",
           "nl_documentation": "getThing: gets a thing", "instruction": question,
           "golden_answer": [{"Action": a, "Action_Input": json.dumps(i)} for a, i in calls]}
    if response is not None:
        row["golden_response"] = response
    return row


# ----------------------------------------------------------------------------------------------- JSONL

def test_jsonl_rows_become_examples(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [
        json.dumps({"inputs": {"question": "Capital of France?"}, "expected": "Paris"}),
        "",
        json.dumps({"inputs": {"question": "Capital of Japan?", "style": "short"}, "expected": "Tokyo",
                    "demonstration": "The capital of Japan is Tokyo.", "id": "jp"}),
    ])
    examples = load_jsonl_examples(path)
    assert [e.id for e in examples] == ["train/1", "jp"]
    assert examples[0].messages == ({"role": "user", "content": "Capital of France?"},)
    assert examples[0].demonstration == "Paris" and examples[0].answer == "Paris"
    assert examples[1].demonstration == "The capital of Japan is Tokyo." and examples[1].answer == "Tokyo"
    assert all(e.task == "generic" for e in examples)

    styled = load_jsonl_examples(path, user_template="Q: {question}\nA:", system_prompt="Be brief.")
    assert styled[1].messages == ({"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Q: Capital of Japan?\nA:"})


@pytest.mark.parametrize("line, message", [
    ('{"inputs": {"question": "x"}, "expected": ', "malformed JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"expected": "x"}', "'inputs'"),
    ('{"inputs": {"question": "x"}}', "'expected'"),
    ('{"inputs": {"prompt": "x"}, "expected": "y"}', r"\{question\}.*\['prompt'\]"),
    ('{"inputs": {"question": "x"}, "expected": "y", "task": "chess"}', "task 'chess'"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"inputs": {"question": "fine"}, "expected": "ok"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(ValueError, match=message) as info:
        load_jsonl_examples(path)
    assert f"{path}:3" in str(info.value)


@pytest.mark.parametrize("row, field, problem", [
    ({"inputs": {"question": "x"}, "expected": ""}, "field 'expected'", "is blank"),
    ({"inputs": {"question": "x"}, "expected": "  \n"}, "field 'expected'", "is blank"),
    ({"inputs": {"question": "x"}, "expected": None}, "field 'expected'", "is null .*the text 'null'"),
    ({"inputs": {"question": "x"}, "expected": []}, "field 'expected'", "is an empty list"),
    ({"inputs": {"question": "x"}, "expected": ["eyas", " "]}, r"field 'expected'\[1\]", "is blank"),
    ({"inputs": {"question": "x"}, "expected": "y", "demonstration": ""}, "field 'demonstration'", "is blank"),
    ({"inputs": {"question": "x"}, "expected": "y", "demonstration": None}, "field 'demonstration'", "is null"),
    ({"inputs": {"question": "x"}, "expected": "y", "demonstration": {}}, "field 'demonstration'",
     "is an empty dict"),
    ({"inputs": {"question": ""}, "expected": "y"}, "field 'inputs.question'", "is blank"),
    ({"inputs": {"question": " \t"}, "expected": "y"}, "field 'inputs.question'", "is blank"),
    ({"inputs": {"question": None}, "expected": "y"}, "field 'inputs.question'", "is null"),
])
def test_jsonl_degenerate_rows_are_refused_with_file_line_and_field(tmp_path, row, field, problem):
    good = json.dumps({"inputs": {"question": "fine"}, "expected": "ok"})
    path = write_lines(tmp_path / "bad.jsonl", [good, json.dumps(row)])
    with pytest.raises(ValueError, match=f"{field} {problem}.*allowed: ") as info:
        load_jsonl_examples(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_jsonl_blank_question_is_refused_through_a_template_too(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"inputs": {"question": "", "topic": "math"},
                                                          "expected": "4"})])
    with pytest.raises(ValueError, match=r":1: field 'inputs.question' is blank, so the user turn rendered by "
                                         r"user_template 'Q: \{question\}\\nA:' holds no question"):
        load_jsonl_examples(path, user_template="Q: {question}\nA:")
    # a blank optional field beside a real question is fine
    (example,) = load_jsonl_examples(path, user_template="{question}[{topic}]")
    assert example.messages[-1]["content"] == "[math]"
    with pytest.raises(ValueError, match=":1: field 'inputs.question' is blank"):
        load_jsonl_examples(path, user_template="{question}")


def test_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"inputs": {"question": "fine"}, "expected": "ok"}).encode()
    path.write_bytes(good + b"\n" + '{"inputs": {"question": "caf\u00e9"}, "expected": "x"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9 at column 29\)"):
        load_jsonl_examples(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert load_jsonl_examples(bom)[0].answer == "ok"


def test_prompt_example_refuses_blank_turn_and_demonstration():
    with pytest.raises(ValueError, match="example 'x': demonstration is blank"):
        PromptExample(id="x", messages=({"role": "user", "content": "q"},), demonstration=" ")
    with pytest.raises(ValueError, match="example 'x': the user turn is blank"):
        PromptExample(id="x", messages=({"role": "user", "content": ""},), demonstration="d")
    with pytest.raises(ValueError, match="example 'x': demonstration must be text, got int"):
        PromptExample(id="x", messages=({"role": "user", "content": "q"},), demonstration=3)


def test_jsonl_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_jsonl_examples(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl_examples(tmp_path / "nope.jsonl")


# -------------------------------------------------------------------------------------------- tool use

def test_tooluse_train_schema_joins_golden_response(tmp_path):
    folder = save_rows(tmp_path / "train", [
        tooluse_row("Weather", "Weather in Paris?", [("getWeather", {"city": "Paris"})],
                    ["Thought: I need the weather.", "Action: getWeather", 'Action Input: {"city": "Paris"}']),
        tooluse_row("Books", "Find two books.", [("search", {"q": "a"}), ("search", {"q": "b"})],
                    ["Action: search", 'Action Input: {"q": "a"}', "Action: search", 'Action Input: {"q": "b"}']),
    ])
    examples = load_tooluse(folder)
    assert [e.id for e in examples] == ["Weather/0", "Books/1"]
    first = examples[0]
    assert first.task == "tooluse"
    assert first.messages == ({"role": "user", "content": "Tools of Weather.\nQuestion: Weather in Paris?"},)
    assert first.demonstration == 'Thought: I need the weather.\nAction: getWeather\nAction Input: {"city": "Paris"}'
    assert first.answer == [{"Action": "getWeather", "Action_Input": '{"city": "Paris"}'}]
    assert len(examples[1].answer) == 2


def test_tooluse_eval_schema_builds_demonstration_from_golden_answer(tmp_path):
    folder = save_rows(tmp_path / "eval", [
        tooluse_row("Books", "Find two books.", [("search", {"q": "a"}), ("getBook", {})], None)])
    (example,) = load_tooluse(folder)
    assert example.demonstration == 'Action: search\nAction Input: {"q": "a"}\nAction: getBook\nAction Input: {}'
    assert example.answer == [{"Action": "search", "Action_Input": '{"q": "a"}'},
                              {"Action": "getBook", "Action_Input": "{}"}]


def test_tooluse_missing_column_and_folder(tmp_path):
    folder = save_rows(tmp_path / "bad", [{"prompt": "p", "name": "n"}])
    with pytest.raises(ValueError, match="golden_answer"):
        load_tooluse(folder)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        load_tooluse(tmp_path / "missing_folder")


# --------------------------------------------------------------------------------------------- science

def science_train_rows():
    return [{"messages": [{"role": "system", "content": SCIENCE_SYSTEM},
                          {"role": "user", "content": f"Question {i}?\nA: a\nB: b\nC: c\nD: d"}],
             "output_text": f"<reasoning>\nStep {i}.\n</reasoning>\n<answer>\n{letter}\n</answer>"}
            for i, letter in enumerate("BD")]


def test_science_train_schema(tmp_path):
    examples = load_science(save_rows(tmp_path / "train", science_train_rows()))
    first = examples[0]
    assert first.id == "science/0" and first.task == "science"
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.messages[0]["content"] == SCIENCE_SYSTEM
    assert first.demonstration == "<reasoning>\nStep 0.\n</reasoning>\n<answer>\nB\n</answer>"
    assert first.answer == "B" and examples[1].answer == "D"
    assert first.target == first.demonstration


def test_science_train_schema_thinking_format(tmp_path):
    examples = load_science(save_rows(tmp_path / "train", science_train_rows()), thinking_format=True)
    first = examples[0]
    assert first.demonstration == "Step 0.\n\nThe answer is B."
    assert first.sft_target == "<think>\nStep 0.\n</think>\n\nThe answer is B."
    assert first.target == first.sft_target
    assert first.messages[0] == {"role": "system", "content": THINKING_SYSTEM_PROMPT}
    assert first.messages[1]["content"].startswith("Question 0?")


def test_science_eval_schema(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": SCIENCE_SYSTEM},
                        {"role": "user", "content": "Which? A: 1 B: 2 C: 3 D: 4"}], "answer": "C"}]
    (example,) = load_science(save_rows(tmp_path / "eval", rows))
    assert example.demonstration == "<answer>\nC\n</answer>" and example.answer == "C"
    assert example.messages[0]["content"] == SCIENCE_SYSTEM
    (thinking,) = load_science(tmp_path / "eval", thinking_format=True)
    assert thinking.demonstration == "The answer is C." and thinking.sft_target is None


def test_science_bad_rows(tmp_path):
    bad_letter = [{"prompt": [{"role": "user", "content": "q"}], "answer": "E"}]
    with pytest.raises(ValueError, match="row 0.*'E'"):
        load_science(save_rows(tmp_path / "letter", bad_letter))
    with pytest.raises(ValueError, match="not a science folder"):
        load_science(save_rows(tmp_path / "other", [{"text": "x"}]))
    unparsable = [{"messages": [{"role": "user", "content": "q"}], "output_text": "just B"}]
    folder = save_rows(tmp_path / "unparsable", unparsable)
    assert load_science(folder)[0].answer is None
    with pytest.raises(ValueError, match="thinking_format"):
        load_science(folder, thinking_format=True)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(golden_answer=[]), r"row 1: column 'golden_answer': golden_answer: an empty list of "
                                           r"calls would score every completion without a tool call as correct"),
    (lambda r: r.update(golden_answer=[{"Action": " ", "Action_Input": "{}"}]),
     r"row 1: column 'golden_answer': golden_answer\[0\].*non-empty string 'Action'"),
    (lambda r: r.update(golden_response=[]), r"row 1: column 'golden_response' \(the demonstration\) is blank"),
    (lambda r: r.update(golden_response=["", "  "]), r"row 1: column 'golden_response' \(the demonstration\)"),
    (lambda r: r.update(prompt="  "), r"row 1: column 'prompt' \(the question\) is blank"),
])
def test_tooluse_degenerate_rows_name_row_and_column(tmp_path, change, message):
    rows = [tooluse_row("Weather", f"q{i}", [("getWeather", {"city": "Paris"})], ["Action: getWeather"])
            for i in range(2)]
    change(rows[1])
    folder = save_rows(tmp_path / "tool", rows)
    with pytest.raises(ValueError, match=message) as info:
        load_tooluse(folder)
    assert str(info.value).startswith(f"{folder} row 1: ")


def test_science_degenerate_rows_name_row_and_column(tmp_path):
    rows = science_train_rows()
    rows[1]["output_text"] = " "
    folder = save_rows(tmp_path / "train", rows)
    with pytest.raises(ValueError, match=r"row 1: column 'output_text' \(the demonstration\) is blank") as info:
        load_science(folder)
    assert str(info.value).startswith(f"{folder} row 1: ")
    rows = science_train_rows()
    rows[0]["messages"][1]["content"] = ""
    folder = save_rows(tmp_path / "train2", rows)
    with pytest.raises(ValueError, match=r"row 0 'messages': the user turn's content \(the question\) is blank"):
        load_science(folder)
    evals = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "\n"}], "answer": "A"}]
    folder = save_rows(tmp_path / "eval", evals)
    with pytest.raises(ValueError, match=r"row 0 'prompt': the user turn's content \(the question\) is blank") as info:
        load_science(folder)
    assert str(info.value).startswith(f"{folder} row 0 'prompt'")


@pytest.mark.parametrize("row, message", [
    ({"q": "", "a": "4"}, r"row 1: column 'q' is blank, so the user turn"),
    ({"q": None, "a": "4"}, r"row 1: column 'q' is null"),
    ({"q": "2+2?", "a": ""}, r"row 1: column 'a' \(the answer\) is blank"),
    ({"q": "2+2?", "a": None}, r"row 1: column 'a' \(the answer\) is null"),
])
def test_hf_degenerate_rows_name_row_and_column(tmp_path, row, message):
    folder = save_rows(tmp_path / "rows", [{"q": "1+1?", "a": "2"}, row])
    with pytest.raises(ValueError, match=message) as info:
        load_hf_dataset(str(folder), None, "q", "a")
    assert str(info.value).startswith(f"{folder} row 1: ")


# ------------------------------------------------------------------------------------------ HF datasets

def test_hf_dataset_folder_with_splits(tmp_path):
    import datasets

    rows = {"train": [{"q": "2+2?", "a": "4", "topic": "math"}], "test": [{"q": "3+3?", "a": "6", "topic": "math"}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(
        str(tmp_path / "dd"))
    (example,) = load_hf_dataset(str(tmp_path / "dd"), "test", "q", "a", user_template="[{topic}] {question}")
    assert example.messages == ({"role": "user", "content": "[math] 3+3?"},)
    assert example.answer == "6" and example.demonstration == "6" and example.id == "test/0"
    with pytest.raises(ValueError, match="split 'validation'.*'test', 'train'"):
        load_hf_dataset(str(tmp_path / "dd"), "validation", "q", "a")
    with pytest.raises(ValueError, match="'answer'"):
        load_hf_dataset(str(tmp_path / "dd"), "train", "q", "answer")


def test_hf_single_dataset_folder_ignores_split(tmp_path):
    folder = save_rows(tmp_path / "single", [{"question": "Capital of Italy?", "answer": "Rome"},
                                            {"question": "Capital of Spain?", "answer": "Madrid"}])
    examples = load_examples("hf", folder, split="train", question_field="question", answer_field="answer",
                             system_prompt="Be brief.")
    assert [e.answer for e in examples] == ["Rome", "Madrid"]
    assert examples[1].messages == ({"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Capital of Spain?"})


def test_hf_dataset_not_cached_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="network access"):
        load_hf_dataset("sdft-tests/certainly-not-cached-dataset", "train", "q", "a")


# --------------------------------------------------------------------------------------------- splits

def grouped_examples():
    return [PromptExample(id=f"{api}/{i}", messages=({"role": "user", "content": f"{api} {i}"},),
                          demonstration="d", task="tooluse")
            for i, api in enumerate(["A", "B", "C", "D", "E"] * 4)]


def test_random_split_is_deterministic_and_partitions():
    examples = grouped_examples()
    train, test = split_examples(examples, by="random", test_fraction=0.25, seed=3)
    assert len(test) == 5 and len(train) == 15
    assert sorted(e.id for e in train + test) == sorted(e.id for e in examples)
    assert [e.id for e in train] == [e.id for e in examples if e in train]  # input order kept
    again = split_examples(examples, by="random", test_fraction=0.25, seed=3)
    assert (train, test) == again
    other = split_examples(examples, by="random", test_fraction=0.25, seed=4)
    assert [e.id for e in other[1]] != [e.id for e in test]


def test_api_split_keeps_test_apis_out_of_training():
    examples = grouped_examples()
    train, test = split_examples(examples, by="api", test_fraction=0.4, seed=0)
    train_apis = {example_group(e) for e in train}
    test_apis = {example_group(e) for e in test}
    assert len(test_apis) == 2 and not train_apis & test_apis
    assert len(train) + len(test) == len(examples)
    assert split_examples(examples, by="api", test_fraction=0.4, seed=0) == (train, test)


@pytest.mark.parametrize("kwargs, message", [
    ({"by": "name"}, "by='name'"),
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.5}, "test_fraction"),
])
def test_split_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_examples(grouped_examples(), **kwargs)


def test_api_split_needs_grouped_ids():
    flat = [PromptExample(id=str(i), messages=({"role": "user", "content": "q"},), demonstration="d")
            for i in range(4)]
    with pytest.raises(ValueError, match="'0'"):
        split_examples(flat, by="api", test_fraction=0.5)


# ------------------------------------------------------------------------------------------- dispatch

def test_load_examples_dispatch_and_errors(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"inputs": {"question": "q"}, "expected": "a"})])
    assert load_examples("jsonl", path, system_prompt="S")[0].messages[0]["content"] == "S"
    with pytest.raises(ValueError, match=r"'csv'.*\['hf', 'jsonl', 'messages', 'privileged_context', "
                                         r"'prompt_completion', 'science', 'tooluse'\]"):
        load_examples("csv", path)
    with pytest.raises(ValueError, match="unknown option.*'thinking_format'"):
        load_examples("jsonl", path, thinking_format=True)
    with pytest.raises(ValueError, match="missing required option.*'question_field'"):
        load_examples("hf", path, split="train", answer_field="a")


def test_prompt_example_validation():
    with pytest.raises(ValueError, match="task 'math'"):
        PromptExample(id="x", messages=({"role": "user", "content": "q"},), demonstration="d", task="math")
    with pytest.raises(ValueError, match="user turn"):
        PromptExample(id="x", messages=({"role": "system", "content": "s"},), demonstration="d")


# ------------------------------------------------------------------------------------ shipped and real

def test_quickstart_files_load():
    train = load_examples("jsonl", QUICKSTART_DIR / "train.jsonl")
    heldout = load_examples("jsonl", QUICKSTART_DIR / "heldout.jsonl")
    assert 60 <= len(train) <= 150 and 30 <= len(heldout) <= 60
    assert not {e.messages[-1]["content"] for e in train} & {e.messages[-1]["content"] for e in heldout}
    for benchmark, low, high in (("heldout", 30, 60), ("retention", 30, 50)):
        rows = [json.loads(line) for line in (QUICKSTART_DIR / benchmark / "tasks.jsonl").read_text().splitlines()]
        assert low <= len(rows) <= high
        for row in rows:
            assert set(row) == {"task_id", "instruction", "verifier"}
            assert row["verifier"]["kind"] == "in_process"
            assert row["verifier"]["fn_name"] in ("contains", "exact_match", "regex_match")
        assert len({row["task_id"] for row in rows}) == len(rows)


def test_quickstart_files_are_what_the_generator_writes(tmp_path):
    from sdft.datasets.quickstart import make_quickstart

    make_quickstart.write(tmp_path)
    for name in make_quickstart.build():
        assert (tmp_path / name).read_text() == (QUICKSTART_DIR / name).read_text(), name
    train = load_jsonl_examples(tmp_path / "train.jsonl")
    heldout = load_jsonl_examples(tmp_path / "heldout.jsonl")
    animal = lambda e: e.id.split("/")[1]  # noqa: E731
    assert not {animal(e) for e in train} & {animal(e) for e in heldout}
    for example in train + heldout:
        assert example.demonstration.split(" is called ")[1].rstrip(".").split()[-1] == example.answer[0]


@pytest.mark.skipif(not TOOLUSE_EVAL.is_dir(), reason=f"shared data folder {TOOLUSE_EVAL} is absent")
def test_real_tooluse_eval_folder_loads():
    examples = load_tooluse(TOOLUSE_EVAL)
    assert len(examples) == 97
    assert len({example_group(e) for e in examples}) == 10
    first = examples[0]
    assert first.messages[0]["content"].rstrip().endswith(
        "Question: Hey, can you show me a random picture of an axolotl?")
    assert first.demonstration == "Action: getRandomAxolotlImage\nAction Input: {}"
    train, test = split_examples(examples, by="api", test_fraction=0.3, seed=0)
    assert not {example_group(e) for e in train} & {example_group(e) for e in test}


@pytest.mark.skipif(not SCIENCE_EVAL.is_dir(), reason=f"shared data folder {SCIENCE_EVAL} is absent")
def test_real_science_eval_folder_loads():
    examples = load_science(SCIENCE_EVAL)
    assert len(examples) == 507
    assert {e.answer for e in examples} == {"A", "B", "C", "D"}
    assert all([m["role"] for m in e.messages] == ["system", "user"] for e in examples)
    assert examples[0].demonstration == f"<answer>\n{examples[0].answer}\n</answer>"


@pytest.mark.parametrize("module", ["make_toolcalls", "make_laptop"])
def test_laptop_skill_files_are_what_their_generators_write(tmp_path, module):
    """The shipped data of the laptop presets is what its generator writes; held-out and training rows share
    no request."""
    import importlib

    generator = importlib.import_module(f"sdft.datasets.laptop.{module}")
    generator.write(tmp_path)
    shipped = Path(generator.__file__).parent / ("toolcalls" if module == "make_toolcalls" else "")
    for name in generator.build():
        assert (tmp_path / name).read_text() == (shipped / name).read_text(), name
    train_name = next(name for name in generator.build() if name.endswith("train.jsonl"))
    heldout_name = train_name.replace("train.jsonl", "heldout.jsonl")
    train = {e.messages[-1]["content"] for e in load_jsonl_examples(tmp_path / train_name)}
    heldout = {e.messages[-1]["content"] for e in load_jsonl_examples(tmp_path / heldout_name)}
    assert train and heldout and not train & heldout


def test_fewshot_prompts_put_each_shot_as_an_earlier_exchange():
    from sdft.datasets.measure import fewshot_messages

    train = load_jsonl_examples(QUICKSTART_DIR / "train.jsonl")
    heldout = load_jsonl_examples(QUICKSTART_DIR / "heldout.jsonl")
    messages = fewshot_messages(heldout[0], train[:2])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == train[0].demonstration and messages[3]["content"] == train[1].demonstration
    assert messages[-1] == dict(heldout[0].messages[-1])


def test_measure_skill_scores_every_prompt_variant_on_the_held_out_rows(tiny_model_dir, tmp_path):
    """Student, teacher (each template) and few-shot prompts, and the retention set; every completion saved."""
    from sdft.datasets.measure import measure_skill

    results = measure_skill(QUICKSTART_DIR / "train.jsonl", QUICKSTART_DIR / "heldout.jsonl",
                            retention=QUICKSTART_DIR / "retention", model_name=tiny_model_dir, max_new_tokens=3,
                            max_items=5, shots=(2,), predictions_dir=tmp_path)
    assert list(results) == ["student", "teacher[official]", "teacher[turns]", "fewshot2", "retention"]
    assert [r.n for r in results.values()] == [5, 5, 5, 5, 38]
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["fewshot2.jsonl", "retention.jsonl", "student.jsonl", "teacher_official.jsonl",
                     "teacher_turns.jsonl"]
