"""What a run reports about its inputs: prompts cut by data.max_prompt_tokens are counted once per run (one
warning, a summary.md note) and by --validate over every training example."""
import json
import warnings
from pathlib import Path

from sdft.batches import encode_examples, truncation_report
from sdft.config import load_config
from sdft.data import load_jsonl_examples
from sdft.runner import train_from_config, validate_run

MAX_PROMPT_TOKENS = 48


def _config(tmp_path: Path, model_dir: str):
    long_demo = " ".join(f"Step {i}: add the numbers." for i in range(30))
    rows = [{"inputs": {"question": f"What is {a} plus {b}?"}, "expected": f"{a + b}",
             "demonstration": long_demo if a % 2 else f"{a} plus {b} is {a + b}."}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1), (4, 4), (8, 1)]]
    rows.append({"inputs": {"question": "Add up every number: " + " ".join(map(str, range(60)))},
                 "expected": "1770"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "tasks.jsonl").write_text(json.dumps({"task_id": "t0", "instruction": "What is 1 plus 1?", "verifier": {
        "kind": "in_process", "fn_name": "contains", "expected": "2"}}) + "\n")
    return load_config(None, [
        f"model.name={model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}", "run_name=cut",
        f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}", "optim.batch_size=2", "optim.micro_batch_size=2",
        "optim.max_steps=1", "generation.max_new_tokens=4", "generation.batch_size=2",
        "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 2}]",
        "eval.before_training=false", "logging.tensorboard=false", "logging.progress=false", "logging.plot=false",
        "teacher.mode=static", "student.lora_rank=4", "objective.skip_first_n_tokens=1"])


def _expected_note(config, tokenizer):
    examples = load_jsonl_examples(config.data.path)
    encoded = encode_examples(tokenizer, examples, template=config.teacher.template,
                              max_prompt_tokens=MAX_PROMPT_TOKENS)
    return truncation_report(encoded, MAX_PROMPT_TOKENS)


def test_truncation_is_warned_once_and_noted_in_the_summary(tmp_path, tiny_model_dir, tiny_tokenizer):
    config = _config(tmp_path, tiny_model_dir)
    report = _expected_note(config, tiny_tokenizer)
    assert report.examples == 9 and report.student == 1 and report.teacher_demonstration == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_from_config(config)
    cut_warnings = [str(w.message) for w in caught if "prompt truncation" in str(w.message)]
    assert cut_warnings == [report.note]
    assert f"- {report.note}" in (result.run_dir / "summary.md").read_text()


def test_validate_encodes_every_training_example_and_prints_the_counts(tmp_path, tiny_model_dir, tiny_tokenizer):
    config = _config(tmp_path, tiny_model_dir)
    lines = validate_run(config)
    report = _expected_note(config, tiny_tokenizer)
    assert f"prompts: {report.describe()}" in lines
    assert "1 of 9 student prompts cut from the left" in report.describe()   # the 9th row: only all rows show it
