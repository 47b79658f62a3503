"""Run folders (sdft.rundir): one owner at a time, never silently overwritten, mixed or resumed with other
settings; damaged checkpoints are named and skipped; a full disk during a save loses nothing."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdft.checkpoint import CheckpointError, CheckpointWriteError, latest_checkpoint, load_checkpoint
from sdft.config import load_config
from sdft.logs import read_metrics
from sdft.rundir import LOCK_FILE, RECORD_FILE, RunFolderError, RunLock, claim_run_folder, compare_configs
from sdft.runner import train_from_config
from tests.test_loop import _write_data

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _overrides(tmp_path: Path, model_dir: str, *extra: str) -> list[str]:
    """key=value overrides of a tiny run (2 prompts per step, 8 new tokens) into <tmp_path>/runs/test."""
    if not (tmp_path / "train.jsonl").exists():
        _write_data(tmp_path)
    bench = tmp_path / "bench"
    return [f"model.name={model_dir}", f"data.path={tmp_path / 'train.jsonl'}", f"output_dir={tmp_path / 'runs'}",
            "run_name=test", "optim.batch_size=2", "optim.micro_batch_size=2", "optim.max_steps=2", "optim.lr=1e-3",
            "optim.schedule=constant", "generation.max_new_tokens=8", "generation.batch_size=2",
            "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 4}]",
            "logging.tensorboard=false", "logging.progress=false", "logging.plot=false", "teacher.mode=static",
            "student.lora_rank=4", "objective.skip_first_n_tokens=1", *extra]


def _config(tmp_path, model_dir, *extra):
    return load_config(None, _overrides(tmp_path, model_dir, *extra))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", "/dev/null", *args],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# The "what changed" rule


def test_compare_configs_splits_allowed_and_refused_changes():
    old = {"seed": 0, "optim": {"lr": 1e-3, "max_steps": 2, "epochs": 1.0}, "loss": {"kind": "forward"},
           "eval": {"batch_size": 8, "benchmarks": [{"name": "a", "max_new_tokens": 3}, {"name": "b", "path": "x"}]},
           "logging": {"plot": True}}
    new = {"seed": 1, "optim": {"lr": 2e-3, "max_steps": 4, "epochs": 1.0}, "objective": {"kind": "forward"},
           "eval": {"batch_size": 8, "benchmarks": [{"name": "b", "path": "x"}, {"name": "a", "max_new_tokens": 5}]},
           "logging": {"plot": False}}
    changes = compare_configs(old, new, may_change=("eval", "logging", "optim.max_steps"))
    assert changes.allowed == ["eval.benchmarks.order: ['a', 'b'] -> ['b', 'a']",
                               "eval.benchmarks[a].max_new_tokens: 3 -> 5", "logging.plot: True -> False",
                               "optim.max_steps: 2 -> 4"]
    assert changes.refused == ["loss.kind: 'forward' -> (absent)", "objective.kind: (absent) -> 'forward'",
                               "optim.lr: 0.001 -> 0.002", "seed: 0 -> 1"]
    # a prefix covers the key itself and what lies below it, not a key that merely starts with the same letters
    assert compare_configs({"optim": {"max_steps_x": 1}}, {"optim": {"max_steps_x": 2}},
                           may_change=("optim.max_steps",)).refused == ["optim.max_steps_x: 1 -> 2"]
    assert compare_configs(old, old, may_change=()) == compare_configs({}, {}, may_change=())


# ----------------------------------------------------------------------------------------------
# One owner at a time


def test_a_held_folder_is_refused_naming_its_holder_and_released_after(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r", "data.path=x"])
    with claim_run_folder(config) as folder:
        holder = json.loads((tmp_path / "r" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["started_utc"].endswith("Z") and "pytest" in holder["command"]
        with pytest.raises(RunFolderError, match=rf"{tmp_path / 'r'} is in use by another run \(pid {os.getpid()} "
                                                 rf"on host {socket.gethostname()}, started .*command: .*pytest.*\).* "
                                                 "choose another run_name"):
            claim_run_folder(config)
        assert folder.lock.held and sorted(p.name for p in (tmp_path / "r").iterdir()) == [LOCK_FILE]
    # a run that wrote nothing leaves no trace: its lock file goes, and the folder the claim made
    assert not folder.lock.held and not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with claim_run_folder(config) as folder:
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["notes.txt", LOCK_FILE]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["notes.txt", LOCK_FILE]
    assert (tmp_path / "r" / LOCK_FILE).read_text() == ""


HOLDER = textwrap.dedent("""
    import sys, time
    from sdft.rundir import RunLock
    lock = RunLock.acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env=ENV)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {process.pid} "):
            RunLock.acquire(tmp_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    lock = RunLock.acquire(tmp_path)  # no stale lock to clean up by hand
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_second_run_into_a_running_folder_stops_before_writing(tmp_path, tiny_model_dir):
    """Reproduction: two runs started into one run_name (seed 0 vs seed 1 and another lr) used to both exit 0
    with their metrics, config, summary and checkpoints mixed."""
    args = _overrides(tmp_path, tiny_model_dir, "optim.max_steps=6", "checkpoint.every=1")
    first = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config", "/dev/null", *args,
                              "seed=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    lock_file = tmp_path / "runs" / "test" / LOCK_FILE
    try:
        while first.poll() is None and not (lock_file.exists() and lock_file.read_text()):
            time.sleep(0.005)
        assert first.poll() is None, first.communicate()[1][-2000:]
        # the second run, 0.5 s or a few ms later: refused at once, naming the first
        with pytest.raises(RunFolderError, match=rf"is in use by another run \(pid {first.pid} on host"):
            train_from_config(load_config(None, args + ["seed=1", "optim.lr=5e-3"]))
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-2000:]
    run = tmp_path / "runs" / "test"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert load_config(run / "config.yaml").seed == 0 and "seed: 0" in (run / "summary.md").read_text()
    assert json.loads((run / RECORD_FILE).read_text())["config"]["seed"] == 0


