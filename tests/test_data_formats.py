"""The chat formats TRL users have (`messages`; `prompt`/`completion`; TRL SDFT's `prompt`/`privileged_context`)
from .jsonl, .json, .parquet, save_to_disk folders and hub ids (a hub cache built here; the hub itself is never
reached), each through `sdft validate` and a training step; data.system_prompt for every kind;
data.chat_template_kwargs in student, teacher and evaluation prompts; wrong types named by row and column."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdft.batches import encode_examples
from sdft.build import load_run_data
from sdft.cli import main
from sdft.config import load_config
from sdft.data import load_hf_dataset, load_messages, load_privileged_context, load_prompt_completion, read_rows
from sdft.evaluation import benchmark_from_examples, evaluate
from sdft.logs import read_metrics
from sdft.runner import train_from_config
from tests.test_data import save_rows, tooluse_row, write_lines
from tests.tiny import build_tiny_tokenizer, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You name animals' young."}
QUESTIONS = [("What is a baby deer called?", "A baby deer is called a fawn."),
             ("What is a baby cat called?", "A baby cat is called a kitten."),
             ("What is a baby dog called?", "A baby dog is called a puppy."),
             ("What is a baby cow called?", "A baby cow is called a calf.")]
ROWS = {
    "messages": [{"messages": [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                 for q, a in QUESTIONS],
    "prompt_completion": [{"prompt": [SYSTEM, {"role": "user", "content": q}],
                           "completion": [{"role": "assistant", "content": a}]} for q, a in QUESTIONS],
    "privileged_context": [{"prompt": [SYSTEM, {"role": "user", "content": q}], "privileged_context": a}
                           for q, a in QUESTIONS],
}
LOADERS = {"messages": load_messages, "prompt_completion": load_prompt_completion,
           "privileged_context": load_privileged_context}


def _write(folder: Path, rows: list[dict], source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if source == "jsonl":
        return write_lines(folder / "rows.jsonl", [json.dumps(r) for r in rows])
    if source == "json":
        path = folder / "rows.json"
        path.write_text(json.dumps(rows))
        return path
    if source == "parquet":
        import pyarrow
        import pyarrow.parquet

        path = folder / "rows.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        return path
    return save_rows(folder / "disk", rows)


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("source", ["jsonl", "json", "parquet", "disk"])
def test_each_format_from_each_local_source(tmp_path, kind, source):
    examples = LOADERS[kind](_write(tmp_path, ROWS[kind], source))
    assert [e.messages for e in examples] == [(SYSTEM, {"role": "user", "content": q}) for q, _ in QUESTIONS]
    assert [e.demonstration for e in examples] == [a for _, a in QUESTIONS]
    assert [e.answer for e in examples] == [a for _, a in QUESTIONS] and {e.task for e in examples} == {"generic"}
    assert len({e.id for e in examples}) == len(QUESTIONS)


def test_string_prompts_message_contexts_and_an_answer_column(tmp_path):
    rows = [{"prompt": "Name the baby of a deer.", "completion": " A fawn.", "answer": ["fawn"]},
            {"prompt": "Name the baby of a cat.", "completion": "A kitten.", "answer": None}]
    first, second = load_prompt_completion(_write(tmp_path / "pc", rows, "jsonl"))
    assert first.messages == ({"role": "user", "content": "Name the baby of a deer."},)
    assert first.demonstration == " A fawn." and first.answer == ["fawn"]
    assert second.answer == "A kitten."  # no reference column value: the demonstration is the reference
    rows = [{"prompt": "Name the baby of a deer.",
             "privileged_context": [{"role": "user", "content": "Example:"}, {"role": "assistant", "content": "A fawn."}]}]
    (example,) = load_privileged_context(_write(tmp_path / "pv", rows, "jsonl"))
    assert example.demonstration == "Example:\nA fawn."  # message contents joined by newlines (TRL's rule)


@pytest.mark.parametrize("kind, row, message", [
    ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                               {"role": "assistant", "content": "yo"}]},
     r"rows.jsonl:2: column 'messages'\[0\]: 'content' must be text, got list"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}]},
     r"rows.jsonl:2: column 'messages'\[1\]: the last message must be the assistant's answer"),
    ("messages", {"messages": "hi"}, r"rows.jsonl:2: column 'messages' must be a list of chat messages"),
    ("prompt_completion", {"prompt": 7, "completion": "a"}, r"rows.jsonl:2: column 'prompt' must be text or a "
                                                            r"non-empty list of chat messages, got int 7"),
    ("prompt_completion", {"prompt": "q", "completion": [{"role": "user", "content": "a"}]},
     r"rows.jsonl:2: column 'completion'\[0\]: the completion must be an assistant message, got role 'user'"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                           "completion": "a"}, r"rows.jsonl:2: column 'prompt': the last message must be the user"),
    ("privileged_context", {"prompt": "q", "privileged_context": None},
     r"rows.jsonl:2: column 'privileged_context' must be text or a non-empty list of chat messages, got null"),
    ("privileged_context", {"prompt": "q", "privileged_context": " "}, r"rows.jsonl:2: column 'privileged_context' "
                                                                       r"is blank"),
])
def test_wrong_types_are_errors_naming_row_and_column(tmp_path, kind, row, message):
    path = _write(tmp_path, [ROWS[kind][0], row], "jsonl")
    with pytest.raises(ValueError, match=message):
        LOADERS[kind](path)


def test_a_chat_prompt_in_question_answer_rows_is_an_error_not_its_repr(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "What is a baby deer called?"}], "answer": "fawn"}]
    folder = _write(tmp_path, rows, "disk")
    with pytest.raises(ValueError, match=r"row 0: column 'prompt' is a list \(a conversation\?\), not text: "
                                         r"user_template '\{question\}' formats text fields only; .*"
                                         r"data.kind=prompt_completion"):
        load_hf_dataset(str(folder), "train", "prompt", "answer")


def test_missing_columns_name_the_kind_that_fits(tmp_path):
    path = _write(tmp_path, ROWS["messages"], "jsonl")
    with pytest.raises(ValueError, match=r"data.kind=prompt_completion needs the column\(s\) prompt, completion; "
                                         r"missing prompt, completion \(columns present: messages\); these columns "
                                         r"fit data.kind=messages"):
        load_prompt_completion(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match=r"data.hf_config='x' applies to hub datasets and data folders"):
        read_rows(path, config="x")


def test_system_prompt_for_every_kind(tmp_path):
    """data.system_prompt is the one system turn of every kind's prompts, student and teacher."""
    from sdft.prompts import teacher_messages

    sources = {
        "messages": _write(tmp_path / "m", ROWS["messages"], "jsonl"),
        "prompt_completion": _write(tmp_path / "p", ROWS["prompt_completion"], "parquet"),
        "privileged_context": _write(tmp_path / "c", ROWS["privileged_context"], "disk"),
        "jsonl": write_lines(tmp_path / "e.jsonl", [json.dumps({"inputs": {"question": "q"}, "expected": "a"})]),
        "hf": _write(tmp_path / "h", [{"question": "q", "answer": "a"}], "json"),
        "tooluse": save_rows(tmp_path / "t", [tooluse_row("Weather", "Rain?", [("getRain", {"city": "Oslo"})],
                                                          ["Action: getRain"])]),
        "science": save_rows(tmp_path / "s", [{"prompt": [{"role": "system", "content": "MCQ"},
                                                          {"role": "user", "content": "A or B?"}], "answer": "A"}]),
    }
    for kind, path in sources.items():
        config = load_config(None, [f"data.kind={kind}", f"data.path={path}", "data.system_prompt=Be brief."])
        for example in load_run_data(config).train:
            assert example.messages[0] == {"role": "system", "content": "Be brief."}, kind
            assert [m["role"] for m in example.messages].count("system") == 1, kind
            assert teacher_messages(example)[0] == {"role": "system", "content": "Be brief."}, kind


