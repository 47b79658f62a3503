"""Two processes on the CPU (gloo), launched as users launch them (`accelerate launch --config_file
configs/accelerate/<ddp|fsdp2>.yaml`), reproduce the single-process run: the same per-step losses and the same
final weights, for DDP and FSDP2, LoRA and full fine-tuning, static and EMA teachers. Every process takes
half of each batch (the same rollouts, thanks to per-prompt sampling seeds), the objective is normalized
over the whole batch, and metrics and checkpoints are written once."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdft.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_latest_intact
from sdft.logs import read_metrics

REPO = Path(__file__).resolve().parents[1]
# PYTHONFAULTHANDLER: a process that aborts in C++ still prints where its Python threads were.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
       "PYTHONFAULTHANDLER": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_of(config_file: str | None, args: list[str], name: str) -> list[str]:
    train = [str(REPO / "scripts" / "train.py"), "--config", "/dev/null", *args, f"run_name={name}"]
    if config_file is None:
        return [sys.executable, *train]
    path = config_file if os.path.isabs(config_file) else str(REPO / "configs" / "accelerate" / config_file)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path, "--num_processes", "2",
            "--main_process_port", str(free_port()), *train]


def launch(config_file: str | None, args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(command_of(config_file, args, name), capture_output=True, text=True, env=ENV, cwd=tmp_path,
                          timeout=900)


def run_args(tmp_path: Path, model_dir: str, extra: list[str]) -> list[str]:
    rows = [{"inputs": {"question": f"What is {a} plus {b}?"}, "expected": f"{a} plus {b} is {a + b}."}
            for a in range(1, 5) for b in range(1, 3)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"model.name={model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}",
            "optim.batch_size=4", "optim.micro_batch_size=1", "optim.max_steps=3", "optim.lr=1e-2",
            "optim.schedule=constant", "generation.max_new_tokens=8", "logging.tensorboard=false",
            "logging.progress=false", "logging.plot=false", "student.lora_rank=4",
            "objective.skip_first_n_tokens=1", "eval.before_training=false", *extra]


def train_rows(tmp_path: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(tmp_path / "runs" / name / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("launcher, extra", [
    ("ddp.yaml", ["teacher.mode=ema", "objective.reduction=token_mean"]),
    ("fsdp2.yaml", ["teacher.mode=ema"]),
    ("fsdp2.yaml", ["student.mode=full", "teacher.mode=static", "objective.targets=topk", "objective.topk.k=5"]),
    ("fsdp2.yaml", ["student.mode=full", "teacher.mode=ema", "teacher.ema_alpha=0.5", "objective.reduction=token_mean"]),
    ("fsdp2.yaml", ["student.mode=full", "teacher.mode=static", "model.dtype=bfloat16", "optim.lr=1e-3"]),
    ("ram_efficient", ["student.mode=full", "teacher.mode=ema", "teacher.ema_alpha=0.5"]),
    ("ram_efficient", ["teacher.mode=ema"]),
])
def test_two_processes_match_one(tmp_path, tiny_model_dir, launcher, extra):
    if launcher == "ram_efficient":  # the main process loads the weights, the other one starts on the meta device
        text = (REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text()
        launcher = str(tmp_path / "fsdp2_ram.yaml")
        Path(launcher).write_text(text.replace("fsdp_cpu_ram_efficient_loading: false",
                                               "fsdp_cpu_ram_efficient_loading: true"))
    args = run_args(tmp_path, tiny_model_dir, extra)
    one = launch(None, args, tmp_path, "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(launcher, args, tmp_path, "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_rows(tmp_path, "one"), train_rows(tmp_path, "two")
    assert [r["step"] for r in b] == [1, 2, 3]  # written once, not once per process
    bf16 = "model.dtype=bfloat16" in extra  # bf16 compute: sums in another order round differently
    rel, atol, weight_atol = (2e-2, 2e-5, 2 * 3 * 1e-3) if bf16 else (1e-4, 1e-6, 2e-5)  # (bf16: 2 Adam steps apart)
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/kl", "train/grad_norm", "train/completion_len", "train/lr",
                    "train/loss_tokens", "train/student_entropy", "train/teacher_entropy"):
            assert rb["metrics"][key] == pytest.approx(ra["metrics"][key], rel=rel, abs=atol), (ra["step"], key)
    if launcher != "ddp.yaml":  # FSDP2: each process wrote its own shards, nothing was gathered whole
        assert_sharded_checkpoint(latest_checkpoint(tmp_path / "runs" / "two"))
    else:  # DDP keeps the whole format; on resume the main process chooses the checkpoint, every process loads it
        state = json.loads((latest_checkpoint(tmp_path / "runs" / "two") / "state.json").read_text())
        assert sorted(state["files"]) == ["optimizer.pt", "rng.safetensors", "student.safetensors",
                                          "teacher.safetensors"]
        again = launch(launcher, args + ["resume=true"], tmp_path, "two")
        assert again.returncode == 0 and "resumed from step_00000003" in again.stderr, again.stderr[-3000:]
    # read in one process: a sharded checkpoint comes back as whole CPU tensors, like a one-process run's
    one_state = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "one")).tensors
    two_state = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "two")).tensors
    for group in ("student", "teacher"):
        assert one_state[group].keys() == two_state[group].keys()
        for name in one_state[group]:
            torch.testing.assert_close(two_state[group][name], one_state[group][name], rtol=1e-3, atol=weight_atol,
                                       msg=lambda m, n=name: f"{group} {n}: {m}")
    summary = (tmp_path / "runs" / "two" / "summary.md").read_text()
    assert ("DDP) over 2 processes" if launcher == "ddp.yaml" else "FSDP2 over 2 processes") in summary
    if extra == ["teacher.mode=ema"] and launcher == "fsdp2.yaml":  # export reads the sharded checkpoint too
        from safetensors.torch import load_file

        from sdft.export import export_run

        adapters = [load_file(str(export_run(tmp_path / "runs" / name, tmp_path / f"{name}_adapter", format="adapter")
                                  / "adapter_model.safetensors")) for name in ("one", "two")]
        assert adapters[0].keys() == adapters[1].keys() and adapters[0]
        for name in adapters[0]:
            torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=1e-3, atol=weight_atol)


def assert_sharded_checkpoint(folder: Path, world_size: int = 2) -> None:
    """`folder` holds one DCP shard file per process, each with about 1/world_size of the state, and no whole
    tensor or optimizer files; state.json says so and its manifest covers every shard."""
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == 3 and state["sharded"] == {"world_size": world_size}
    shards = sorted(p.name for p in (folder / "sharded").glob("*.distcp"))
    assert shards == [f"__{rank}_0.distcp" for rank in range(world_size)]
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.pt"))
    assert set(state["files"]) == {f"sharded/{name}" for name in shards} | {"sharded/.metadata"}
    sizes = [(folder / "sharded" / name).stat().st_size for name in shards]
    for size in sizes:  # (the main process also writes the small replicated entries: RNG, schedule, steps)
        assert 0.6 / world_size * sum(sizes) <= size <= 1.4 / world_size * sum(sizes), sizes


def test_a_deepspeed_launcher_config_is_a_clear_error(tmp_path, tiny_model_dir):
    config = tmp_path / "deepspeed.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\n"
                      "num_processes: 1\nmixed_precision: 'no'\ndeepspeed_config:\n  zero_stage: 3\n")
    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true"}
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", "/dev/null",
               *run_args(tmp_path, tiny_model_dir, [])]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "DeepSpeed, which sdft does not support" in proc.stderr and "configs/accelerate/fsdp2.yaml" in proc.stderr


@pytest.mark.parametrize("mode, teacher", [("full", "ema"), ("lora", "static")])
def test_fsdp2_shards_are_real_and_a_shared_evaluation_equals_one_process(tmp_path, mode, teacher):
    """Each process holds about half of the student's (and a full-fine-tuning teacher's) parameters; greedy
    completions decoded with the prompts shared out over the processes equal those of one process."""
    from sdft.backends.local import LocalBackend
    from sdft.config import StudentConfig, TeacherConfig
    from tests.tiny import build_tiny_llama, build_tiny_tokenizer

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), str(REPO / "tests" / "distributed_probe.py"), mode, teacher]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for share, memory in zip(report["shares"], report["memory"]):
        assert 0.4 * share["student_total"] <= share["student"] <= 0.6 * share["student_total"]
        if mode == "full":  # fp32 weights, and AdamW's two moments of the same size, all halved
            assert memory["student"] == 4 * share["student"] and memory["optimizer"] == 2 * memory["student"]
        if mode == "full":
            assert share["teacher_total"] == share["student_total"]
            assert 0.4 * share["teacher_total"] <= share["teacher"] <= 0.6 * share["teacher_total"]
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    backend = LocalBackend(model, tokenizer, student=StudentConfig(mode=mode, lora_rank=4),
                           teacher=TeacherConfig(mode=teacher))
    prompts = [tokenizer.encode(f"Question {k}: " + "word " * k) for k in range(7)]
    assert report["completions"] == backend.generate_greedy(prompts, 6, batch_size=2)


def test_kill_9_in_an_fsdp2_run_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    args = run_args(tmp_path, tiny_model_dir, ["student.mode=full", "teacher.mode=ema", "teacher.ema_alpha=0.5",
                                               "optim.max_steps=4", "checkpoint.every=1"])
    straight = launch("fsdp2.yaml", args, tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = subprocess.Popen(command_of("fsdp2.yaml", args, "killed"), env=ENV, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "runs" / "killed" / "checkpoints" / "step_00000002" / "state.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-2 checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    resumed = launch("fsdp2.yaml", args + ["resume=true"], tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = train_rows(tmp_path, "straight"), train_rows(tmp_path, "killed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key, value in ra["metrics"].items():
            if not key.endswith(("_time_s", "tokens_per_s")):
                assert rb["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (ra["step"], key)
    assert_sharded_checkpoint(latest_checkpoint(tmp_path / "runs" / "killed"))
    one = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "straight")).tensors
    two = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "killed")).tensors
    for group in ("student", "teacher"):
        assert one[group].keys() == two[group].keys() and one[group]
        for name in one[group]:
            assert torch.equal(two[group][name], one[group][name]), (group, name)

    # a damaged shard file: named by the manifest check, and the newest intact checkpoint is used instead
    shard = tmp_path / "runs" / "killed" / "checkpoints" / "step_00000004" / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000004/sharded/__1_0\.distcp: checksum mismatch"):
        load_checkpoint(shard.parents[1])
    loaded, damaged = load_latest_intact(tmp_path / "runs" / "killed")
    assert loaded.path.name == "step_00000003" and len(damaged) == 1 and "__1_0.distcp: checksum mismatch" in damaged[0]

    # a run that is not sharded cannot take it over; one FSDP2 process can: DCP reshards the two-process
    # checkpoint, and step 4 is the same
    with pytest.raises(ValueError, match="written sharded by an FSDP2 run of 2 processes; continue it as an FSDP2 run"):
        load_checkpoint(loaded.path, like=lambda: ({"student": {"w": torch.zeros(2)}}, {}))
    alone = command_of("fsdp2.yaml", args + ["resume=true"], "killed")
    alone[alone.index("--num_processes") + 1] = "1"
    resumed = subprocess.run(alone, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "damaged checkpoint skipped" in resumed.stderr and "resumed from step_00000003" in resumed.stderr
    rows = train_rows(tmp_path, "killed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/loss", "train/kl", "train/grad_norm", "train/loss_tokens"):
        assert rows[3]["metrics"][key] == pytest.approx(a[3]["metrics"][key], rel=1e-4, abs=1e-6), key
    assert_sharded_checkpoint(latest_checkpoint(tmp_path / "runs" / "killed"), world_size=1)
    alone_state = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "killed")).tensors
    for group in ("student", "teacher"):
        for name in one[group]:
            torch.testing.assert_close(alone_state[group][name], one[group][name], rtol=1e-3, atol=2e-5)
