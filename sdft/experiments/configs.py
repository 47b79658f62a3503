"""The run config of one cell: base config + experiment overrides + method overrides + cell fields."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import yaml

from sdft.config import Config, load_config
from sdft.experiments.spec import ExperimentSpec, require_trainable
from sdft.experiments.splits import TaskData


def benchmarks_override(spec: ExperimentSpec, data: Mapping[str, TaskData]) -> str:
    """eval.benchmarks = one entry per task, on that task's test part, in the order of spec.tasks (kind
    lm_eval: the harness task of its benchmark fields)."""
    entries = [{"name": name, "kind": task.kind, **({} if data[name].test is None else {"path": data[name].test}),
                **task.benchmark} for name, task in spec.tasks.items()]
    return "eval.benchmarks=" + yaml.safe_dump(entries, default_flow_style=True, width=10**6).strip()


def cell_config(spec: ExperimentSpec, *, folder: str | Path, run_name: str, train_task: str,
                data: Mapping[str, TaskData], seed: int, overrides: Sequence[str] = (),
                evaluate_before: bool = False) -> Config:
    """Config of a cell that trains on `train_task`'s train part and evaluates every task's test part.

    Override order (later wins): spec.overrides (with the preset's), `overrides` (method, lr, model),
    then the cell's own fields: seed, run folder, resume=true, data source, benchmarks.
    """
    task = require_trainable(spec, train_task, "train task")
    cell_fields = [
        f"seed={seed}", f"run_name={run_name}", f"output_dir={folder}", "resume=true",
        f"data.kind={task.kind}", f"data.path={data[train_task].train}", "data.split=none",
        "data.fallback_path=null", benchmarks_override(spec, data),
        f"eval.before_training={'true' if evaluate_before else 'false'}",
    ]
    try:
        return load_config(spec.config, [*spec.overrides, *overrides, *cell_fields])
    except ValueError as error:
        raise ValueError(f"{spec.source}: cell {run_name}: {error}") from None