# --------------------------------------------------------------------------------- chat_template_kwargs

def _flag_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = ("{% if flag is defined %}<|im_start|>system\nflag {{ flag }}<|im_end|>\n{% endif %}"
                               + tokenizer.chat_template)
    return tokenizer


def test_chat_template_kwargs_reach_student_teacher_and_evaluation_prompts():
    tokenizer = _flag_tokenizer()
    examples = load_messages_rows(ROWS["messages"][:2])
    plain = encode_examples(tokenizer, examples, max_prompt_tokens=None)
    flagged = encode_examples(tokenizer, examples, max_prompt_tokens=None, chat_template_kwargs={"flag": "on"})
    for before, after in zip(plain, flagged):
        for field in ("student_ids", "teacher_ids"):
            text = tokenizer.decode(list(getattr(after, field)))
            assert text.startswith("<|im_start|>system\nflag on<|im_end|>\n")
            assert "flag on" not in tokenizer.decode(list(getattr(before, field)))
    seen = []

    def generate(prompts, max_new_tokens):
        seen.extend(prompts)
        return [[] for _ in prompts]

    benchmark = benchmark_from_examples("b", examples, max_new_tokens=2)
    evaluate(benchmark, generate, tokenizer, chat_template_kwargs={"flag": "on"})
    assert all(tokenizer.decode(p).startswith("<|im_start|>system\nflag on") for p in seen) and len(seen) == 2


def load_messages_rows(rows):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return load_messages(_write(Path(folder), rows, "jsonl"))


