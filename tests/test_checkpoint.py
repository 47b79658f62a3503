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


# ----------------------------------------------------------------------------------------------
# Manifest, damaged files, full disk, permissions

import errno  # noqa: E402
import hashlib  # noqa: E402

from sdft.checkpoint import CheckpointError, CheckpointWriteError, load_latest_intact  # noqa: E402
from sdft.io import atomic_write_text  # noqa: E402


def _save_big(run_dir, step, value=1.0, keep_last=3):
    """A checkpoint whose student.safetensors is about 1 MB (room for a 64 KB hole) plus an optimizer state."""
    model, optimizer, _ = model_and_optimizer()
    tensors = {"student": {"w": torch.full((512, 512), value), "b": torch.arange(8.0)}}
    return save_checkpoint(run_dir, step, tensors=tensors, objects={"optimizer": optimizer.state_dict()},
                           state={"step": step}, keep_last=keep_last)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def _overwrite_middle(file: Path, byte: int, length: int = 65536) -> None:
    data = bytearray(file.read_bytes())
    start = len(data) // 2 - length // 2
    data[start:start + length] = bytes([byte]) * length
    file.write_bytes(bytes(data))


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint's state.json as an earlier version wrote it (no manifest)."""
    meta = json.loads((path / "state.json").read_text())
    meta["format"] = 1
    del meta["files"]
    (path / "state.json").write_text(json.dumps(meta))


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = _save_big(tmp_path, 1)
    meta = json.loads((path / "state.json").read_text())
    assert meta["format"] == 2
    assert sorted(meta["files"]) == ["optimizer.pt", "student.safetensors"]
    for name, entry in meta["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (path / "student.safetensors").stat().st_size > 1_000_000
    loaded = load_checkpoint(path)
    assert loaded.verified and torch.equal(loaded.tensors["student"]["w"], torch.full((512, 512), 1.0))


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, "student.safetensors", r"student.safetensors: truncated: \d+ bytes, expected \d+"),
    (_truncate, "optimizer.pt", r"optimizer.pt: truncated: \d+ bytes, expected \d+"),
    (lambda f: _overwrite_middle(f, 0), "student.safetensors", r"student.safetensors: checksum mismatch"),
    (lambda f: _overwrite_middle(f, 0xFF), "student.safetensors", r"student.safetensors: checksum mismatch"),
    (lambda f: _overwrite_middle(f, 0, 1000), "optimizer.pt", r"optimizer.pt: checksum mismatch"),
    (lambda f: f.write_bytes(f.read_bytes() + b"x"), "optimizer.pt", r"optimizer.pt: \d+ bytes, expected \d+"),
    (Path.unlink, "student.safetensors", r"student.safetensors: missing \(state.json lists it\)"),
    (_truncate, "state.json", r"state.json:\d+: corrupt checkpoint state \(truncated or damaged\)"),
    (Path.unlink, "state.json", r"is not a checkpoint folder \(no readable state.json\)"),
])
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path, damage, file, message):
    path = _save_big(tmp_path, 1)
    damage(path / file)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