def test_the_train_script_reports_a_held_folder(tmp_path, tiny_model_dir):
    args = _overrides(tmp_path, tiny_model_dir)
    with claim_run_folder(load_config(None, args)):
        refused = _train_script(*args, "seed=1")
        assert sorted(p.name for p in (tmp_path / "runs" / "test").iterdir()) == [LOCK_FILE]
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: {tmp_path / 'runs' / 'test'} is in use by another run (pid {os.getpid()}")
    assert not (tmp_path / "runs" / "test").exists()  # the holder wrote nothing either


# ----------------------------------------------------------------------------------------------
# A finished run is never silently overwritten, and a resume must continue the same run


def test_rerunning_a_finished_run_is_refused_and_overwrite_moves_it_aside(tmp_path, tiny_model_dir):
    """Reproduction: rerunning a finished run's name without resume=true overwrote metrics.jsonl, config.yaml
    and summary.md, left the old checkpoints behind, and a killed rerun then resumed from them."""
    first = train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1"))
    run = first.run_dir
    record = json.loads((run / RECORD_FILE).read_text())
    assert record["config"]["seed"] == 0 and record["sdft_version"] and record["resumes"] == []
    before = _files(run)

    with pytest.raises(RunFolderError) as caught:
        train_from_config(_config(tmp_path, tiny_model_dir, "seed=1"))
    message = str(caught.value)
    assert message.startswith(f"{run} already holds a run (run.json, config.yaml, metrics.jsonl, summary.md, "
                              "2 checkpoint folder(s), predictions/; made ")
    for option in ("resume=true to continue it", "another run_name to keep it",
                   "overwrite=true to start anew here (the old folder is moved to test.replaced-<UTC time>, not "
                   "deleted)"):
        assert option in message, option
    assert _files(run) == before  # nothing touched

    # overwrite=true: the old run is moved aside whole; the new one (stopped after step 1, as if killed) resumes
    # from its own checkpoint, not from the old run's last one
    second = _config(tmp_path, tiny_model_dir, "seed=1", "checkpoint.every=1", "overwrite=true")
    train_from_config(second, stop_after=1)
    moved = [p for p in run.parent.iterdir() if p.name.startswith("test.replaced-")]
    assert len(moved) == 1 and _files(moved[0]) == {**before, LOCK_FILE: b""}
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")] == ["step_00000001"]
    resumed = train_from_config(_config(tmp_path, tiny_model_dir, "seed=1", "checkpoint.every=1", "resume=true"))
    assert resumed.start_step == 1
    assert json.loads((run / RECORD_FILE).read_text())["config"]["seed"] == 1
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2]
    with pytest.raises(RunFolderError, match="resume=true and overwrite=true exclude each other"):
        train_from_config(_config(tmp_path, tiny_model_dir, "resume=true", "overwrite=true"))


