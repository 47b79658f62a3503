"""backend.kind=tinker through the runner and scripts/train.py, on the offline Tinker service with a tiny
model: complete run folders, exact resume from a checkpoint, the shipped tinker_tooluse.yaml, and the
config rules and errors of the Tinker path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tinker")

from sdft.config import load_config  # noqa: E402
from sdft.logs import read_metrics  # noqa: E402
from sdft.runner import train_from_config  # noqa: E402
from tests.test_loop import _write_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = ["data.path=x.jsonl"]


def _tinker_config(tmp_path: Path, model_dir: str, *overrides: str):
    data, bench = _write_data(tmp_path)
    base = [
        "backend.kind=tinker", "backend.tinker_service=offline", "backend.tinker_base_model=tiny/llama",
        "backend.tinker_lora_rank=4", f"model.name={model_dir}", f"data.path={data}",
        f"output_dir={tmp_path / 'runs'}", "run_name=tinker", "teacher.mode=static", "objective.targets=topk",
        "objective.topk.k=8", "objective.reduction=sum", "objective.is_clip=null", "objective.skip_first_n_tokens=1",
        "optim.batch_size=4", "optim.micro_batch_size=4", "optim.max_steps=2", "optim.lr=1e-2",
        "optim.beta2=0.95", "optim.schedule=constant", "optim.max_grad_norm=null", "generation.max_new_tokens=8",
        "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 4}]",
        "logging.tensorboard=false", "logging.progress=false",
    ]
    return load_config(None, base + list(overrides))


def test_shipped_tinker_config_mirrors_the_cookbook_tooluse_command():
    config = load_config(REPO / "configs" / "tinker_tooluse.yaml")
    assert config.backend.kind == "tinker" and config.backend.tinker_service == "remote"
    assert config.backend.tinker_base_model == "Qwen/Qwen3.5-35B-A3B" and config.backend.tinker_lora_rank == 64
    assert (config.objective.targets, config.objective.topk.k, config.objective.topk.normalize, config.objective.reduction,
            config.objective.skip_first_n_tokens, config.objective.is_clip) == ("topk", 20, "renormalize", "sum", 3, None)
    assert (config.optim.lr, config.optim.beta1, config.optim.beta2, config.optim.eps) == (5e-4, 0.9, 0.95, 1e-8)
    assert config.optim.batch_size == 128 and config.optim.schedule == "constant"
    assert config.optim.max_grad_norm is None and config.teacher.mode == "static"
    assert config.generation.max_new_tokens == 2048 and config.teacher.template == "cookbook"


@pytest.mark.parametrize("overrides, expected", [
    (["objective.targets=topk", "teacher.mode=static", "objective.temperature=0.7"],
     r"objective.temperature=0.7: .*at temperature 1.*allowed: objective.temperature=1.0"),
    (["objective.targets=topk", "teacher.mode=static", "backend.tinker_service=local"],
     r"backend.tinker_service .*got 'local'; allowed values: 'remote', 'offline'"),
])
def test_tinker_config_rules(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, DATA + ["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B"] + overrides)


def test_reverse_topk_kl_needs_renormalized_targets():
    with pytest.raises(ValueError, match=r"objective.topk.kind=reverse_kl .*allowed: objective.topk.normalize=renormalize"):
        load_config(None, DATA + ["objective.targets=topk", "objective.topk.kind=reverse_kl", "objective.topk.normalize=tail"])
    assert load_config(None, DATA + ["objective.targets=topk", "objective.topk.kind=reverse_kl"]).objective.topk.kind == "reverse_kl"


def test_remote_service_without_api_key_stops_before_loading_anything(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    config = _tinker_config(tmp_path, tiny_model_dir, "backend.tinker_service=remote")
    with pytest.raises(ValueError, match=r"TINKER_API_KEY is not set"):
        train_from_config(config)
    assert not (tmp_path / "runs" / "tinker").exists()


def _train_rows(run_dir: Path) -> list[dict]:
    keys = ("train/loss", "train/kl", "train/completion_len", "train/lr", "train/loss_tokens")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    return [{"step": r["step"], **{k: r["metrics"][k] for k in keys}} for r in rows]


def test_offline_tinker_run_writes_a_complete_run_folder_and_resumes_exactly(tmp_path, tiny_model_dir):
    common = ["optim.max_steps=4", "checkpoint.every=1", "teacher.mode=sync", "teacher.sync_every=2",
              "eval.before_training=false"]
    (tmp_path / "a").mkdir()
    straight = _tinker_config(tmp_path / "a", tiny_model_dir, *common)
    result = train_from_config(straight)
    run = result.run_dir
    expected = _train_rows(run)
    assert [r["step"] for r in expected] == [1, 2, 3, 4] and all(r["train/loss"] > 0 for r in expected)
    assert "val/bench/pass@1" in [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"][-1]["metrics"]
    for name in ("summary.md", "config.yaml", "learning_curves.png", "predictions/bench.jsonl"):
        assert (run / name).exists(), name
    assert "Tinker (offline service)" in (run / "summary.md").read_text()
    assert list((run / "tinker_offline").glob("run-*/weights/sdft-state-000004/adapter.safetensors"))

    (tmp_path / "b").mkdir()
    interrupted = _tinker_config(tmp_path / "b", tiny_model_dir, *common)
    assert train_from_config(interrupted, stop_after=3).steps == 3  # the step-2 teacher sync is in its checkpoint
    from sdft.config import apply_overrides

    resumed = apply_overrides(interrupted, ["resume=true"])
    train_from_config(resumed)
    got = _train_rows(Path(resumed.output_dir) / "tinker")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, expected):
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)


def test_sft_baseline_runs_on_the_tinker_backend(tmp_path, tiny_model_dir):
    config = _tinker_config(tmp_path, tiny_model_dir, "algorithm=sft", "eval.benchmarks=[]")
    rows = _train_rows_sft(train_from_config(config).run_dir)
    assert len(rows) == 2 and all(0 < loss < 50 for loss in rows)  # token-mean cross-entropy, finite


def _train_rows_sft(run_dir: Path) -> list[float]:
    return [r["metrics"]["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_train_script_runs_the_tinker_config_offline_and_names_a_missing_key(tmp_path, tiny_model_dir):
    data, bench = _write_data(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TINKER_API_KEY"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    tiny = [f"model.name={tiny_model_dir}", "data.kind=jsonl", f"data.path={data}", "data.fallback_path=null",
            "data.split=none", f"output_dir={tmp_path / 'runs'}", "optim.batch_size=2", "optim.micro_batch_size=2",
            "optim.max_steps=1", "generation.max_new_tokens=6", "logging.tensorboard=false", "logging.progress=false",
            "backend.tinker_lora_rank=4", "eval.before_training=false",
            "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 4}]"]
    script = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "tinker_tooluse.yaml")]
    run = subprocess.run(script + tiny + ["backend.tinker_service=offline"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "run folder:" in run.stdout and "bench: pass@1" in run.stdout
    assert (tmp_path / "runs" / "tinker_tooluse" / "summary.md").exists()
    validate = subprocess.run(script + tiny + ["--validate"], capture_output=True, text=True, env=env)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "backend tinker" in validate.stdout and "TINKER_API_KEY NOT set" in validate.stdout
    remote = subprocess.run(script + tiny + ["run_name=remote"], capture_output=True, text=True, env=env)
    assert remote.returncode == 2 and "TINKER_API_KEY is not set" in remote.stderr
