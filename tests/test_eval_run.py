"""Evaluation outside training (sdft.eval_run, scripts/evaluate.py): a run's student evaluated again gives
the run's own completions, the base model gives the run's completions before training."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdft.config import dump_config
from sdft.eval_run import evaluate_model, load_run_student
from sdft.runner import train_from_config
from tests.test_loop import _config

REPO = Path(__file__).resolve().parents[1]


def _completions(path: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("overrides", [
    ("student.mode=lora", "teacher.mode=ema"),
    ("student.mode=full", "teacher.mode=static", "objective.targets=topk", "objective.topk.k=5"),
])
def test_run_student_and_base_model_reproduce_the_runs_own_evaluations(tmp_path, tiny_model_dir, overrides):
    config = _config(tmp_path, tiny_model_dir, "optim.lr=5e-2", "eval.benchmarks=[{name: bench, kind: tasks, path: "
                     + str(tmp_path / "bench") + ", max_new_tokens: 12}]", *overrides)
    run = train_from_config(config).run_dir
    report = evaluate_model(None, run_dir=run)
    out = run / "eval" / "step_00000002"
    assert report["checkpoint"] == "step_00000002" and report["out_dir"] == str(out)
    assert _completions(out / "predictions" / "bench.jsonl") == _completions(run / "predictions" / "bench.jsonl")
    base = evaluate_model(config, out_dir=tmp_path / "base")
    before = _completions(tmp_path / "base" / "predictions" / "bench.jsonl")
    assert before == _completions(run / "predictions" / "bench.before.jsonl")
    assert before != _completions(out / "predictions" / "bench.jsonl")  # training changed the student
    saved = json.loads((out / "results.json").read_text())
    assert saved == report and saved["benchmarks"]["bench"]["n"] == 3
    assert len(saved["benchmarks"]["bench"]["per_item"]) == 3 and base["run"] is None
    assert "| bench | 3 | 12 |" in (out / "results.md").read_text()


def test_checkpoint_choice_overrides_and_errors(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "checkpoint.every=1", "checkpoint.keep_last=5")
    run = train_from_config(config).run_dir
    first = load_run_student(run, checkpoint="step_00000001")
    assert first.checkpoint.name == "step_00000001"
    report = evaluate_model(None, run_dir=run, checkpoint=run / "checkpoints" / "step_00000001",
                            overrides=["eval.benchmarks=[{name: other, kind: tasks, path: " + str(tmp_path / "bench")
                                       + ", max_new_tokens: 2, max_items: 2}]"], out_dir=tmp_path / "e")
    assert list(report["benchmarks"]) == ["other"] and report["benchmarks"]["other"]["n"] == 2
    with pytest.raises(FileNotFoundError, match=r"step_00000009.*step_00000001"):
        load_run_student(run, checkpoint="step_00000009")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run_student(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    dump_config(config, bare / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_run_student(bare)
    tinker = dataclasses.replace(config.backend, kind="tinker", tinker_base_model="Qwen/Qwen3-8B")
    topk = dataclasses.replace(config.objective, targets="topk")
    teacher = dataclasses.replace(config.teacher, mode="static")
    dump_config(dataclasses.replace(config, backend=tinker, objective=topk, teacher=teacher), bare / "config.yaml")
    with pytest.raises(ValueError, match="only local runs"):
        load_run_student(bare)
    with pytest.raises(ValueError, match="eval.benchmarks is empty"):
        evaluate_model(dataclasses.replace(config, eval=dataclasses.replace(config.eval, benchmarks=[])),
                       out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="needs the run folder"):
        evaluate_model(config, checkpoint="step_00000001")


def test_evaluate_script(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    run = train_from_config(config).run_dir
    script = [sys.executable, str(REPO / "scripts" / "evaluate.py")]
    done = subprocess.run(script + ["--run", str(run), "eval.batch_size=2"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bench: pass@1" in done.stdout and (run / "eval" / "step_00000002" / "results.md").is_file()
    bad = subprocess.run(script + ["--run", str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
    usage = subprocess.run(script + ["--config", "x.yaml", "--checkpoint", "step_1"], capture_output=True,
                           text=True, cwd=REPO, timeout=300)
    assert usage.returncode == 2 and "--checkpoint needs --run" in usage.stderr


def test_damaged_checkpoints_are_named_and_the_newest_intact_one_is_evaluated(tmp_path, tiny_model_dir):
    """Reproduction: `evaluate.py --run` on a truncated checkpoint gave a raw SafetensorError traceback."""
    from sdft.checkpoint import CheckpointError

    config = _config(tmp_path, tiny_model_dir, "checkpoint.every=1", "checkpoint.keep_last=2")
    run = train_from_config(config).run_dir
    damaged = run / "checkpoints" / "step_00000002" / "student.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    student = load_run_student(run)
    assert student.checkpoint.name == "step_00000001"
    size = json.loads((damaged.parent / "state.json").read_text())["files"][damaged.name]["bytes"]
    assert student.notes == (f"damaged checkpoint skipped: {damaged}: truncated: 100 bytes, expected {size}",
                             "evaluated step_00000001, the newest intact checkpoint")
    with pytest.raises(CheckpointError, match=rf"^{damaged}: truncated: 100 bytes"):
        load_run_student(run, checkpoint="step_00000002")
    script = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--run", str(run)]
    chosen = subprocess.run(script + ["--checkpoint", "step_00000002"], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert chosen.returncode == 2 and chosen.stderr.startswith(f"error: {damaged}: truncated: 100 bytes")
    newest = subprocess.run(script, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert newest.returncode == 0, newest.stderr[-2000:]
    assert f"note: damaged checkpoint skipped: {damaged}: truncated" in newest.stderr
    assert "note: evaluated step_00000001, the newest intact checkpoint" in newest.stderr
    assert f"evaluated {run} at step_00000001" in newest.stdout
    report = json.loads((run / "eval" / "step_00000001" / "results.json").read_text())
    assert report["checkpoint"] == "step_00000001" and len(report["notes"]) == 2
