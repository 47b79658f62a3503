"""Aggregate finished cells into markdown tables with 95% intervals, and draw the result plots.

Scores of a group of cells (one method over S seeds) form a [S, items] 0/1 matrix on the same items;
its interval is the hierarchical bootstrap of `sdft.stats.bootstrap_mean_ci` (seeds, then items), and a
difference between two groups is the paired bootstrap over the same seeds and items. Values are percent.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdft.experiments.cells import CellResult
from sdft.stats import bootstrap_mean_ci, paired_difference_ci, paired_ratio_ci

Interval = tuple[float, float, float]  # (estimate, low, high)


def score_matrix(results: Sequence[CellResult], benchmark: str) -> np.ndarray:
    """[len(results), items] outcomes of `benchmark`, one row per cell in the given order."""
    rows = [r.scores[benchmark] for r in results]
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"benchmark {benchmark!r}: the cells were scored on different numbers of items "
                         f"{[len(row) for row in rows]}; rerun them with the same benchmark settings")
    return np.asarray(rows, dtype=np.float64)


def mean_ci(results: Sequence[CellResult], benchmark: str) -> Interval:
    return bootstrap_mean_ci(score_matrix(results, benchmark))


def difference_ci(a: Sequence[CellResult], b: Sequence[CellResult], benchmark: str) -> Interval:
    """mean(a) - mean(b); `b` may be a single cell (the base model), repeated to a's seeds."""
    left, right = score_matrix(a, benchmark), score_matrix(b, benchmark)
    if right.shape[0] == 1 and left.shape[0] > 1:
        right = np.repeat(right, left.shape[0], axis=0)
    return paired_difference_ci(left, right)


def ratio_ci(a: Sequence[CellResult], b: Sequence[CellResult], benchmark: str) -> Interval:
    return paired_ratio_ci(score_matrix(a, benchmark), score_matrix(b, benchmark))


def fmt(interval: Interval, *, signed: bool = False, scale: float = 100.0) -> str:
    """'68.0 [59.8, 75.3]' (percent); 'n/a' for NaN."""
    mean, low, high = (v * scale for v in interval)
    if math.isnan(mean):
        return "n/a"
    sign = "+" if signed and mean >= 0 else ""
    return f"{sign}{mean:.1f} [{low:.1f}, {high:.1f}]"


def per_seed(results: Sequence[CellResult], benchmark: str) -> str:
    return " / ".join(f"{100 * r.accuracy(benchmark):.1f}" for r in results)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(path: str | Path, groups: Mapping[str, Mapping[str, Interval]], *, titles: Mapping[str, str],
              title: str, reference: Mapping[str, float] | None = None) -> Path:
    """One panel per benchmark; a bar per group with its 95% interval; an optional dashed reference line
    per panel (the base model)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(titles)
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.2 * len(benchmarks), 3.8), squeeze=False)
    labels = list(groups)
    for ax, bench in zip(axes[0], benchmarks):
        values = [groups[g][bench] for g in labels]
        means = [100 * v[0] for v in values]
        errors = [[100 * (v[0] - v[1]) for v in values], [100 * (v[2] - v[0]) for v in values]]
        ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="#4c72b0")
        top = max([100 * v[2] for v in values] + [100 * reference[bench] if reference and bench in reference else 0])
        ax.set_ylim(0, max(10.0, 1.3 * top))  # head room for the legend; an all-zero panel still has an axis
        if reference is not None and bench in reference:
            ax.axhline(100 * reference[bench], color="gray", linestyle="--", label="base model")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("pass@1 (%), 95% CI")
        ax.set_title(titles[bench])
    return _save(fig, path, title)


def _save(fig, path: str | Path, title: str) -> Path:
    """Title, lay out and write the figure atomically (temporary file, then rename)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def stage_plot(path: str | Path, series: Mapping[str, Sequence[Mapping[str, Interval]]], *,
               stages: Sequence[str], titles: Mapping[str, str], title: str) -> Path:
    """One panel per benchmark: accuracy after each stage (x) for every series (method at a lr)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(titles)
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.6 * len(benchmarks), 3.8), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks):
        for offset, (label, points) in enumerate(series.items()):
            xs = np.arange(len(points)) + 0.04 * (offset - len(series) / 2)
            means = [100 * p[bench][0] for p in points]
            errors = [[100 * (p[bench][0] - p[bench][1]) for p in points],
                      [100 * (p[bench][2] - p[bench][0]) for p in points]]
            ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=label)
        top = max(100 * p[bench][2] for points in series.values() for p in points)
        ax.set_ylim(0, max(10.0, 1.3 * top))
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, fontsize=8)
        ax.set_ylabel("pass@1 (%), 95% CI")
        ax.set_title(titles[bench])
    axes[0][0].legend(fontsize=8)
    return _save(fig, path, title)