def test_format_1_checkpoints_load_unverified_and_parse_errors_are_named(tmp_path):
    path = _save_big(tmp_path, 1)
    _as_format_1(path)
    loaded = load_checkpoint(path)
    assert not loaded.verified and loaded.step == 1
    assert torch.equal(loaded.tensors["student"]["w"], torch.full((512, 512), 1.0))
    assert "exp_avg" in loaded.objects["optimizer"]["state"][0]
    # without checksums, damage is still caught where parsing or the values show it, never as a raw traceback
    _overwrite_middle(path / "student.safetensors", 0xFF)  # NaN bytes inside the float32 data
    with pytest.raises(CheckpointError, match=r"student.safetensors: tensor 'w' holds NaN values"):
        load_checkpoint(path)
    _truncate(path / "student.safetensors")
    with pytest.raises(CheckpointError, match=r"student.safetensors: unreadable safetensors file \(SafetensorError"):
        load_checkpoint(path)
    _truncate(path / "optimizer.pt")
    meta = json.loads((path / "state.json").read_text())
    meta["tensors"] = []  # leave only the optimizer state, then damage it
    (path / "state.json").write_text(json.dumps(meta))
    _truncate(path / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer.pt: unreadable torch file \("):
        load_checkpoint(path)


def test_objects_false_neither_checks_nor_loads_the_pt_files(tmp_path):
    path = _save_big(tmp_path, 1)
    _truncate(path / "optimizer.pt")
    loaded = load_checkpoint(path, objects=False)
    assert loaded.objects == {} and "student" in loaded.tensors


def test_newest_intact_checkpoint_is_found_and_the_damaged_ones_are_named(tmp_path):
    assert load_latest_intact(tmp_path) == (None, [])
    for step in (1, 2, 3):
        _save_big(tmp_path, step, value=float(step))
    root = tmp_path / "checkpoints"
    _overwrite_middle(root / "step_00000003" / "student.safetensors", 0)
    (root / "step_00000004").mkdir()  # a folder without state.json: damaged, not a checkpoint in progress
    loaded, damaged = load_latest_intact(tmp_path)
    assert loaded.step == 2 and loaded.tensors["student"]["w"][0, 0].item() == 2.0
    assert len(damaged) == 2
    assert damaged[0].startswith(f"{root / 'step_00000003' / 'student.safetensors'}: checksum mismatch")
    assert damaged[1] == f"{root / 'step_00000004'} is not a checkpoint folder (no readable state.json)"
    _truncate(root / "step_00000002" / "optimizer.pt")
    (root / "step_00000001" / "state.json").write_text('{"format": 2, "step": ')
    with pytest.raises(CheckpointError) as caught:
        load_latest_intact(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{root} holds no intact checkpoint: ")
    for needle in ("step_00000004 is not a checkpoint folder", "step_00000003/student.safetensors: checksum mismatch",
                   "step_00000002/optimizer.pt: truncated", "step_00000001/state.json:1: corrupt checkpoint state"):
        assert needle in text, needle


def test_latest_pointer_is_tried_first(tmp_path):
    for step in (1, 2):
        _save_big(tmp_path, step, value=float(step))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001\n")
    assert load_latest_intact(tmp_path)[0].step == 1


def _failing_writer(real, fail_name):
    """A safetensors writer that writes half of `fail_name` and then finds the disk full."""
    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).name != fail_name:
            return real(tensors, filename, *args, **kwargs)
        real(tensors, filename, *args, **kwargs)
        _truncate(Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    return save_file


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import sdft.checkpoint as checkpoint

    first = _save_big(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", _failing_writer(checkpoint.save_file, "student.safetensors"))
    with pytest.raises(CheckpointWriteError) as caught:
        _save_big(tmp_path, 2, keep_last=1)
    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error).startswith(f"could not save checkpoint step 2 to {tmp_path / 'checkpoints' / 'step_00000002'}: "
                                 "No space left on device (")
    assert f"The previous checkpoint {first} is intact and checkpoints/latest still points to it" in str(error)
    assert ("free disk space (or set output_dir to a disk with room), then continue the run with resume=true"
            in str(error))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001\n"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert load_checkpoint(first).step == 1


def test_a_failed_latest_pointer_write_is_explained(tmp_path, monkeypatch):
    import sdft.checkpoint as checkpoint

    _save_big(tmp_path, 1)

    def write(path, text):
        if Path(path).name == "latest":
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))
        atomic_write_text(path, text)
    monkeypatch.setattr(checkpoint, "atomic_write_text", write)
    with pytest.raises(CheckpointWriteError, match=r"Disk quota exceeded .*The new checkpoint step_00000002 is "
                                                   r"complete, but checkpoints/latest still names step_00000001, "
                                                   r"which is intact\. To go on: free disk space"):
        _save_big(tmp_path, 2, keep_last=1)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]  # nothing pruned


def test_a_failed_resave_of_the_same_step_keeps_the_earlier_copy(tmp_path, monkeypatch):
    import sdft.checkpoint as checkpoint

    _save_big(tmp_path, 1)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise OSError(errno.EIO, "Input/output error", str(src))
        real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match="Input/output error .*To go on: fix the cause"):
        _save_big(tmp_path, 1, value=5.0)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "latest", "step_00000001"]
    assert load_checkpoint(latest_checkpoint(tmp_path)).tensors["student"]["w"][0, 0].item() == 1.0


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        path = _save_big(tmp_path / "run", 1)
        atomic_write_text(tmp_path / "run" / "note.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "run" / "checkpoints").stat().st_mode & 0o777 == dir_mode
    for file in [*path.iterdir(), tmp_path / "run" / "checkpoints" / "latest", tmp_path / "run" / "note.txt"]:
        assert file.stat().st_mode & 0o777 == file_mode, file


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint), here in a process group of one; several processes:
# tests/test_distributed.py

