"""The training loop end to end on a tiny random model: every teacher mode and loss kind, the SFT
baseline, run-folder contents, and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdft.config import load_config
from sdft.logs import read_metrics
from sdft.runner import train_from_config

REPO = Path(__file__).resolve().parents[1]


def _write_data(folder: Path) -> tuple[Path, Path]:
    rows = [{"inputs": {"question": f"What is {a} plus {b}?"}, "expected": f"{a} plus {b} is {a + b}."}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1), (4, 4), (8, 1)]]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = folder / "bench"
    bench.mkdir()
    tasks = [{"task_id": f"t{i}", "instruction": f"What is {i} plus 1?",
              "verifier": {"kind": "in_process", "fn_name": "contains", "expected": str(i + 1)}} for i in range(3)]
    (bench / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return data, bench


def _config(tmp_path: Path, model_dir: str, *overrides: str):
    data, bench = _write_data(tmp_path)
    base = [
        f"model.name={model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}", "run_name=test",
        "optim.batch_size=4", "optim.micro_batch_size=2", "optim.max_steps=2", "optim.lr=1e-3",
        "optim.schedule=constant", "generation.max_new_tokens=8", "generation.batch_size=4",
        "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 4}]",
        "logging.tensorboard=false", "logging.progress=false", "teacher.mode=static", "student.lora_rank=4",
        "objective.skip_first_n_tokens=1",
    ]
    return load_config(None, base + list(overrides))


@pytest.mark.parametrize("overrides", [
    ("teacher.mode=static", "objective.targets=full"),
    ("teacher.mode=ema", "objective.targets=full", "objective.full.kind=jsd"),
    ("teacher.mode=sync", "teacher.sync_every=1", "objective.targets=topk", "objective.topk.k=5"),
    ("teacher.mode=static", "objective.targets=topk", "objective.topk.normalize=tail", "objective.reduction=sum"),
    ("teacher.mode=static", "objective.targets=sampled", "objective.full.kind=reverse", "objective.reduction=token_mean"),
    ("student.mode=full", "teacher.mode=ema", "objective.targets=full"),
])
def test_sdft_run_writes_a_complete_run_folder(tmp_path, tiny_model_dir, overrides):
    config = _config(tmp_path, tiny_model_dir, *overrides)
    result = train_from_config(config)
    run = result.run_dir
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in ("train/loss", "train/lr", "train/completion_len", "train/step_time_s", "train/tokens_per_s"):
            assert key in row["metrics"], key
    eval_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in eval_rows] == [0, 2]
    assert "val/bench/pass@1" in eval_rows[-1]["metrics"]
    assert (run / "predictions" / "bench.jsonl").exists() and (run / "predictions" / "bench.before.jsonl").exists()
    assert (run / "summary.md").read_text().count("bench") >= 1
    assert (run / "learning_curves.png").stat().st_size > 1000
    assert (run / "config.yaml").exists()
    assert (run / "checkpoints").exists()


def test_resuming_a_finished_run_only_evaluates_again(tmp_path, tiny_model_dir):
    """resume=true on a finished run: no step, the final evaluation redone with the new eval settings."""
    first = train_from_config(_config(tmp_path, tiny_model_dir, "resume=true", "checkpoint.every=1"))
    run = first.run_dir
    checkpoints = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    rows = read_metrics(run / "metrics.jsonl")
    old = [json.loads(line)["completion"] for line in (run / "predictions" / "bench.jsonl").open()]
    bench = load_config(run / "config.yaml").eval.benchmarks[0].path
    longer = f"eval.benchmarks=[{{name: bench, kind: tasks, path: {bench}, max_new_tokens: 9}}]"
    again = train_from_config(load_config(run / "config.yaml", [longer]))
    assert (first.start_step, again.start_step, again.steps) == (0, 2, 2)
    assert {p.relative_to(run): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == checkpoints
    new_rows = read_metrics(run / "metrics.jsonl")
    assert [r for r in new_rows if r["split"] == "train"] == [r for r in rows if r["split"] == "train"]
    assert [(r["step"], r["split"]) for r in new_rows] == [(r["step"], r["split"]) for r in rows]
    assert [r["step"] for r in new_rows if r["split"] == "val"] == [0, 2]
    assert again.scores_before["bench"].per_item == first.scores_before["bench"].per_item
    assert "max_new_tokens: 9" in (run / "summary.md").read_text()
    new = [json.loads(line)["completion"] for line in (run / "predictions" / "bench.jsonl").open()]
    assert all(a.startswith(b) for a, b in zip(new, old)) and len("".join(new)) > len("".join(old))


def test_sft_run_with_progress_bars(tmp_path, tiny_model_dir, capsys):
    config = _config(tmp_path, tiny_model_dir, "algorithm=sft", "logging.progress=true")
    result = train_from_config(config)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 2 and rows[0]["metrics"]["train/loss"] > 0
    shown = capsys.readouterr().err
    for bar in ("eval bench.before", "test: 100%", "eval bench: 100%"):  # evaluation before, steps, after
        assert bar in shown, shown[-2000:]


def test_train_script_validate_and_errors(tmp_path, tiny_model_dir):
    config_path = tmp_path / "c.yaml"
    data, bench = _write_data(tmp_path)
    config_path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  path: {data}\n")
    ok = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config_path), "--validate"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "data: ok" in ok.stdout and "model: ok" in ok.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config_path),
                          "--validate", "objective.full.kind=backward"], capture_output=True, text=True)
    assert bad.returncode == 2 and "objective.full.kind" in bad.stderr and "forward" in bad.stderr


_RUNNER = """
import sys
from sdft.config import load_config
from sdft.runner import train_from_config
train_from_config(load_config(None, sys.argv[1:]))
"""


def _train_metrics(run_dir: Path) -> list[dict]:
    keys = ("train/loss", "train/kl", "train/completion_len", "train/grad_norm", "train/lr")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    return [{"step": r["step"], **{k: r["metrics"].get(k) for k in keys}} for r in rows]


def test_resume_after_sigkill_reproduces_uninterrupted_metrics(tmp_path, tiny_model_dir):
    common = ["optim.max_steps=5", "checkpoint.every=1", "teacher.mode=ema", "eval.before_training=false",
              "eval.benchmarks=[]", "optim.schedule=cosine", "optim.warmup_ratio=0.2"]
    (tmp_path / "a").mkdir()
    straight = _config(tmp_path / "a", tiny_model_dir, *common, "run_name=straight")
    train_from_config(straight)
    expected = _train_metrics(Path(straight.output_dir) / "straight")

    (tmp_path / "b").mkdir()
    killed = _config(tmp_path / "b", tiny_model_dir, *common, "run_name=killed")
    args = [f"{k}={v}" for k, v in [("model.name", tiny_model_dir), ("data.path", killed.data.path),
                                    ("output_dir", killed.output_dir)]]
    overrides = args + ["run_name=killed", "optim.batch_size=4", "optim.micro_batch_size=2", "optim.lr=1e-3",
                        "generation.max_new_tokens=8", "generation.batch_size=4", "logging.tensorboard=false",
                        "logging.progress=false", "student.lora_rank=4", "objective.skip_first_n_tokens=1"] + common
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, *overrides], env={**os.environ, "PYTHONPATH": str(REPO)})
    marker = Path(killed.output_dir) / "killed" / "checkpoints" / "step_00000002" / "state.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-2 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, "-c", _RUNNER, *overrides, "resume=true"],
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _train_metrics(Path(killed.output_dir) / "killed")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, expected):
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)


def test_run_training_claims_its_run_folder_when_not_given_one(tmp_path):
    """Called directly (not through train_from_config), the loop still takes the folder's lock first."""
    from sdft.loop import run_training
    from sdft.rundir import RunFolderError, claim_run_folder

    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r", "data.path=x"])
    with claim_run_folder(config):
        with pytest.raises(RunFolderError, match=rf"{tmp_path / 'r'} is in use by another run \(pid {os.getpid()}"):
            run_training(config, backend=None, tokenizer=None, train=[], benchmarks=[], steps=1, step_fn=None,
                         run_dir=tmp_path / "r")
