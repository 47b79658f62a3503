"""Run outputs for people: metrics.jsonl, experiment trackers, learning-curve plots, summary.md and
progress bars.

Trackers (`logging.report_to`: tensorboard, wandb, trackio, mlflow) are accelerate's (`accelerate.tracking`),
started by `MetricsLogger` on the main process; every numeric metric of a metrics.jsonl row goes to each of
them under the same name at the same step (MLflow refuses '@' in a name: `pass@1` is `pass_at_1` there).
TensorBoard writes to `<run_dir>/tensorboard`, wandb to `<run_dir>/wandb` (online, or offline with
WANDB_MODE=offline), trackio to its local store (TRACKIO_DIR, default HF_HOME/trackio), MLflow to
MLFLOW_TRACKING_URI; wandb, trackio and MLflow also get the run's config as flat `section.key` parameters.

`metrics.jsonl` rows are `{"step": int, "split": str, "metrics": {key: value}}`. Keys carry their own
prefix (`train/loss`, `val/<benchmark>/pass@1`); a key without a `/` is shown as `<split>/<key>`.
A confidence interval is logged as `<prefix>/ci_low` and `<prefix>/ci_high` beside `<prefix>/pass@1`
(the keys of `sdft.evaluation.EvalResult.metrics`), or for any key `K` as `K_ci_low` and `K_ci_high`
(or `K_ci` = [low, high]); plots draw it as a band. `<prefix>/n` counts items and is not plotted.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import yaml

from sdft.io import atomic_write_bytes, atomic_write_jsonl, atomic_write_text

__all__ = ["MetricsLogger", "read_metrics", "plot_learning_curves", "write_summary", "ProgressBar",
           "metric_tag", "tracker_key", "check_logging_requirements", "TRACKER_PACKAGES"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_CI_SUFFIXES = ("_ci_low", "_ci_high", "_ci")
_NOT_PLOTTED = ("ci_low", "ci_high", "n")  # last key components that annotate a sibling metric


def metric_tag(split: str, key: str) -> str:
    """The display name of a metric: the key itself when it has a prefix, else `<split>/<key>`."""
    return key if "/" in key else f"{split}/{key}"


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""The package each tracker of logging.report_to imports (pip extras: sdft[tensorboard], [wandb], [trackio],
[mlflow], or all of them: sdft[trackers])."""


def tracker_key(tracker: str, tag: str) -> str:
    """The name of metric `tag` in `tracker`: the tag itself, except that MLflow gets '@' as '_at_'."""
    return tag.replace("@", "_at_") if tracker == "mlflow" else tag


def check_logging_requirements(report_to: Sequence[str], plot: bool) -> None:
    """A ValueError naming the setting and the pip extra when a package that the logging settings need is not
    installed (checked before a run starts, not when the first metric arrives)."""
    import importlib.util

    for name in report_to:
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"logging.report_to: unknown tracker {name!r}; allowed: {', '.join(TRACKER_PACKAGES)}")
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"logging.report_to includes {name}, which needs the package {package!r}: "
                             f"pip install 'sdft[{name}]' (or 'sdft[trackers]' for all trackers), or leave "
                             f"{name} out of logging.report_to")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("logging.plot=true draws learning_curves.png with matplotlib, which is not installed: "
                         "pip install 'sdft[plots]', or set logging.plot=false")


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} with scalars kept and lists or mappings of values as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            flat.update(_flat_config(value, name + "."))
        elif value is None or isinstance(value, (str, bool, int, float)):
            flat[name] = "null" if value is None else value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _start_tracker(name: str, run_dir: Path, *, run_name: str, project: str, purge_step: int | None,
                   config: Mapping[str, Any] | None):
    """An accelerate tracker, started (and given the config, except TensorBoard, whose run folder holds
    config.yaml already)."""
    from accelerate import PartialState
    from accelerate import tracking

    PartialState()  # accelerate's trackers log through accelerate.logging, which needs its state
    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker(TENSORBOARD_DIR, run_dir, purge_step=purge_step)
    elif name == "wandb":
        tracker = tracking.WandBTracker(project, name=run_name, dir=str(run_dir))
    elif name == "trackio":
        tracker = tracking.TrackioTracker(project, name=run_name)
    elif name == "mlflow":
        tracker = tracking.MLflowTracker(experiment_name=project, run_name=run_name)
    else:
        raise ValueError(f"logging.report_to: unknown tracker {name!r}; allowed: {', '.join(TRACKER_PACKAGES)}")
    tracker.start()
    if name != "tensorboard" and config is not None:
        tracker.store_init_configuration(_flat_config(config))
    return tracker


