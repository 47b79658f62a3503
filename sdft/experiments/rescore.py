"""Secondary scores: a finished cell's saved predictions scored again with other scorer modes.

Greedy predictions are stored per item (`predictions/<benchmark>[.before].jsonl`: completion and reference),
so another scorer (e.g. tool use "actions": the right tools, arguments ignored) costs no generation. The
primary column of every table stays the scorer the run was evaluated with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sdft.experiments.cells import CellResult
from sdft.experiments.spec import ExperimentSpec
from sdft.io import read_jsonl
from sdft.verifiers import score_mcq, score_tool_calls


def secondary_key(task: str, mode: str) -> str:
    return f"{task}:{mode}"


def rescore_cells(spec: ExperimentSpec, cells_dir: str | Path, results: Sequence[CellResult]) -> list[CellResult]:
    """Copies of `results` whose scores are {"<task>:<mode>": per-item 0/1} for every task's also_score mode,
    read from <cells_dir>/<cell>/predictions/ (the base cell's ".before" file when it was not trained)."""
    out = []
    for result in results:
        scores = {}
        for name, task in spec.tasks.items():
            if not task.also_score:
                continue
            folder = Path(cells_dir) / result.name / "predictions"
            path = folder / f"{name}.jsonl"
            if not path.is_file():
                path = folder / f"{name}.before.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"cell {result.name}: no predictions for {name!r} in {folder}")
            rows = read_jsonl(path)
            score = score_tool_calls if task.kind == "tooluse" else score_mcq
            for mode in task.also_score:
                scores[secondary_key(name, mode)] = [int(score(r["completion"], r["reference"], mode)) for r in rows]
        out.append(CellResult(name=result.name, meta=result.meta, scores=scores, wall_s=result.wall_s))
    return out


def secondary_columns(spec: ExperimentSpec) -> dict[str, str]:
    """{"<task>:<mode>": "<title> (<mode>)"} in task order."""
    return {secondary_key(name, mode): f"{task.title} ({mode})"
            for name, task in spec.tasks.items() for mode in task.also_score}