@pytest.fixture
def sharded_parallel():
    """The Parallel of an FSDP2 run of one process (a gloo group of one, torn down afterwards)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sdft.parallel import Parallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Parallel(mode="fsdp2", mesh=init_device_mesh("cpu", (1,)))
    finally:
        dist.destroy_process_group()


def _sharded_state(mesh, scale: float):
    """(tensors, objects) shaped like LocalBackend's under FSDP2: DTensors, a whole RNG tensor, and an optimizer
    state dict keyed by parameter name with a list of param groups."""
    from torch.distributed.tensor import Shard, distribute_tensor

    weight = distribute_tensor(torch.arange(24.0).reshape(6, 4) * scale, mesh, [Shard(0)])
    tensors = {"student": {"layer.w": weight}, "teacher": {}, "rng": {"sampler": torch.arange(5, dtype=torch.uint8)}}
    optimizer = {"state": {"layer.w": {"step": torch.tensor(3.0 * scale), "exp_avg": weight * 0.5}},
                 "param_groups": [{"lr": 0.1 * scale, "params": ["layer.w"]}]}
    return tensors, {"optimizer": {"optimizer": optimizer, "schedule": {"last_epoch": 3}}}


def test_a_sharded_checkpoint_reads_back_whole_or_into_shards(tmp_path, sharded_parallel):
    tensors, objects = _sharded_state(sharded_parallel.mesh, 1.0)
    path = save_checkpoint(tmp_path, 1, tensors=tensors, objects=objects, state={"step": 1}, parallel=sharded_parallel)
    meta = json.loads((path / "state.json").read_text())
    assert meta["format"] == 3 and meta["sharded"] == {"world_size": 1}
    assert sorted(meta["files"]) == ["sharded/.metadata", "sharded/__0_0.distcp"]
    assert sorted(p.name for p in path.iterdir()) == ["sharded", "state.json"]

    whole = load_checkpoint(path)  # one process, no template: whole CPU tensors, the objects as saved
    assert whole.step == 1 and whole.verified and whole.state == {"step": 1}
    assert whole.tensors.keys() == {"student", "teacher", "rng"} and whole.tensors["teacher"] == {}
    assert type(whole.tensors["student"]["layer.w"]) is torch.Tensor
    assert torch.equal(whole.tensors["student"]["layer.w"], torch.arange(24.0).reshape(6, 4))
    assert torch.equal(whole.tensors["rng"]["sampler"], torch.arange(5, dtype=torch.uint8))
    saved = whole.objects["optimizer"]
    assert saved["schedule"] == {"last_epoch": 3} and saved["optimizer"]["param_groups"] == [
        {"lr": 0.1, "params": ["layer.w"]}]
    assert torch.equal(saved["optimizer"]["state"]["layer.w"]["exp_avg"], torch.arange(24.0).reshape(6, 4) * 0.5)
    assert load_checkpoint(path, objects=False).objects == {}

    into = _sharded_state(sharded_parallel.mesh, 0.0)  # a run's live shards, loaded in place
    loaded = load_checkpoint(path, like=lambda: into)
    assert loaded.tensors["student"]["layer.w"] is into[0]["student"]["layer.w"]
    assert torch.equal(into[0]["student"]["layer.w"].full_tensor(), torch.arange(24.0).reshape(6, 4))
    state = loaded.objects["optimizer"]["optimizer"]
    assert state["param_groups"][0]["lr"] == 0.1 and float(state["state"]["layer.w"]["step"]) == 3.0
    assert torch.equal(state["state"]["layer.w"]["exp_avg"].full_tensor(), torch.arange(24.0).reshape(6, 4) * 0.5)

    # a run that is not sharded cannot load it
    with pytest.raises(ValueError, match=r"written sharded by an FSDP2 run of 1 process; continue it"):
        load_checkpoint(path, like=lambda: ({"student": {"layer.w": torch.zeros(6, 4)}}, {}))


def test_a_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path, sharded_parallel, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    first = save_checkpoint(tmp_path, 1, tensors=_sharded_state(sharded_parallel.mesh, 1.0)[0],
                            parallel=sharded_parallel)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(tmp_path, 2, tensors=_sharded_state(sharded_parallel.mesh, 2.0)[0], keep_last=1,
                        parallel=sharded_parallel)
    assert caught.value.errno == errno.ENOSPC
    assert f"The previous checkpoint {first} is intact and checkpoints/latest still points to it" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert torch.equal(load_checkpoint(first).tensors["student"]["layer.w"], torch.arange(24.0).reshape(6, 4))


def test_a_damaged_shard_file_is_named(tmp_path, sharded_parallel):
    path = save_checkpoint(tmp_path, 1, tensors=_sharded_state(sharded_parallel.mesh, 1.0)[0],
                           parallel=sharded_parallel)
    _truncate(path / "sharded" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"step_00000001/sharded/__0_0\.distcp: truncated: \d+ bytes, expected"):
        load_checkpoint(path, objects=False)
    (path / "sharded" / ".metadata").unlink()
    assert list_checkpoints(tmp_path) == []  # not complete without its metadata