class MetricsLogger:
    """Appends metric rows to `<run_dir>/metrics.jsonl` (flushed and fsynced per row) and sends their numbers
    to the trackers named in `report_to` (see the module docstring); `run_name`, `project` and `config` (a
    nested dict, e.g. `config_to_dict(config)`) describe the run to the trackers.

    `resume_step=None` starts a fresh file. With `resume_step=N`, rows with step > N (written after the
    checkpoint being resumed) are dropped first by an atomic rewrite, and TensorBoard discards its events
    after step N, so a resumed run has no duplicate rows (the other trackers start a new run). `keep_at_resume_step`
    (a collection of splits) also drops the rows at step N of the other splits, for a run that logs step N
    again (a finished run evaluated again from its final checkpoint keeps its last train row and replaces its
    final evaluation); TensorBoard then discards its events from step N and the trackers get the kept rows of
    step N again.
    """

    def __init__(self, run_dir: str | os.PathLike, *, report_to: Sequence[str] = ("tensorboard",),
                 run_name: str | None = None, project: str = "sdft", config: Mapping[str, Any] | None = None,
                 resume_step: int | None = None, keep_at_resume_step: Collection[str] | None = None):
        if keep_at_resume_step is not None and resume_step is None:
            raise ValueError("MetricsLogger: keep_at_resume_step needs a resume_step")
        check_logging_requirements(report_to, plot=False)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            kept = [row for row in read_metrics(self.path) if row["step"] < resume_step or (
                row["step"] == resume_step and (keep_at_resume_step is None or row["split"] in keep_at_resume_step))
            ] if self.path.exists() else []
            atomic_write_jsonl(self.path, kept)
        self._file = open(self.path, "a", encoding="utf-8")
        purge = None if resume_step is None else resume_step + (keep_at_resume_step is None)
        self._trackers: dict[str, Any] = {}
        try:
            for name in report_to:
                self._trackers[name] = _start_tracker(name, self.run_dir, run_name=run_name or self.run_dir.name,
                                                      project=project, purge_step=purge, config=config)
        except BaseException:
            self.close()
            raise
        if keep_at_resume_step is not None:
            for row in kept:
                if row["step"] == resume_step:
                    self._send(row["step"], row["split"], row["metrics"])

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Append one row; its numbers (Python, NumPy or 0-d tensors) also go to the trackers."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"metrics step must be an int >= 0, got {step!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"metrics split must be a non-empty string, got {split!r}")
        if self._file is None:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        row_metrics = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"metric keys must be non-empty strings, got {key!r}")
            row_metrics[key] = _plain(value)
        try:
            line = json.dumps({"step": step, "split": split, "metrics": row_metrics})
        except TypeError as error:
            raise ValueError(f"metrics for step {step} are not JSON-serializable: {error}") from None
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._send(step, split, row_metrics)

    def _send(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        numbers = {metric_tag(split, key): value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if not numbers:
            return
        for name, tracker in self._trackers.items():
            tracker.log({tracker_key(name, tag): value for tag, value in numbers.items()}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self._trackers = getattr(self, "_trackers", {}), {}
        for tracker in trackers.values():
            tracker.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file. A last line cut short by a crash is ignored; any other malformed
    line is a ValueError naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no trailing newline: a write interrupted midway
                break
            raise ValueError(f"{path}:{number}: not a JSON row: {error.msg}") from None
        if (not isinstance(row, dict) or not isinstance(row.get("step"), int)
                or not isinstance(row.get("split"), str) or not isinstance(row.get("metrics"), dict)):
            raise ValueError(f"{path}:{number}: expected a row {{\"step\": int, \"split\": str, "
                             f"\"metrics\": {{...}}}}, got {line[:200]!r}")
        rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    """Python numbers from NumPy scalars and one-element tensors; other values unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ----------------------------------------------------------------------------------------------
# Plots


def _family(tag: str) -> str:
    """The panel a metric belongs to."""
    name = tag.rsplit("/", 1)[-1].lower()
    if "pass@" in name:
        return "pass@1" if name == "pass@1" else name
    if "entropy" in name:
        return "entropy"
    if name.endswith("_tokens"):  # counts such as loss_tokens get their own panel
        return name
    if "loss" in name or "kl" in name.split("_") or name.startswith("kl"):
        return "loss / KL"
    return name


def _is_annotation(key: str) -> bool:
    return key.endswith(_CI_SUFFIXES) or key.rsplit("/", 1)[-1] in _NOT_PLOTTED


def _series(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """Per tag: steps, values and the CI band (NaN where absent)."""
    series: dict[str, dict[str, list]] = {}
    for row in rows:
        metrics = row["metrics"]
        for key, value in metrics.items():
            if _is_annotation(key) or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            low, high = _interval(metrics, key)
            entry = series.setdefault(metric_tag(row["split"], key), {"step": [], "value": [], "low": [], "high": []})
            entry["step"].append(row["step"])
            entry["value"].append(float(value))
            entry["low"].append(math.nan if low is None else low)
            entry["high"].append(math.nan if high is None else high)
    return series


def _interval(metrics: Mapping[str, Any], key: str) -> tuple[float | None, float | None]:
    pair = metrics.get(f"{key}_ci")
    if isinstance(pair, (list, tuple)) and len(pair) == 2:
        return float(pair[0]), float(pair[1])
    candidates = [(f"{key}_ci_low", f"{key}_ci_high")]
    if key.endswith("/pass@1"):
        prefix = key[:-len("/pass@1")]
        candidates.append((f"{prefix}/ci_low", f"{prefix}/ci_high"))
    for low_key, high_key in candidates:
        low, high = metrics.get(low_key), metrics.get(high_key)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return float(low), float(high)
    return None, None


def plot_learning_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Draw one panel per metric family (loss/KL, entropies, pass@1 with CI bands, then any other
    numeric metric) against the optimizer step, and write the PNG atomically. Returns `png_path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = _series(read_metrics(metrics_path))
    order = {"loss / KL": 0, "entropy": 1, "pass@1": 2}
    families: dict[str, list[str]] = {}
    for tag in series:
        families.setdefault(_family(tag), []).append(tag)
    names = sorted(families, key=lambda name: (order.get(name, 3), name))
    columns = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(5.0 * columns, 3.6 * rows), dpi=100)
    FigureCanvasAgg(figure)
    if not names:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
    for index, name in enumerate(names):
        axis = figure.add_subplot(rows, columns, index + 1)
        for tag in sorted(families[name]):
            entry = series[tag]
            order_by_step = sorted(range(len(entry["step"])), key=lambda i: entry["step"][i])
            steps = [entry["step"][i] for i in order_by_step]
            values = [entry["value"][i] for i in order_by_step]
            marker = "o" if len(steps) < 30 else None
            (line,) = axis.plot(steps, values, label=tag, marker=marker, markersize=3)
            lows = [entry["low"][i] for i in order_by_step]
            highs = [entry["high"][i] for i in order_by_step]
            if any(not math.isnan(low) for low in lows):
                axis.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(png_path, buffer.getvalue())
    return Path(png_path)


# ----------------------------------------------------------------------------------------------
# Summary


def _score(value: Any) -> tuple[float | None, float | None, float | None, Any]:
    """(score, ci_low, ci_high, n) from a number, an object with `pass_at_1`, `ci_low`, `ci_high`, `n`
    (`sdft.evaluation.EvalResult`), or a mapping with "pass@1"/"score"/"value" and optional
    "ci_low"/"ci_high" (or "ci": [low, high]) and "n"."""
    if value is None:
        return None, None, None, None
    if hasattr(value, "pass_at_1"):
        value = {"pass@1": value.pass_at_1, "ci_low": getattr(value, "ci_low", None),
                 "ci_high": getattr(value, "ci_high", None), "n": getattr(value, "n", None)}
    if isinstance(value, Mapping):
        score = next((value[key] for key in ("pass@1", "score", "value") if key in value), None)
        low, high = value.get("ci_low"), value.get("ci_high")
        if isinstance(value.get("ci"), (list, tuple)) and len(value["ci"]) == 2:
            low, high = value["ci"]
        return (None if score is None else float(score), None if low is None else float(low),
                None if high is None else float(high), value.get("n"))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value), None, None, None
    raise ValueError(f"a summary score must be a number or a mapping with 'pass@1', got {value!r}")


def _cell(score: float | None, low: float | None, high: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.4f} [{low:.4f}, {high:.4f}]" if low is not None and high is not None else f"{score:.4f}"


def write_summary(path: str | os.PathLike, *, title: str, config: Mapping[str, Any],
                  scores_before: Mapping[str, Any], scores_after: Mapping[str, Any],
                  notes: Sequence[str] = (), extra_sections: Mapping[str, str] | None = None) -> Path:
    """Write a markdown summary atomically: the title, a before/after table (score [CI low, CI high],
    the change after - before, and n where given), the notes, any extra sections, and the config as
    YAML. Scores are numbers, EvalResults or mappings (see `_score`); a missing side shows as "-"."""
    lines = [f"# {title}", "", "## Scores", ""]
    names = list(scores_before) + [name for name in scores_after if name not in scores_before]
    if names:
        lines += ["| metric | before | after | change | n |", "|---|---|---|---|---|"]
        for name in names:
            before, before_low, before_high, before_n = _score(scores_before.get(name))
            after, after_low, after_high, after_n = _score(scores_after.get(name))
            delta = f"{after - before:+.4f}" if before is not None and after is not None else "-"
            n = after_n if after_n is not None else before_n
            lines.append(f"| {name} | {_cell(before, before_low, before_high)} | "
                         f"{_cell(after, after_low, after_high)} | {delta} | {'-' if n is None else n} |")
    else:
        lines.append("No scores.")
    paired = _paired_rows(names, scores_before, scores_after)
    if paired:
        lines += ["", "## Paired change on the same items", "",
                  "| metric | gained | lost | exact McNemar p |", "|---|---|---|---|"] + paired
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    for heading, body in (extra_sections or {}).items():
        lines += ["", f"## {heading}", "", body.rstrip("\n")]
    config_text = yaml.safe_dump(_plain_tree(config), sort_keys=False, allow_unicode=True, width=100)
    lines += ["", "## Config", "", "```yaml", config_text.rstrip("\n"), "```", ""]
    atomic_write_text(path, "\n".join(lines))
    return Path(path)


def _paired_rows(names: Sequence[str], before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """A table row per metric whose two sides carry per-item outcomes (`per_item`) on the same items:
    items gained (0 -> 1), lost (1 -> 0), and the exact McNemar p-value (`sdft.stats.mcnemar_exact`)."""
    from sdft.stats import mcnemar_exact

    rows = []
    for name in names:
        left, right = getattr(before.get(name), "per_item", None), getattr(after.get(name), "per_item", None)
        if left and right and len(left) == len(right):
            test = mcnemar_exact(left, right)
            rows.append(f"| {name} | {test.gained} | {test.lost} | {test.p_value:.3g} |")
    return rows


def _plain_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------
# Progress


class ProgressBar:
    """A tqdm bar with elapsed time, ETA and rate; `update(n, loss=..., ...)` advances it and shows the
    keyword values. With `enabled=False` nothing is drawn and updates only count."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", *, enabled: bool = True,
                 file: Any = None):
        self.total = total
        self.n = initial
        self.enabled = enabled
        self._desc = desc
        self._file = file
        self._bar = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=self._desc, file=self._file,
                             dynamic_ncols=True, smoothing=0.1)
        return self

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({key: _short(value) for key, value in postfix.items()}, refresh=False)
            self._bar.update(n)

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return value
