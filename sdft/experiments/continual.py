"""Continual learning: train on task A (stage 1), then on task B starting from each stage-1 model (stage 2);
evaluate both tasks after every stage.

Spec keys beyond `sdft.experiments.spec` (see configs/continual_learning.yaml):
    stages: [task A, task B]         the task trained on in stage 1 and stage 2
    learning_rates: [5e-4, ...]      every method runs at every learning rate
    stage_overrides: {task: [...]}   extra run-config overrides for the stage that trains on that task

Stage 2 starts from the stage-1 student, exported as a merged model folder (<stage-1 cell>/export); its
teacher (static: the starting weights) is therefore the stage-1 model with task B's demonstrations.
Output in results/<name>/: cells/, data/, tables.md (the two tables of the cookbook README with 95%
intervals: accuracy per task, change vs the base model, task-A retention) and stages.png.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sdft.experiments.cells import Cell, CellResult, run_cells
from sdft.experiments.configs import cell_config
from sdft.experiments.rescore import rescore_cells, secondary_columns
from sdft.experiments.spec import ExperimentSpec, require_trainable
from sdft.experiments.splits import TaskData, prepare_task
from sdft.experiments.tables import difference_ci, fmt, markdown_table, mean_ci, ratio_ci, stage_plot
from sdft.io import atomic_write_text


@dataclass(frozen=True)
class Arm:
    """One method at one learning rate (the rows of the tables)."""

    method: str
    lr: float

    @property
    def key(self) -> str:
        return f"{self.method}_lr{self.lr:g}"


def stage_tasks(spec: ExperimentSpec) -> list[str]:
    stages = spec.extra.get("stages")
    if not (isinstance(stages, list) and len(stages) == 2 and all(s in spec.tasks for s in stages)):
        raise ValueError(f"{spec.source}: key 'stages' must list the two tasks trained in stage 1 and 2, "
                         f"from {sorted(spec.tasks)}; got {stages!r}")
    for stage in stages:
        require_trainable(spec, stage, "stages entry")
    return stages


def learning_rates(spec: ExperimentSpec) -> list[float]:
    rates = spec.extra.get("learning_rates", [])
    if not (isinstance(rates, list) and rates and all(isinstance(r, (int, float)) and r > 0 for r in rates)):
        raise ValueError(f"{spec.source}: key 'learning_rates' must be a non-empty list of numbers > 0, got {rates!r}")
    return [float(r) for r in rates]


def continual_cells(spec: ExperimentSpec, data: dict[str, TaskData], root: Path, *, arms: Sequence[Arm],
                    seeds: Sequence[int], stages: Sequence[int]) -> tuple[Cell, list[Cell], list[Cell]]:
    """(base cell, stage-1 cells, stage-2 cells); a stage-2 cell starts from the stage-1 cell of the same
    arm and seed."""
    task_a, task_b = stage_tasks(spec)
    folder = root / "cells"
    extra = spec.extra.get("stage_overrides", {}) or {}
    base = Cell(name="base", meta={"stage": 0}, train=False,  # evaluated only; the first arm's settings
                config=cell_config(spec, folder=folder, run_name="base", train_task=task_a, data=data,
                                   seed=seeds[0], overrides=spec.methods[arms[0].method]["overrides"],
                                   evaluate_before=True))
    first, second = [], []
    for arm in arms:
        for seed in seeds:
            method = spec.methods[arm.method]["overrides"]
            name1 = f"s1_{arm.key}_seed{seed}"
            first.append(Cell(name=name1, meta={"stage": 1, "method": arm.method, "lr": arm.lr, "seed": seed},
                              export=2 in stages,
                              config=cell_config(spec, folder=folder, run_name=name1, train_task=task_a, data=data,
                                                 seed=seed, overrides=[*extra.get(task_a, []), *method,
                                                                       f"optim.lr={arm.lr!r}"])))
            if 2 in stages:
                name2 = f"s2_{arm.key}_seed{seed}"
                second.append(Cell(
                    name=name2, meta={"stage": 2, "method": arm.method, "lr": arm.lr, "seed": seed, "from": name1},
                    config=cell_config(spec, folder=folder, run_name=name2, train_task=task_b, data=data, seed=seed,
                                       overrides=[*extra.get(task_b, []), *method, f"optim.lr={arm.lr!r}",
                                                  f"model.name={folder / name1 / 'export'}"])))
    return base, first, second


def run_continual(spec: ExperimentSpec, *, results_dir: str | Path = "results", methods: Sequence[str] | None = None,
                  lrs: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
                  stages: Sequence[int] = (1, 2), command: str = "", log: Callable[[str], None] = print,
                  export_fn: Callable | None = None, **run_kwargs) -> Path:
    """Run (or resume) the base evaluation and the stages, then write tables.md and stages.png."""
    if export_fn is None:
        from sdft.export import export_student as export_fn
    stages = sorted(set(stages))
    if not stages or any(s not in (1, 2) for s in stages) or stages == [2]:
        raise ValueError(f"stages={','.join(map(str, stages))}: allowed 1 or 1,2 (stage 2 starts from stage 1)")
    arms = [Arm(m, lr) for m in (methods or list(spec.methods)) for lr in (lrs or learning_rates(spec))]
    seeds = list(seeds or spec.seeds)
    root = Path(results_dir) / spec.name
    data = {name: prepare_task(task, root / "data") for name, task in spec.tasks.items()}
    base, first, second = continual_cells(spec, data, root, arms=arms, seeds=seeds, stages=stages)
    results = run_cells([base, *first], log=log, export_fn=export_fn, **run_kwargs)
    if second:
        for cell in first:  # a stage-1 cell finished earlier without stage 2 has no export yet
            if not (cell.folder / "export" / "config.json").is_file():
                log(f"exporting {cell.name} for stage 2")
                export_fn(cell.folder, cell.folder / "export")
        results.update(run_cells(second, log=log, export_fn=export_fn, **run_kwargs))
    return write_continual_report(spec, root, base=results["base"], arms=arms, seeds=seeds, results=results,
                                  data=data, command=command)


def write_continual_report(spec: ExperimentSpec, root: Path, *, base: CellResult, arms: Sequence[Arm],
                           seeds: Sequence[int], results: dict[str, CellResult], data: dict[str, TaskData],
                           command: str = "") -> Path:
    """tables.md and stages.png. Columns: the two stage tasks, then every other task of the spec (evaluated
    only: prior abilities). Stage 1: accuracy and change vs the base model; stage 2: accuracy, task-A
    retention (stage 2 / stage 1) and change vs stage 1 and vs base; with `reference` (a method), the
    paired difference of every other method from it at the same learning rate and seeds."""
    task_a, task_b = stage_tasks(spec)
    title_a, title_b = spec.tasks[task_a].title, spec.tasks[task_b].title
    others = [t for t in spec.tasks if t not in (task_a, task_b)]
    titles = {t: spec.tasks[t].title for t in [task_a, task_b, *others]}
    columns = list(titles)
    reference = spec.extra.get("reference")
    if reference is not None and reference not in spec.methods:
        raise ValueError(f"{spec.source}: reference {reference!r} is not a method; allowed: {sorted(spec.methods)}")

    def cells(stage: int, arm: Arm) -> list[CellResult] | None:
        found = [results.get(f"s{stage}_{arm.key}_seed{s}") for s in seeds]
        return None if any(r is None for r in found) else found

    def label(arm: Arm) -> str:
        return str(spec.methods[arm.method].get("label", arm.method))

    extra = secondary_columns(spec)

    def point(group: list[CellResult]) -> dict:
        """Interval of every task and every secondary column for one group of cells (one stage of one arm)."""
        rescored = rescore_cells(spec, root / "cells", group)
        return {**{t: mean_ci(group, t) for t in titles}, **{k: mean_ci(rescored, k) for k in extra}}

    def signed(group, other, task) -> str:
        return fmt(difference_ci(group, other, task), signed=True)

    # points[arm] = intervals at base, after stage 1 and (when run) after stage 2
    base_point = point([base])
    points = {arm: [base_point] + [point(g) for g in (cells(1, arm), cells(2, arm)) if g is not None] for arm in arms}
    rows1 = [["Base model", ""] + [fmt(base_point[t]) for t in columns] + [""] * len(columns)]
    for arm in arms:
        rows1.append([label(arm), f"{arm.lr:g}"] + [fmt(points[arm][1][t]) for t in columns]
                     + [signed(cells(1, arm), [base], t) for t in columns])
    lines = [f"# Continual learning {spec.name}" + (f" (preset {spec.preset})" if spec.preset else ""), "",
             f"Stage 1 trains on {title_a} from the base model; stage 2 trains on {title_b} from each stage-1 model. "
             f"Every task is evaluated after every stage. {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
             "pass@1 in percent with 95% intervals (bootstrap over seeds and items; differences and retention "
             "paired over the same items and seeds).", ""]
    lines += [f"- {note}" for note in spec.notes + [d.note for d in data.values()]]
    lines += ["", f"## Stage 1: train on {title_a}, evaluate every task", "",
              markdown_table(["Method", "LR"] + [titles[t] for t in columns]
                             + [f"{titles[t]} Δ vs base" for t in columns], rows1)]
    staged = [arm for arm in arms if len(points[arm]) == 3]
    if staged:
        rows2, changes = [], []
        for arm in staged:
            retention = ratio_ci(cells(2, arm), cells(1, arm), task_a)  # NaN when stage-1 accuracy is 0
            rows2.append([label(arm), f"{arm.lr:g}"] + [fmt(points[arm][2][t]) for t in columns]
                         + [f"n/a (stage-1 {title_a} is 0)" if math.isnan(retention[0]) else fmt(retention) + " %"])
            changes.append([label(arm), f"{arm.lr:g}"] + [signed(cells(2, arm), cells(1, arm), t) for t in columns]
                           + [signed(cells(2, arm), [base], t) for t in columns])
        lines += ["", f"## Stage 2: train on {title_b} from the stage-1 model, evaluate every task", "",
                  markdown_table(["Method", "LR"] + [titles[t] for t in columns] + [f"{title_a} retention"], rows2),
                  "", f"Retention = stage-2 {title_a} accuracy / stage-1 {title_a} accuracy (100% = nothing lost).",
                  "", "Change during stage 2 and since the base model (points, paired 95% CI):", "",
                  markdown_table(["Method", "LR"] + [f"{titles[t]} Δ stage 2" for t in columns]
                                 + [f"{titles[t]} Δ vs base" for t in columns], changes)]
    if reference is not None:
        ref_label = str(spec.methods[reference].get("label", reference))
        for stage in (1, 2):
            rows = []
            for arm in arms:
                ref = Arm(reference, arm.lr)
                mine, theirs = cells(stage, arm), cells(stage, ref) if ref in arms else None
                if arm.method == reference or mine is None or theirs is None:
                    continue
                rows.append([label(arm), f"{arm.lr:g}"] + [signed(mine, theirs, t) for t in columns])
            if rows:
                lines += ["", f"## Paired difference vs {ref_label} after stage {stage} (points, same learning rate, "
                              "seeds and items, 95% CI)", "",
                          markdown_table(["Method", "LR"] + [f"Δ {titles[t]}" for t in columns], rows)]
    if extra:
        rows = [["Base model", "", "base"] + [fmt(points[arms[0]][0][k]) for k in extra]]
        for stage in (1, 2):
            rows += [[label(arm), f"{arm.lr:g}", f"after stage {stage}"] + [fmt(points[arm][stage][k]) for k in extra]
                     for arm in arms if len(points[arm]) > stage]
        lines += ["", "## Secondary scores (the saved predictions scored with other scorer modes)", "",
                  markdown_table(["Method", "LR", "When"] + list(extra.values()), rows)]
    stage_names = ["base", f"after stage 1\n({title_a})", f"after stage 2\n({title_b})"]
    stage_plot(root / "stages.png", {f"{label(arm)} lr {arm.lr:g}": points[arm] for arm in (staged or arms)},
               stages=stage_names[:3 if staged else 2], titles={**titles, **extra},
               title=f"{spec.name}: accuracy across stages (95% CI)")
    lines += ["", "## Settings", "",
              "- items per task: " + ", ".join(f"{titles[t]} {len(base.scores[t])}" for t in titles),
              f"- base run config: {spec.config}; experiment spec: {spec.source}; cells: {root / 'cells'}"]
    timed = [r for r in results.values() if r.name != "base"]
    if timed:
        lines.append("- training time per cell (with its evaluation): " + ", ".join(
            f"stage {stage} {sum(r.wall_s for r in group) / len(group) / 60:.1f} min" for stage in (1, 2)
            if (group := [r for r in timed if r.meta.get("stage") == stage])))
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["", "![accuracy across stages](stages.png)", ""]
    path = root / "tables.md"
    atomic_write_text(path, "\n".join(lines))
    return path
