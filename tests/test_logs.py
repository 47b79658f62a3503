import io
import math

import numpy as np
import pytest
import torch

from sdft.logs import (MetricsLogger, ProgressBar, _series, metric_tag, plot_learning_curves, read_metrics,
                       write_summary)


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_rows_are_appended_and_read_back(tmp_path):
    with MetricsLogger(tmp_path, report_to=()) as logger:
        logger.log(1, "train", {"train/loss": torch.tensor(0.5), "tokens": np.int64(12)})
        logger.log(1, "val", {"val/capitals/pass@1": 0.25, "val/capitals/pass@1_ci": (0.1, 0.4)})
        # each row is on disk before the next call, not only at close
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "split": "train", "metrics": {"train/loss": 0.5, "tokens": 12}},
                    {"step": 1, "split": "val", "metrics": {"val/capitals/pass@1": 0.25,
                                                            "val/capitals/pass@1_ci": [0.1, 0.4]}}]
    assert not (tmp_path / "tensorboard").exists()


def test_resume_drops_rows_after_the_checkpoint_and_tensorboard_has_no_duplicates(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, "train", {"loss": float(step)})
    with MetricsLogger(tmp_path, resume_step=3) as logger:
        assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, "train", {"loss": 10.0 * step})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(row["step"], row["metrics"]["loss"]) for row in rows] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(path.stat().st_size > 0 for path in events)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_resume_at_the_final_step_replaces_its_evaluation_rows_only(tmp_path):
    """A finished run evaluated again: the last train row stays, the final evaluation is replaced."""
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, "val", {"val/b/pass@1": 0.1})
        for step in (1, 2):
            logger.log(step, "train", {"loss": float(step)})
        logger.log(2, "val", {"val/b/pass@1": 0.5})
    with MetricsLogger(tmp_path, resume_step=2, keep_at_resume_step=("train",)) as logger:
        assert [(r["step"], r["split"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
            (0, "val"), (1, "train"), (2, "train")]
        logger.log(2, "val", {"val/b/pass@1": 0.75})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(0, "val"), (1, "train"), (2, "train"), (2, "val")]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0)]
    assert scalars["val/b/pass@1"] == [(0, pytest.approx(0.1)), (2, 0.75)]
    with pytest.raises(ValueError, match="keep_at_resume_step needs a resume_step"):
        MetricsLogger(tmp_path, keep_at_resume_step=("train",))


