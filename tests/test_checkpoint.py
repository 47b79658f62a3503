import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sdft.checkpoint import (capture_rng_state, latest_checkpoint, list_checkpoints, load_checkpoint,
                             restore_rng_state, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_save_and_load_round_trip(tmp_path):
    model, optimizer, scheduler = model_and_optimizer()
    teacher = {"weight": torch.randn(3, 3, dtype=torch.bfloat16)}
    path = save_checkpoint(tmp_path, 7, tensors={"student": model.state_dict(), "teacher": teacher},
                           objects={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           state={"data_position": 224, "epoch": 0})
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.pt", "scheduler.pt", "state.json", "student.safetensors", "teacher.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.state == {"data_position": 224, "epoch": 0}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.tensors["student"][key], value)
    assert loaded.tensors["teacher"]["weight"].dtype == torch.bfloat16
    assert torch.equal(loaded.tensors["teacher"]["weight"], teacher["weight"])

    fresh, fresh_optimizer, fresh_scheduler = model_and_optimizer()
    fresh.load_state_dict(loaded.tensors["student"])
    fresh_optimizer.load_state_dict(loaded.objects["optimizer"])
    fresh_scheduler.load_state_dict(loaded.objects["scheduler"])
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 1


def test_shared_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"tied_a": base, "tied_b": base, "view": base[1], "transposed": base.t()}
    path = save_checkpoint(tmp_path, 1, tensors={"student": tensors}, objects={}, state={})
    loaded = load_checkpoint(path).tensors["student"]
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
    assert base.data_ptr() == tensors["tied_a"].data_ptr()  # the caller's tensors are untouched


def test_latest_and_pruning_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, tensors={"w": {"x": torch.full((2,), float(step))}}, objects={},
                        state={}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert load_checkpoint(latest_checkpoint(tmp_path)).tensors["w"]["x"].tolist() == [4.0, 4.0]
    save_checkpoint(tmp_path, 5, tensors={}, objects={}, state={}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, tensors={}, objects={}, state={"version": 1})
    save_checkpoint(tmp_path, 3, tensors={}, objects={}, state={"version": 2})
    assert load_checkpoint(latest_checkpoint(tmp_path)).state == {"version": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_latest_falls_back_to_a_scan_and_ignores_incomplete_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, tensors={}, objects={}, state={})
    save_checkpoint(tmp_path, 2, tensors={}, objects={}, state={})
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    (root / "step_00000009").mkdir()  # no state.json
    (root / ".tmp_step_00000010_x").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    (root / "latest").write_text("step_00000009\n")
    assert latest_checkpoint(tmp_path).name == "step_00000002"


class ExplodingObject:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, tensors={"w": {"x": torch.ones(2)}}, objects={"o": {"a": 1}}, state={"p": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, tensors={"w": {"x": torch.zeros(2)}}, objects={"o": ExplodingObject()},
                        state={"p": 2}, keep_last=1)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path)).state == {"p": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from sdft.checkpoint import save_checkpoint

    class Slow:
        def __reduce__(self):
            print("writing", flush=True)
            time.sleep(60)
            return (dict, ())

    run_dir = sys.argv[1]
    save_checkpoint(run_dir, 1, tensors={"w": {"x": torch.ones(1000)}}, objects={"o": {"a": 1}}, state={"p": 1})
    save_checkpoint(run_dir, 2, tensors={"w": {"x": torch.zeros(1000)}}, objects={"o": Slow()}, state={"p": 2},
                    keep_last=1)
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, env=env,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        temporaries = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp_step_00000002")]
        assert len(temporaries) == 1 and (temporaries[0] / "w.safetensors").is_file()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    latest = latest_checkpoint(run_dir)
    assert latest.name == "step_00000001"
    loaded = load_checkpoint(latest)
    assert loaded.state == {"p": 1} and loaded.tensors["w"]["x"].sum().item() == 1000.0
    # the next save cleans up the leftovers of the killed one
    save_checkpoint(run_dir, 2, tensors={}, objects={}, state={"p": 2}, keep_last=1)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002"]


def draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_round_trip_reproduces_the_same_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both states
    state = capture_rng_state()
    json.dumps(state)  # portable
    expected = draws()
    draws()
    restore_rng_state(json.loads(json.dumps(state)))
    assert draws() == expected

    path = save_checkpoint(tmp_path, 1, tensors={}, objects={}, state={})
    after_save = draws()
    restore_rng_state(load_checkpoint(path).rng)
    assert draws() == after_save


def test_bad_arguments_and_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        save_checkpoint(tmp_path, -1, tensors={}, objects={}, state={})
    with pytest.raises(ValueError, match="keep_last must be an int >= 1, got 0"):
        save_checkpoint(tmp_path, 1, tensors={}, objects={}, state={}, keep_last=0)
    with pytest.raises(ValueError, match="name '../x' must be a file-name stem"):
        save_checkpoint(tmp_path, 1, tensors={"../x": {}}, objects={}, state={})
    with pytest.raises(ValueError, match="must be JSON-serializable"):
        save_checkpoint(tmp_path, 1, tensors={}, objects={}, state={"bad": object()})
    with pytest.raises(ValueError, match="entry 'x' must map a str to a torch.Tensor, got list"):
        save_checkpoint(tmp_path, 1, tensors={"w": {"x": [1, 2]}}, objects={}, state={})
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not an RNG state"):
        restore_rng_state({"python": {}})
    assert latest_checkpoint(tmp_path) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []  # the failed save left nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_rng(tmp_path):
    tensors = {"x": torch.randn(4, device="cuda")}
    path = save_checkpoint(tmp_path, 1, tensors={"w": tensors}, objects={}, state={})
    assert torch.equal(load_checkpoint(path).tensors["w"]["x"], tensors["x"].cpu())
    state = load_checkpoint(path).rng
    assert "cuda" in state
    restore_rng_state(state)
    first = torch.rand(3, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), first)