def test_resume_with_other_training_settings_is_refused(tmp_path, tiny_model_dir, capsys):
    run = train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1")).run_dir
    before = _files(run)
    with pytest.raises(RunFolderError) as caught:
        train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1", "resume=true", "seed=1",
                                  "optim.lr=2e-3", "eval.batch_size=2"))
    message = str(caught.value)
    assert message.startswith(f"resume=true: {run} was made with other training settings (optim.lr: 0.001 -> 0.002; "
                              "seed: 0 -> 1); a resumed run must train as it started (only eval, logging, "
                              "optim.max_steps, optim.epochs, resume, overwrite")
    assert "eval.batch_size" not in message and "overwrite=true with resume=false" in message
    assert _files(run) == before

    # evaluation, logging and the step budget may change: the run continues from step 2 to step 3
    again = train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1", "resume=true",
                                      "optim.max_steps=3", "eval.batch_size=2", "logging.progress=true"))
    assert (again.start_step, again.steps) == (2, 3)
    shown = capsys.readouterr().err
    assert "note: resumed with changed settings: eval.batch_size: 8 -> 2; logging.progress: False -> True; " \
           "optim.max_steps: 2 -> 3; resume: False -> True" in shown
    assert "note: resumed from step_00000002" in shown
    summary = (run / "summary.md").read_text()
    assert "- resumed with changed settings: eval.batch_size: 8 -> 2;" in summary
    record = json.loads((run / RECORD_FILE).read_text())
    assert record["config"]["optim"]["max_steps"] == 2 and len(record["resumes"]) == 1
    assert "optim.max_steps: 2 -> 3" in record["resumes"][0]["changed"]


def test_a_folder_made_before_run_json_is_checked_against_its_config_yaml(tmp_path, tiny_model_dir):
    run = train_from_config(_config(tmp_path, tiny_model_dir)).run_dir
    (run / RECORD_FILE).unlink()
    with pytest.raises(RunFolderError, match=r"other training settings \(optim.lr: 0.001 -> 0.002\)"):
        train_from_config(_config(tmp_path, tiny_model_dir, "resume=true", "optim.lr=2e-3"))
    (run / RECORD_FILE).write_text('{"config": ')
    with pytest.raises(RunFolderError, match=rf"{run / RECORD_FILE}:1: not valid JSON"):
        train_from_config(_config(tmp_path, tiny_model_dir, "resume=true"))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def _zero_middle(file: Path, length: int = 65536) -> None:
    data = bytearray(file.read_bytes())
    length = min(length, len(data) // 2)
    start = len(data) // 2 - length // 2
    data[start:start + length] = bytes(length)
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: _truncate(ckpt / "state.json"), r"state.json:\d+: corrupt checkpoint state \(truncated"),
    (lambda ckpt: (ckpt / "student.safetensors").unlink(), r"student.safetensors: missing"),
])
def test_resume_with_only_damaged_checkpoints_stops_and_names_them(tmp_path, tiny_model_dir, damage, message):
    """Reproduction: resume=true whose only checkpoint was unreadable retrained from step 0 and rewrote
    metrics.jsonl, printing nothing."""
    config = _config(tmp_path, tiny_model_dir, "checkpoint.every=1", "optim.max_steps=3")
    run = train_from_config(config, stop_after=1).run_dir
    damage(run / "checkpoints" / "step_00000001")
    before = _files(run)
    with pytest.raises(CheckpointError, match=rf"{run / 'checkpoints'} holds no intact checkpoint: "
                                              rf"{run / 'checkpoints' / 'step_00000001'}.*{message}"):
        train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1", "optim.max_steps=3", "resume=true"))
    assert _files(run) == {**before, LOCK_FILE: b""}