def test_a_fresh_logger_starts_a_new_file(tmp_path):
    with MetricsLogger(tmp_path, report_to=()) as logger:
        logger.log(1, "train", {"loss": 1.0})
    with MetricsLogger(tmp_path, report_to=()) as logger:
        logger.log(1, "train", {"loss": 2.0})
    assert [row["metrics"]["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [2.0]


def test_tensorboard_tags_keep_prefixed_keys(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(2, "val", {"val/tooluse/pass@1": 0.5, "pass@1": 0.25, "note": "text is kept out"})
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"val/tooluse/pass@1": [(2, 0.5)], "val/pass@1": [(2, 0.25)]}
    assert metric_tag("train", "loss") == "train/loss" and metric_tag("train", "val/x") == "val/x"


def test_read_metrics_tolerates_a_cut_last_line_and_rejects_bad_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "metrics": {"loss": 1.0}}\n{"step": 2, "spl')
    assert [row["step"] for row in read_metrics(path)] == [1]
    with MetricsLogger(tmp_path, report_to=(), resume_step=5) as logger:
        logger.log(2, "train", {"loss": 2.0})
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "split": "train", "metrics": {}}\nnot json\n'
                    '{"step": 2, "split": "t", "metrics": {}}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON row"):
        read_metrics(path)
    path.write_text('{"step": "one", "split": "train", "metrics": {}}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected a row"):
        read_metrics(path)


def test_log_rejects_bad_input(tmp_path):
    logger = MetricsLogger(tmp_path, report_to=())
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        logger.log(-1, "train", {})
    with pytest.raises(ValueError, match="split must be a non-empty string"):
        logger.log(1, "", {})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        logger.log(1, "train", {"x": object()})
    logger.close()
    with pytest.raises(ValueError, match="is closed"):
        logger.log(1, "train", {"loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_plot_learning_curves_writes_a_png(tmp_path):
    with MetricsLogger(tmp_path, report_to=()) as logger:
        for step in range(1, 11):
            logger.log(step, "train", {"train/loss": 1 / step, "train/kl": 0.5 / step,
                                       "train/student_entropy": 2.0, "train/teacher_entropy": 1.5,
                                       "train/lr": 1e-5, "train/grad_norm": math.nan})
            if step % 5 == 0:
                logger.log(step, "val", {"val/a/pass@1": step / 20, "val/a/pass@1_ci_low": step / 40,
                                         "val/a/pass@1_ci_high": step / 10})
                logger.log(step, "val", {"val/b/pass@1": step / 30, "val/b/ci_low": step / 60,
                                         "val/b/ci_high": step / 15, "val/b/n": 97})
    series = _series(read_metrics(tmp_path / "metrics.jsonl"))
    assert "val/b/n" not in series and "val/b/ci_low" not in series and "val/a/pass@1_ci_low" not in series
    assert series["val/a/pass@1"]["low"] == [0.125, 0.25] and series["val/b/pass@1"]["high"] == [5 / 15, 10 / 15]
    assert all(math.isnan(low) for low in series["train/loss"]["low"])
    png = plot_learning_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from matplotlib.image import imread

    height, width = imread(str(png)).shape[:2]
    assert width == 1500 and height == 720  # 5 panels (loss/KL, entropy, pass@1, grad_norm, lr): 3 x 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_learning_curves(empty, tmp_path / "empty.png").stat().st_size > 0


def test_write_summary(tmp_path):
    path = write_summary(
        tmp_path / "summary.md", title="SDFT on tool use",
        config={"loss": {"kind": "forward"}, "optim": {"lr": 2e-5}},
        scores_before={"tooluse": {"pass@1": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 97}, "science": 0.3},
        scores_after={"tooluse": {"pass@1": 0.6804, "ci": [0.58, 0.77], "n": 97}, "science": 0.25,
                      "heldout": 0.9},
        notes=["tool-use scoring: strict", "single run"], extra_sections={"Timing": "12 s per step"})
    text = path.read_text()
    assert text.startswith("# SDFT on tool use\n")
    assert "| metric | before | after | change | n |" in text
    assert "| tooluse | 0.5000 [0.4000, 0.6000] | 0.6804 [0.5800, 0.7700] | +0.1804 | 97 |" in text
    assert "| science | 0.3000 | 0.2500 | -0.0500 | - |" in text
    assert "| heldout | - | 0.9000 | - | - |" in text
    assert "## Notes\n\n- tool-use scoring: strict\n- single run\n" in text
    assert "## Timing\n\n12 s per step\n" in text
    assert "```yaml\nloss:\n  kind: forward\noptim:\n  lr: 2.0e-05\n```" in text
    from types import SimpleNamespace

    result = SimpleNamespace(pass_at_1=0.75, ci_low=0.5, ci_high=0.9, n=20)  # an EvalResult's fields
    text = write_summary(tmp_path / "s2.md", title="t", config={}, scores_before={"x": 0.5},
                         scores_after={"x": result}, notes=[]).read_text()
    assert "| x | 0.5000 | 0.7500 [0.5000, 0.9000] | +0.2500 | 20 |" in text
    with pytest.raises(ValueError, match="a summary score must be a number"):
        write_summary(tmp_path / "bad.md", title="x", config={}, scores_before={"a": "high"}, scores_after={},
                      notes=[])
    assert not (tmp_path / "bad.md").exists()


def test_progress_bar_shows_eta_and_postfix():
    stream = io.StringIO()
    with ProgressBar(10, initial=2, desc="train", file=stream) as bar:
        bar.update(3, loss=0.123456, step=5)
        bar.update()
    assert bar.n == 6
    text = stream.getvalue()
    assert "train" in text and "6/10" in text and "loss=0.1235" in text and "step=5" in text
    assert "<" in text  # elapsed<remaining


def test_disabled_progress_bar_draws_nothing(capsys):
    with ProgressBar(4, enabled=False) as bar:
        bar.update(2, loss=1.0)
    assert bar.n == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
