"""The ablation grid: every method x every seed trained on one task, every cell evaluated on all tasks.

Spec keys beyond `sdft.experiments.spec` (see configs/ablation_tooluse.yaml):
    train_task: the task trained on (its test part is the trained-task column, the others are retention)
    reference:  the method that paired differences are taken against
    columns:    mapping method field -> table column title (e.g. {kl: KL, ema: EMA teacher}); default
                {label: Method}

Output in results/<name>/: cells/<method>_seed<s>/ (one run each), cells/base/ (the base model evaluated
once; greedy decoding makes it seed-free), data/<task>/{train,test}, table.md and bars.png.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from sdft.experiments.cells import Cell, CellResult, run_cells
from sdft.experiments.configs import cell_config
from sdft.experiments.rescore import rescore_cells, secondary_columns
from sdft.experiments.spec import ExperimentSpec, require_trainable
from sdft.experiments.splits import TaskData, prepare_task
from sdft.experiments.tables import bar_chart, difference_ci, fmt, markdown_table, mean_ci, per_seed
from sdft.io import atomic_write_text


def ablation_cells(spec: ExperimentSpec, data: dict[str, TaskData], root: Path, *,
                   methods: Sequence[str], seeds: Sequence[int]) -> tuple[Cell, dict[str, list[Cell]]]:
    """The base-model cell and, per method, one cell per seed."""
    train_task = _train_task(spec)
    folder = root / "cells"
    # the base row is only evaluated; it takes the first method's settings so that its config is valid
    # for the backend (e.g. Tinker rejects the full-vocabulary default)
    base = Cell(name="base", meta={"method": "base"}, train=False,
                config=cell_config(spec, folder=folder, run_name="base", train_task=train_task, data=data,
                                   seed=seeds[0], overrides=spec.methods[methods[0]]["overrides"],
                                   evaluate_before=True))
    groups = {}
    for method in methods:
        groups[method] = [
            Cell(name=f"{method}_seed{seed}", meta={"method": method, "seed": seed},
                 config=cell_config(spec, folder=folder, run_name=f"{method}_seed{seed}", train_task=train_task,
                                    data=data, seed=seed, overrides=spec.methods[method]["overrides"]))
            for seed in seeds]
    return base, groups


def run_ablation(spec: ExperimentSpec, *, results_dir: str | Path = "results", methods: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, command: str = "", log: Callable[[str], None] = print,
                 **run_kwargs) -> Path:
    """Run (or resume) every cell, then write table.md and bars.png; returns the table path."""
    methods = list(methods or spec.methods)
    seeds = list(seeds or spec.seeds)
    reference = spec.extra.get("reference", methods[0])
    if reference not in spec.methods:
        raise ValueError(f"{spec.source}: reference {reference!r} is not a method; allowed: {sorted(spec.methods)}")
    root = Path(results_dir) / spec.name
    data = {name: prepare_task(task, root / "data") for name, task in spec.tasks.items()}
    base, groups = ablation_cells(spec, data, root, methods=methods, seeds=seeds)
    started = time.perf_counter()
    results = run_cells([base, *[c for cells in groups.values() for c in cells]], log=log, **run_kwargs)
    log(f"all cells finished ({(time.perf_counter() - started) / 60:.1f} min in this call)")
    grouped = {m: [results[c.name] for c in cells] for m, cells in groups.items()}
    return write_ablation_report(spec, root, base=results[base.name], groups=grouped, data=data,
                                 reference=reference if reference in grouped else None, seeds=seeds, command=command)


def write_ablation_report(spec: ExperimentSpec, root: Path, *, base: CellResult, groups: dict[str, list[CellResult]],
                          data: dict[str, TaskData], reference: str | None, seeds: Sequence[int],
                          command: str = "") -> Path:
    """table.md (accuracy with 95% CI, per-seed values, paired differences) and bars.png."""
    tasks = list(spec.tasks)
    titles = {t: spec.tasks[t].title for t in tasks}
    columns = spec.extra.get("columns") or {"label": "Method"}
    train_task = _train_task(spec)

    def fields(method: str) -> list[str]:
        body = spec.methods[method]
        return [str(body.get(key, method if key == "label" else "")) for key in columns]

    def label(method: str) -> str:
        return " / ".join(f for f in fields(method) if f) or method

    header = list(columns.values())
    base_fields = ["Base model"] + ["n/a"] * (len(columns) - 1)
    accuracy = [base_fields + [fmt(mean_ci([base], t)) for t in tasks]]
    accuracy += [fields(m) + [fmt(mean_ci(cells, t)) for t in tasks] for m, cells in groups.items()]
    seed_rows = [fields(m) + [per_seed(cells, t) for t in tasks] for m, cells in groups.items()]
    lines = [f"# Ablation {spec.name}" + (f" (preset {spec.preset})" if spec.preset else ""), "",
             f"Trained on {titles[train_task]}; every cell evaluated on the test part of every task. "
             f"{len(seeds)} seed(s) per method ({', '.join(map(str, seeds))}); pass@1 in percent, mean over "
             "seeds with a 95% interval from a bootstrap over seeds and items (greedy decoding).", ""]
    lines += [f"- {note}" for note in spec.notes + [d.note for d in data.values()]]
    lines += ["", "## Accuracy", "", markdown_table(header + [titles[t] for t in tasks], accuracy), "",
              "## Per-seed values", "",
              markdown_table(header + [f"{titles[t]} (seed {' / '.join(map(str, seeds))})" for t in tasks], seed_rows)]
    if reference is not None:
        diff_rows = [fields(m) + [fmt(difference_ci(cells, groups[reference], t), signed=True) for t in tasks]
                     for m, cells in groups.items() if m != reference]
        lines += ["", f"## Paired difference vs {label(reference)} (points, 95% CI over the same seeds and items)",
                  "", markdown_table(header + [f"Δ {titles[t]}" for t in tasks], diff_rows)]
    base_rows = [fields(m) + [fmt(difference_ci(cells, [base], t), signed=True) for t in tasks]
                 for m, cells in groups.items()]
    lines += ["", "## Change from the base model (points, paired 95% CI)", "",
              markdown_table(header + [f"Δ {titles[t]}" for t in tasks], base_rows)]
    extra = secondary_columns(spec)
    rescored = {m: rescore_cells(spec, root / "cells", cells) for m, cells in groups.items()}
    base_rescored = rescore_cells(spec, root / "cells", [base])[0]
    if extra:
        rows = [base_fields + [fmt(mean_ci([base_rescored], k)) for k in extra]]
        rows += [fields(m) + [fmt(mean_ci(rescored[m], k)) for k in extra] for m in groups]
        lines += ["", "## Secondary scores (the saved predictions scored with other scorer modes)", "",
                  markdown_table(header + list(extra.values()), rows), "",
                  "Modes: robust = the official rule with balanced-brace JSON parsing; actions = the right tool "
                  "names, arguments ignored (a diagnostic, not comparable with published numbers)."]
    n_items = {t: len(base.scores[t]) for t in tasks}
    lines += ["", "## Settings", "",
              "- items per task: " + ", ".join(f"{titles[t]} {n_items[t]}" for t in tasks)
              + f" (one item = {100 / min(n_items.values()):.1f} points on the smallest)",
              f"- base run config: {spec.config}; experiment spec: {spec.source}; cells: {root / 'cells'}",
              "- training time per cell (with its evaluation): " + ", ".join(
                  f"{label(m)} {sum(c.wall_s for c in cells) / len(cells) / 60:.1f} min" for m, cells in groups.items())]
    reevaluated = [c for c in [base, *[c for cells in groups.values() for c in cells]] if c.reevaluated_s is not None]
    if reevaluated:
        lines.append(f"- re-evaluated without training (eval settings changed): {len(reevaluated)} cell(s), "
                     f"{sum(c.reevaluated_s for c in reevaluated) / len(reevaluated) / 60:.1f} min per cell")
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["", "![accuracy per method](bars.png)", ""]
    bar_chart(root / "bars.png",
              {label(m): {**{t: mean_ci(cells, t) for t in tasks}, **{k: mean_ci(rescored[m], k) for k in extra}}
               for m, cells in groups.items()},
              titles={**titles, **extra}, title=f"{spec.name}: pass@1 with 95% CI",
              reference={**{t: base.accuracy(t) for t in tasks}, **{k: base_rescored.accuracy(k) for k in extra}})
    path = root / "table.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _train_task(spec: ExperimentSpec) -> str:
    train_task = spec.extra.get("train_task", next(iter(spec.tasks)))
    require_trainable(spec, train_task, "train_task")
    return train_task
