"""logging.report_to: every number of metrics.jsonl reaches each tracker (accelerate.tracking) under the same
name at the same step, tested offline: TensorBoard event files, wandb's offline run file, trackio's local store
and an MLflow sqlite store."""
import glob
import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sdft.config import load_config
from sdft.logs import check_logging_requirements, metric_tag, read_metrics
from tests.test_cli import _tiny_args

REPO = Path(__file__).resolve().parents[1]
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")


def _expected(run: Path) -> set[tuple[str, int, float]]:
    """(name, step, value) of every number in metrics.jsonl."""
    return {(metric_tag(row["split"], key), row["step"], float(value))
            for row in read_metrics(run / "metrics.jsonl") for key, value in row["metrics"].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _same(found: set[tuple[str, int, float]], expected: set[tuple[str, int, float]], rel: float = 0.0) -> None:
    """The same (name, step) pairs with the same values (TensorBoard stores float32: rel=1e-6)."""
    got, want = {(n, s): v for n, s, v in found}, {(n, s): v for n, s, v in expected}
    assert len(got) == len(found) and sorted(got) == sorted(want)
    assert got == pytest.approx(want, rel=rel, abs=0)


def _tensorboard(run: Path) -> set[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {(tag, e.step, float(e.value)) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def _wandb(run: Path) -> set[tuple[str, int, float]]:
    """History rows of the offline run file: a LevelDB-style log (7-byte file header, 32 KiB blocks of chunks with
    a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, position, block, pending, found = Path(path).read_bytes(), 7, 32768, b"", set()
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                step = items.pop("_step", record.history.step.num)
                found |= {(k, step, float(v)) for k, v in items.items() if not k.startswith("_")}
    return found


def _trackio(folder: Path, project: str, run_name: str) -> set[tuple[str, int, float]]:
    with sqlite3.connect(folder / f"{project}.db") as db:
        rows = db.execute("select step, metrics from metrics where run_name = ?", (run_name,)).fetchall()
    return {(k, step, float(v)) for step, metrics in rows for k, v in json.loads(metrics).items()}


def _mlflow(uri: str, project: str) -> tuple[set[tuple[str, int, float]], dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(project).experiment_id])
    found = {(m.key, m.step, float(m.value)) for key in run.data.metrics
             for m in client.get_metric_history(run.info.run_id, key)}
    return found, run.data.params


def test_a_run_reaches_every_tracker_offline(tmp_path, tiny_model_dir):
    available = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
    if len(available) < len(TRACKERS):
        pytest.skip(f"tracker packages not installed: {sorted(set(TRACKERS) - set(available))} "
                    "(pip install 'sdft[trackers]')")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               TRACKIO_DIR=str(tmp_path / "trackio"), MLFLOW_TRACKING_URI=uri)
    args = _tiny_args(tmp_path, tiny_model_dir, "logging.report_to=[tensorboard, wandb, trackio, mlflow]",
                      "logging.project=sdft-test", "run_name=tracked", "optim.max_steps=2")
    done = subprocess.run([sys.executable, "-m", "sdft", "train", "--config", "quickstart", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tracked"
    expected = _expected(run)
    assert {name for name, _, _ in expected} >= {"train/loss", "train/kl", "val/bench/pass@1"}
    assert {step for _, step, _ in expected} == {0, 1, 2}
    _same(_tensorboard(run), expected, rel=1e-6)
    _same(_wandb(run), expected)
    _same(_trackio(tmp_path / "trackio", "sdft-test", "tracked"), expected)
    mlflow_metrics, params = _mlflow(uri, "sdft-test")
    _same(mlflow_metrics, {(name.replace("@", "_at_"), step, value) for name, step, value in expected})
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert float(params["optim.lr"]) == config.optim.lr and params["teacher.mode"] == config.teacher.mode  # flat


def test_missing_tracker_packages_are_named_before_the_run(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "matplotlib")
                        else real(name, *a))
    with pytest.raises(ValueError, match=r"logging.report_to includes wandb, which needs the package 'wandb': "
                                         r"pip install 'sdft\[wandb\]'"):
        check_logging_requirements(["tensorboard", "wandb"], plot=False)
    with pytest.raises(ValueError, match=r"logging.plot=true .* pip install 'sdft\[plots\]', or set logging.plot=false"):
        check_logging_requirements([], plot=True)
    check_logging_requirements(["tensorboard"], plot=False)


@pytest.mark.parametrize("overrides, trackers", [
    ([], ("tensorboard",)),
    (["logging.tensorboard=false"], ()),
    (["logging.report_to=[wandb, mlflow]"], ("wandb", "mlflow")),
    (["logging.report_to=[wandb]", "logging.tensorboard=true"], ("tensorboard", "wandb")),
    (["logging.report_to=[tensorboard, trackio]", "logging.tensorboard=false"], ("trackio",)),
])
def test_report_to_and_the_older_tensorboard_switch(overrides, trackers):
    assert load_config(None, ["data.path=x.jsonl", *overrides]).logging.trackers == trackers


def test_report_to_errors():
    with pytest.raises(ValueError, match=r"logging.report_to\[0\].*got 'comet'; allowed values: 'tensorboard', 'wandb'"):
        load_config(None, ["data.path=x.jsonl", "logging.report_to=[comet]"])
    with pytest.raises(ValueError, match="logging.report_to names wandb more than once"):
        load_config(None, ["data.path=x.jsonl", "logging.report_to=[wandb, wandb]"])
