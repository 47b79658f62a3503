"""Cells: one resumable run folder per (method, seed, ...) of an experiment, and the loop that runs them.

A cell's folder holds its run (config.yaml, metrics.jsonl, checkpoints, predictions, summary.md) and,
once it has finished, `cell.json` with its per-item scores. Running an experiment again skips cells with
a `cell.json` and resumes an interrupted cell from its last checkpoint (the run config has resume=true).

A cell folder is only reused with the config it was made with, except for the evaluation settings
(`eval.*`, which never affect training). A finished cell whose eval settings changed is re-evaluated:
its cell.json and config.yaml are kept as cell.previous.json and config.previous.yaml (.2, .3, ... when
those exist), and the run resumes from its final checkpoint, runs no training step, evaluates with the new
settings and writes a new cell.json (a trained cell without checkpoints is refused: it would train again).
Only the final evaluation is redone (the base-model cell, which never trains, evaluates the starting model
again); evaluations logged before or during training stay as they were.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sdft.config import Config, config_to_dict, load_config
from sdft.io import atomic_write_json, fsync_dir
from sdft.rundir import compare_configs

RESULT_FILE = "cell.json"
CELL_MAY_CHANGE = ("eval",)  # config sections that never affect training


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
    """Per-benchmark outcomes of a finished cell: scores[benchmark] = list of 0/1 per item.

    wall_s: wall time of the call that trained and evaluated the cell; reevaluated_s: wall time of its
    latest re-evaluation (None when it was never re-evaluated).
    """

    name: str
    meta: dict
    scores: dict[str, list[int]]
    wall_s: float
    reevaluated_s: float | None = None

    def accuracy(self, benchmark: str) -> float:
        items = self.scores[benchmark]
        return sum(items) / len(items)


def read_result(cell: Cell) -> CellResult | None:
    path = cell.folder / RESULT_FILE
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    reevaluated = row.get("reevaluated_s")
    return CellResult(name=row["name"], meta=row["meta"], scores={k: list(v) for k, v in row["scores"].items()},
                      wall_s=float(row["wall_s"]), reevaluated_s=None if reevaluated is None else float(reevaluated))


def run_cell(cell: Cell, *, train_fn: Callable | None = None, export_fn: Callable | None = None,
             previous: CellResult | None = None) -> CellResult:
    """Train (or only evaluate) one cell and write its cell.json; `train_fn(config, stop_after=...)` and
    `export_fn(run_dir, out_dir)` default to sdft.runner.train_from_config and sdft.export.export_student.

    `previous`: the result this run re-evaluates; unless the run trained after all, its wall_s is kept and
    this run's time is reevaluated_s.
    The export is skipped when the run trained no step and the export folder is already there.
    """
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
    trained = getattr(result, "start_step", 0) < result.steps
    if cell.export and (trained or not (cell.folder / "export" / "config.json").is_file()):
        export_fn(cell.folder, cell.folder / "export")
    spent = time.perf_counter() - start
    reevaluated = previous is not None and not trained  # else (no final checkpoint) the run trained again
    out = CellResult(name=cell.name, meta=dict(cell.meta),
                     scores={name: [int(x) for x in r.per_item] for name, r in scores.items()},
                     wall_s=previous.wall_s if reevaluated else spent, reevaluated_s=spent if reevaluated else None)
    row = {"name": out.name, "meta": out.meta, "scores": out.scores, "wall_s": out.wall_s}
    if out.reevaluated_s is not None:
        row["reevaluated_s"] = out.reevaluated_s
    atomic_write_json(cell.folder / RESULT_FILE, row)
    return out


def run_cells(cells: Sequence[Cell], *, log: Callable[[str], None] = print, **run_kwargs) -> dict[str, CellResult]:
    """Run every cell not yet finished, in order, with a progress line per cell (index, name, time left);
    finished cells whose eval settings changed are re-evaluated (see the module docstring).

    The time left is the mean wall time of the cells run so far in this call times the cells still to run.
    """
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"cell names must be unique; repeated: {duplicates}")
    eval_changes = {cell.name: check_unchanged(cell) for cell in cells}
    results: dict[str, CellResult] = {}
    todo = []
    for cell in cells:
        done = read_result(cell)
        if done is not None and not eval_changes[cell.name]:
            results[cell.name] = done
        else:
            todo.append((cell, done))
    stale = [cell for cell, done in todo if done is not None]
    for cell in stale:
        if cell.train and _latest_checkpoint(cell) is None:
            raise ValueError(f"cell {cell.name}: its eval settings changed ({_show(eval_changes[cell.name])}) but "
                             f"{cell.folder / 'checkpoints'} holds no checkpoint to evaluate again; delete "
                             f"{cell.folder} to train it again")
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already finished: skipped")
    if stale:
        log(f"{len(stale)} finished cell(s) to re-evaluate (no training): eval settings changed")
    spent: list[float] = []
    for index, (cell, done) in enumerate(todo, 1):
        left = "unknown" if not spent else _minutes(sum(spent) / len(spent) * (len(todo) - index + 1))
        log(f"[cell {index}/{len(todo)}] {cell.name} ({_describe(cell.meta)}) - time left for "
            f"{len(todo) - index + 1} cell(s): {left}")
        changed = eval_changes[cell.name]
        if done is not None:
            kept = set_aside_result(cell)
            how = "from its final checkpoint" if cell.train else "(the starting model)"
            log(f"[cell {index}/{len(todo)}] {cell.name}: re-evaluated {how}, eval settings changed "
                f"({_show(changed)}); previous result kept as {kept.name}")
        elif changed:
            log(f"[cell {index}/{len(todo)}] {cell.name}: resumed with changed eval settings ({_show(changed)})")
        started = time.perf_counter()
        results[cell.name] = run_cell(cell, previous=done, **run_kwargs)
        spent.append(time.perf_counter() - started)
        log(f"[cell {index}/{len(todo)}] {cell.name} done in {_minutes(spent[-1])}: "
            + ", ".join(f"{b} {results[cell.name].accuracy(b):.1%}" for b in results[cell.name].scores))
        _release_memory()
    return results


def check_unchanged(cell: Cell) -> list[str]:
    """A cell folder that already holds a run must have been made with the same config: otherwise its
    results (or its checkpoints, on resume) would be mixed into a different experiment. Returns the
    changed eval.* keys with their old and new values ("key: old -> new"; empty when none); any other
    change is a ValueError."""
    stored = cell.folder / "config.yaml"
    if not stored.is_file():
        return []
    changes = compare_configs(config_to_dict(load_config(stored)), config_to_dict(cell.config),
                              may_change=CELL_MAY_CHANGE)
    if changes.refused:
        raise ValueError(f"cell {cell.name}: {stored} was run with a different config ({_show(changes.refused)}); "
                         f"only the {', '.join(p + '.*' for p in CELL_MAY_CHANGE)} keys may change (the cell is then "
                         f"re-evaluated); delete {cell.folder} to rerun it with the new settings, or give the "
                         "experiment another name or preset")
    return changes.allowed


def set_aside_result(cell: Cell) -> Path:
    """Keep a finished cell's cell.json and config.yaml as cell.previous[.N].json and config.previous[.N].yaml
    (the first free N) before it is run again; returns the kept result's path."""
    folder = cell.folder
    index = 1
    while True:
        suffix = "previous" if index == 1 else f"previous.{index}"
        kept_result, kept_config = folder / f"cell.{suffix}.json", folder / f"config.{suffix}.yaml"
        if not kept_result.exists() and not kept_config.exists():
            break
        index += 1
    if (folder / "config.yaml").is_file():
        tmp = folder / f".{kept_config.name}.tmp"
        shutil.copyfile(folder / "config.yaml", tmp)
        os.replace(tmp, kept_config)
    os.replace(folder / RESULT_FILE, kept_result)
    fsync_dir(folder)
    return kept_result


def _latest_checkpoint(cell: Cell):
    from sdft.checkpoint import latest_checkpoint

    return latest_checkpoint(cell.folder)


def _show(lines: Sequence[str], limit: int = 4) -> str:
    return ", ".join(lines[:limit]) + (", ..." if len(lines) > limit else "")


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
