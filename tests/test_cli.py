"""The `sdft` command as a user runs it: every config key in `--help`, shipped configs by name, `python -m sdft`
and `accelerate launch -m sdft` training, and one-line errors with exit status 2."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdft.cli import main
from sdft.config import config_to_dict, load_config, resolve_config_path, shipped_config_names
from sdft.logs import read_metrics
from sdft.schema import schema_rows
from tests.test_loop import _write_data

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("TINKER_API_KEY", None)
    return env


def _tiny_args(tmp_path, model_dir, *extra):
    data, bench = _write_data(tmp_path)
    return [f"model.name={model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}", "optim.batch_size=2",
            "optim.micro_batch_size=2", "optim.max_steps=1", "generation.max_new_tokens=6", "student.lora_rank=4",
            "teacher.mode=static", "logging.report_to=[]", "logging.plot=false", "logging.progress=false",
            "objective.skip_first_n_tokens=1",
            "eval.benchmarks=[{name: bench, kind: tasks, path: " + str(bench) + ", max_new_tokens: 4}]", *extra]


def test_train_help_lists_every_key_with_type_and_default():
    from sdft.config import Config

    done = subprocess.run([sys.executable, "-m", "sdft", "train", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    rows = schema_rows(Config)
    listed = [line.split(" = ")[0].strip() for line in done.stdout.splitlines() if " = " in line and "    (" in line]
    assert listed == [key for key, _, _, _ in rows]
    text = " ".join(done.stdout.split())
    assert "data.kind = jsonl (one of 'jsonl', 'messages', 'prompt_completion', 'privileged_context'" in text
    assert "logging.report_to = [tensorboard] (a list of one of 'tensorboard', 'wandb', 'trackio', 'mlflow')" in text
    assert "eval.benchmarks[i].max_new_tokens = 256 (int (>= 1))" in text


def test_config_command_lists_keys_and_resolves_a_shipped_config(capsys):
    assert main(["config"]) == 0
    assert "optim.lr = 2.0e-05    (float (> 0))" in capsys.readouterr().out
    assert main(["config", "--shipped"]) == 0
    assert capsys.readouterr().out.split() == shipped_config_names()
    assert {"quickstart", "tooluse", "science", "tinker_tooluse", "ablation_tooluse"} <= set(shipped_config_names())
    assert main(["config", "--config", "quickstart", "optim.lr=1e-3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config_to_dict(load_config(REPO / "configs" / "quickstart.yaml", ["optim.lr=1e-3"]))
    assert shown["optim"]["lr"] == 1e-3


def test_shipped_names_resolve_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names work from any folder
    assert resolve_config_path("quickstart") == resolve_config_path("quickstart.yaml")
    assert resolve_config_path("quickstart").parent.name == "configs"
    assert load_config("quickstart") == load_config(REPO / "configs" / "quickstart.yaml")
    (tmp_path / "quickstart").write_text("seed: 7\ndata: {path: x.jsonl}\n")
    assert load_config("quickstart").seed == 7  # a file of that name wins
    with pytest.raises(FileNotFoundError, match=r"config 'quickstrat' is neither a file nor a shipped config; "
                                                r"shipped configs: .*quickstart"):
        load_config("quickstrat")


def test_errors_are_one_line_with_status_2(capsys, tmp_path):
    assert main(["validate", "--config", "quickstart", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'optim.lrr'") and "did you mean 'optim.lr'" in err
    assert main(["evaluate", "--config", "quickstart", "--checkpoint", "step_1"]) == 2
    assert "--checkpoint needs --run" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--format", "adapter", str(tmp_path / "out")]) == 2
    assert "holds no config.yaml: not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--run", str(tmp_path), "--format", "gguf", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err


def test_python_m_sdft_trains_and_the_script_wrapper_still_works(tmp_path, tiny_model_dir):
    args = _tiny_args(tmp_path, tiny_model_dir)
    done = subprocess.run([sys.executable, "-m", "sdft", "train", "--config", "quickstart", *args, "run_name=cli"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {tmp_path / 'runs' / 'cli'}" in done.stdout and "bench: pass@1" in done.stdout
    wrapped = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", "quickstart", *args,
                              "run_name=script", "--validate"], capture_output=True, text=True, cwd=tmp_path,
                             env=_env(), timeout=600)
    assert wrapped.returncode == 0, wrapped.stderr[-3000:]
    assert "config: ok (sdft" in wrapped.stdout and "logging: ok (trackers: none; plot off)" in wrapped.stdout
    assert "data: ok (" in wrapped.stdout and "benchmark bench: ok (3 items)" in wrapped.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "cli" / "metrics.jsonl") if r["split"] == "train"] == [1]


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_accelerate_launch_module(tmp_path, tiny_model_dir):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run([*launcher, "-m", "sdft", "train", "--config", "quickstart",
                           *_tiny_args(tmp_path, tiny_model_dir), "run_name=launched", "eval.before_training=false"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "launched"
    assert (run / "summary.md").is_file() and (run / "checkpoints" / "latest").is_file()