def test_chat_template_kwargs_through_sdft_validate(tmp_path, capsys):
    """A template variable that adds a long system turn makes every prompt exceed data.max_prompt_tokens."""
    model_dir = save_tiny_model(tmp_path / "model")
    (model_dir / "chat_template.jinja").write_text(
        "{% if long is defined and long %}<|im_start|>system\n" + "The answer is A. " * 40 + "<|im_end|>\n{% endif %}"
        + build_tiny_tokenizer().chat_template)
    data = _write(tmp_path / "data", ROWS["messages"], "jsonl")
    args = ["--config", "quickstart", f"model.name={model_dir}", "data.kind=messages", f"data.path={data}",
            "data.max_prompt_tokens=160", "eval.benchmarks=[]", "logging.report_to=[]", "logging.plot=false"]
    assert main(["validate", *args]) == 0
    assert "none of 4 student or teacher prompts cut" in capsys.readouterr().out
    assert main(["validate", *args, "data.chat_template_kwargs={long: true}"]) == 0
    assert "4 of 4 student prompts cut from the left; 4 of 4 teacher prompts cut" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- validate + one step

def _step_args(tmp_path, model_dir, kind, path, *extra):
    return ["--config", "quickstart", f"model.name={model_dir}", f"data.kind={kind}", f"data.path={path}",
            f"output_dir={tmp_path / 'runs'}", f"run_name={kind}", "optim.batch_size=2", "optim.micro_batch_size=2",
            "optim.max_steps=1", "generation.max_new_tokens=6", "student.lora_rank=4", "teacher.mode=static",
            "eval.before_training=false", "eval.benchmarks=[{name: heldout, kind: heldout, max_new_tokens: 4}]",
            "data.split=random", "data.test_fraction=0.25", "logging.report_to=[]", "logging.plot=false",
            "logging.progress=false", "objective.skip_first_n_tokens=1", *extra]


@pytest.mark.parametrize("kind, source", [("messages", "jsonl"), ("prompt_completion", "parquet"),
                                          ("privileged_context", "disk")])
def test_each_format_validates_and_trains_a_step(tmp_path, tiny_model_dir, capsys, kind, source):
    path = _write(tmp_path / "data", ROWS[kind], source)
    args = _step_args(tmp_path, tiny_model_dir, kind, path)
    assert main(["validate", *args]) == 0
    out = capsys.readouterr().out
    assert f"data: ok (data: 4 examples of kind '{kind}' from {path})" in out
    assert "benchmark heldout: ok (1 items)" in out
    assert main(["train", *args]) == 0
    rows = read_metrics(tmp_path / "runs" / kind / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1]
    assert rows[-1]["metrics"]["val/heldout/n"] == 1


def _hub_cache(home: Path) -> None:
    """The hub cache layout of a dataset repository acme/young-animals with two configs (as `hf download` leaves it)."""
    repo = home / "hub" / "datasets--acme--young-animals"
    snapshot = repo / "snapshots" / ("0" * 40)
    for config, rows in (("chat", ROWS["messages"]), ("sdft", ROWS["privileged_context"])):
        (snapshot / config).mkdir(parents=True)
        for split, part in (("train", rows[:3]), ("test", rows[3:])):
            write_lines(snapshot / config / f"{split}.jsonl", [json.dumps(r) for r in part])
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: chat\n  data_files:\n  - {split: train, path: chat/train.jsonl}\n"
        "  - {split: test, path: chat/test.jsonl}\n"
        "- config_name: sdft\n  data_files:\n  - {split: train, path: sdft/train.jsonl}\n"
        "  - {split: test, path: sdft/test.jsonl}\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_dataset_by_name_config_and_split_offline(tmp_path, tiny_model_dir):
    home = tmp_path / "hf_home"
    _hub_cache(home)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "sdft"]
    args = _step_args(tmp_path, tiny_model_dir, "privileged_context", "acme/young-animals", "data.hf_config=sdft",
                      "data.split=none", "eval.benchmarks=[]")
    done = subprocess.run([*base, "validate", *args, "data.kind=messages", "data.hf_config=chat", "data.hf_split=test"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: ok (data: 1 examples of kind 'messages' from acme/young-animals)" in done.stdout
    trained = subprocess.run([*base, "train", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "data: 3 examples of kind 'privileged_context' from acme/young-animals" in \
        (tmp_path / "runs" / "privileged_context" / "summary.md").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "privileged_context" / "metrics.jsonl")] == [1]
    wrong = subprocess.run([*base, "validate", *args, "data.hf_config=nope"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
    assert wrong.returncode == 2 and "dataset 'acme/young-animals' (from the hub cache " in wrong.stderr
    assert "(config 'nope', split 'train'): BuilderConfig 'nope' not found. Available: ['chat', 'sdft']" in wrong.stderr
    missing = subprocess.run([*base, "validate", *args, "data.path=acme/not-cached"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=600)
    assert missing.returncode == 2 and "is not in the local Hugging Face cache" in missing.stderr
