"""Cells: one resumable run folder per (method, seed, ...) of an experiment, and the loop that runs them.

A cell's folder holds its run (config.yaml, metrics.jsonl, checkpoints, predictions, summary.md) and,
once it has finished, `cell.json` with its per-item scores. Running an experiment again skips cells with
a `cell.json` and resumes an interrupted cell from its last checkpoint (the run config has resume=true).
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sdft.config import Config, config_to_dict, load_config
from sdft.io import atomic_write_json

RESULT_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    """One run of an experiment.

    config: the full run config (its output_dir/run_name is the cell folder, resume=true).
    meta: what the tables group by (method, seed, lr, stage, ...), stored with the result.
    train: False evaluates the starting model only (the base-model row).
    export: after training, also save the merged student to <cell>/export (the next stage's model).
    """

    name: str
    config: Config
    meta: dict = field(default_factory=dict)
    train: bool = True
    export: bool = False

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir) / self.config.run_name


@dataclass(frozen=True)
class CellResult:
    """Per-benchmark outcomes of a finished cell: scores[benchmark] = list of 0/1 per item."""

    name: str
    meta: dict
    scores: dict[str, list[int]]
    wall_s: float

    def accuracy(self, benchmark: str) -> float:
        items = self.scores[benchmark]
        return sum(items) / len(items)


def read_result(cell: Cell) -> CellResult | None:
    path = cell.folder / RESULT_FILE
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return CellResult(name=row["name"], meta=row["meta"], scores={k: list(v) for k, v in row["scores"].items()},
                      wall_s=float(row["wall_s"]))


def run_cell(cell: Cell, *, train_fn: Callable | None = None, export_fn: Callable | None = None) -> CellResult:
    """Train (or only evaluate) one cell and write its cell.json; `train_fn(config, stop_after=...)` and
    `export_fn(run_dir, out_dir)` default to sdft.runner.train_from_config and sdft.export.export_student."""
    if train_fn is None:
        from sdft.runner import train_from_config as train_fn
    if export_fn is None:
        from sdft.export import export_student as export_fn
    start = time.perf_counter()
    if cell.train:
        result = train_fn(cell.config)
        scores = result.scores_after
    else:
        result = train_fn(cell.config, stop_after=0)
        scores = result.scores_before
    if not scores:
        raise ValueError(f"cell {cell.name}: the run produced no evaluation (check eval.benchmarks)")
    if cell.export:
        export_fn(cell.folder, cell.folder / "export")
    out = CellResult(name=cell.name, meta=dict(cell.meta),
                     scores={name: [int(x) for x in r.per_item] for name, r in scores.items()},
                     wall_s=time.perf_counter() - start)
    atomic_write_json(cell.folder / RESULT_FILE, {"name": out.name, "meta": out.meta, "scores": out.scores,
                                                   "wall_s": out.wall_s})
    return out


def run_cells(cells: Sequence[Cell], *, log: Callable[[str], None] = print, **run_kwargs) -> dict[str, CellResult]:
    """Run every cell not yet finished, in order, with a progress line per cell (index, name, time left).

    The time left is the mean wall time of the cells run so far in this call times the cells still to run.
    """
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"cell names must be unique; repeated: {duplicates}")
    for cell in cells:
        check_unchanged(cell)
    results: dict[str, CellResult] = {}
    todo = []
    for cell in cells:
        if (done := read_result(cell)) is not None:
            results[cell.name] = done
        else:
            todo.append(cell)
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already finished: skipped")
    spent: list[float] = []
    for index, cell in enumerate(todo, 1):
        left = "unknown" if not spent else _minutes(sum(spent) / len(spent) * (len(todo) - index + 1))
        log(f"[cell {index}/{len(todo)}] {cell.name} ({_describe(cell.meta)}) - time left for "
            f"{len(todo) - index + 1} cell(s): {left}")
        started = time.perf_counter()
        results[cell.name] = run_cell(cell, **run_kwargs)
        spent.append(time.perf_counter() - started)
        log(f"[cell {index}/{len(todo)}] {cell.name} done in {_minutes(spent[-1])}: "
            + ", ".join(f"{b} {results[cell.name].accuracy(b):.1%}" for b in results[cell.name].scores))
        _release_memory()
    return results


def check_unchanged(cell: Cell) -> None:
    """A cell folder that already holds a run must have been made with the same config: otherwise its
    results (or its checkpoints, on resume) would be mixed into a different experiment."""
    stored = cell.folder / "config.yaml"
    if not stored.is_file():
        return
    old, new = _flatten(config_to_dict(load_config(stored))), _flatten(config_to_dict(cell.config))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise ValueError(f"cell {cell.name}: {stored} was run with a different config ({shown}"
                         f"{', ...' if len(changed) > 4 else ''}); delete {cell.folder} to rerun it with the new "
                         "settings, or give the experiment another name or preset")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _describe(meta: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in meta.items())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
