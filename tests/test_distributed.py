"""`accelerate launch --cpu --num_processes 2` shards each batch, averages gradients and writes once; it
reproduces the single-process run (same rollouts thanks to per-prompt sampling seeds)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdft.checkpoint import latest_checkpoint, load_checkpoint
from sdft.logs import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_two_processes_match_one(tmp_path, tiny_model_dir):
    rows = [{"inputs": {"question": f"What is {a} plus {b}?"}, "expected": f"{a} plus {b} is {a + b}."}
            for a in range(1, 5) for b in range(1, 3)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"model.name={tiny_model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}",
            "optim.batch_size=4", "optim.micro_batch_size=1", "optim.max_steps=3", "optim.lr=1e-2",
            "generation.max_new_tokens=8", "logging.tensorboard=false", "logging.progress=false",
            "student.lora_rank=4", "teacher.mode=ema", "objective.skip_first_n_tokens=1", "eval.before_training=false"]
    train = [str(REPO / "scripts" / "train.py"), "--config", "/dev/null"]
    one = subprocess.run([sys.executable, *train, *args, "run_name=one"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launcher, *train, *args, "run_name=two"], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]

    def train_rows(name):
        return [r for r in read_metrics(tmp_path / "runs" / name / "metrics.jsonl") if r["split"] == "train"]
    a, b = train_rows("one"), train_rows("two")
    assert [r["step"] for r in b] == [1, 2, 3]  # written once, not once per process
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/grad_norm", "train/completion_len", "train/lr"):
            assert rb["metrics"][key] == pytest.approx(ra["metrics"][key], rel=2e-3, abs=1e-6), (ra["step"], key)
    wa = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "one")).tensors["student"]
    wb = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "two")).tensors["student"]
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-5)