@pytest.mark.parametrize("file, damage, what", [
    ("student.safetensors", _truncate, "truncated"),
    ("optimizer.pt", _truncate, "truncated"),
    ("student.safetensors", _zero_middle, "checksum mismatch"),
])
def test_a_damaged_latest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, tiny_model_dir, capsys, file,
                                                                          damage, what):
    """Reproduction: a truncated student.safetensors or optimizer.pt in the latest checkpoint gave a raw
    SafetensorError traceback; zeroed bytes were loaded silently."""
    common = ("checkpoint.every=1", "optim.max_steps=3")
    run = train_from_config(_config(tmp_path, tiny_model_dir, *common), stop_after=2).run_dir
    damage(run / "checkpoints" / "step_00000002" / file)
    result = train_from_config(_config(tmp_path, tiny_model_dir, *common, "resume=true"))
    assert (result.start_step, result.steps) == (1, 3)
    damaged = f"{run / 'checkpoints' / 'step_00000002' / file}: {what}"
    shown = capsys.readouterr().err
    assert f"note: damaged checkpoint skipped: {damaged}" in shown
    assert "note: resumed from step_00000001, the newest intact checkpoint" in shown
    summary = (run / "summary.md").read_text()
    assert f"- damaged checkpoint skipped: {damaged}" in summary
    assert "- resumed from step_00000001, the newest intact checkpoint" in summary
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoints" / "step_00000002").step == 2  # saved again, intact


# ----------------------------------------------------------------------------------------------
# A full disk during a save; permissions


def test_a_full_disk_during_a_save_stops_clearly_and_the_run_resumes(tmp_path, tiny_model_dir, monkeypatch):
    """Reproduction: a full disk during a save gave a raw traceback."""
    import sdft.checkpoint as checkpoint

    real = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "step_00000002" in Path(filename).parent.name:
            real(tensors, filename, *args, **kwargs)
            _truncate(Path(filename))
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    config = _config(tmp_path, tiny_model_dir, "checkpoint.every=1", "optim.max_steps=3")
    with pytest.raises(CheckpointWriteError) as caught:
        train_from_config(config)
    run = tmp_path / "runs" / "test"
    message = str(caught.value)
    assert message.startswith(f"could not save checkpoint step 2 to {run / 'checkpoints' / 'step_00000002'}: "
                              "No space left on device")
    assert (f"The previous checkpoint {run / 'checkpoints' / 'step_00000001'} is intact and checkpoints/latest still "
            "points to it. To go on: free disk space") in message and "resume=true" in message
    assert latest_checkpoint(run).name == "step_00000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    monkeypatch.undo()
    resumed = train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1", "optim.max_steps=3",
                                        "resume=true"))
    assert resumed.start_step == 1
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]


def test_run_outputs_honour_the_umask(tmp_path, tiny_model_dir):
    """Reproduction: run outputs were created 0600/0700 whatever the umask."""
    old = os.umask(0o022)
    try:
        run = train_from_config(_config(tmp_path, tiny_model_dir, "checkpoint.every=1", "logging.plot=true")).run_dir
    finally:
        os.umask(old)
    paths = [run, *run.rglob("*")]
    assert len(paths) > 12 and (run / "learning_curves.png").is_file()
    for path in paths:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


# ----------------------------------------------------------------------------------------------
# Several processes (torch.distributed, gloo)

CLAIMER = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from sdft.config import load_config
    from sdft.rundir import RunFolderError, claim_run_folder

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    config = load_config(None, [f"output_dir={out}", "run_name=r", "data.path=x"])
    try:
        folder = claim_run_folder(config, is_main=rank == 0, world_size=2)
        print("claimed", folder.path, "lock" if folder.lock is not None else "no-lock", flush=True)
    except RunFolderError as error:
        print("refused", error, flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


def _claim_in_two_processes(tmp_path: Path, store: str) -> list[str]:
    processes = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(rank), str(tmp_path / store), str(tmp_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    return [out.strip() for out, _ in outputs]


def test_in_a_distributed_run_the_main_process_claims_and_every_process_learns_the_outcome(tmp_path):
    run = tmp_path / "r"
    assert _claim_in_two_processes(tmp_path, "store1") == [f"claimed {run} lock", f"claimed {run} no-lock"]
    (run / "config.yaml").write_text("seed: 0\n")  # now the folder holds a run, and resume=false
    rank0, rank1 = _claim_in_two_processes(tmp_path, "store2")
    assert rank0.startswith(f"refused {run} already holds a run (config.yaml)")
    assert rank1.startswith(f"refused the main process could not claim {run}: RunFolderError: {run} already holds")
