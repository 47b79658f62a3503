"""The experiment commands (`sdft ablate`, `sdft continual`): a spec, a preset and `key=a,b` selections."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sdft.experiments.spec import ExperimentSpec, load_spec, select


@dataclass(frozen=True)
class ExperimentCommand:
    """What one experiment command takes: its shipped default spec and the `key=a,b` selection keys."""
    default_spec: str
    keys: tuple[str, ...]
    run: Callable[[ExperimentSpec, dict[str, list[str]], str], Path]
    summary: str
    doc: str


def parse_selection(arguments: Sequence[str], *, allowed: Sequence[str]) -> dict[str, list[str]]:
    """{"methods": ["sft", "sdft_topk"], ...} from ["methods=sft,sdft_topk", ...]; unknown keys are errors."""
    out: dict[str, list[str]] = {}
    for text in arguments:
        key, sep, value = text.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"argument {text!r} is not of the form key=a,b (allowed keys: {', '.join(allowed)})")
        if key not in allowed:
            raise ValueError(f"argument {text!r}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        out[key] = [v.strip() for v in value.split(",") if v.strip()]
    return out


def typed(chosen: dict[str, list[str]], key: str, cast: Callable) -> list | None:
    """The values of `key` converted with `cast` (int or float), None when not given."""
    if key not in chosen:
        return None
    try:
        return [cast(v) for v in chosen[key]]
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(cast, cast.__name__)
        raise ValueError(f"{key}={','.join(chosen[key])}: every value must be {kind}") from None


def _ablate(spec: ExperimentSpec, chosen: dict[str, list[str]], command: str) -> Path:
    from sdft.experiments.ablation import run_ablation

    return run_ablation(spec, results_dir=chosen.get("results_dir", ["results"])[0], command=command,
                        methods=select(spec, "methods", chosen.get("methods"), list(spec.methods)),
                        seeds=typed(chosen, "seeds", int))


def _continual(spec: ExperimentSpec, chosen: dict[str, list[str]], command: str) -> Path:
    from sdft.experiments.continual import run_continual

    return run_continual(spec, results_dir=chosen.get("results_dir", ["results"])[0], command=command,
                         methods=select(spec, "methods", chosen.get("methods"), list(spec.methods)),
                         lrs=typed(chosen, "learning_rates", float), seeds=typed(chosen, "seeds", int),
                         stages=typed(chosen, "stages", int) or [1, 2])


EXPERIMENTS = {
    "ablate": ExperimentCommand(
        default_spec="ablation_tooluse", keys=("methods", "seeds", "results_dir"), run=_ablate,
        summary="run an ablation grid (methods x seeds) and write its table",
        doc="Run the ablation grid of an experiment spec (methods x seeds), then write its table and bar chart. "
            "Every cell is its own resumable run folder under results/<name>/cells/; rerunning skips finished "
            "cells."),
    "continual": ExperimentCommand(
        default_spec="continual_learning", keys=("methods", "learning_rates", "stages", "seeds", "results_dir"),
        run=_continual, summary="run the two-stage continual-learning experiment and write its tables",
        doc="Two-stage continual learning: train on task A, then on task B from each stage-1 model; both tasks "
            "are evaluated after every stage; writes the accuracy / change-vs-base / retention tables and a stage "
            "plot. Every cell is its own resumable run folder under results/<name>/cells/."),
}


def run_experiment(name: str, *, spec: str, preset: str | None, selection: Sequence[str], command: str) -> Path:
    """Load the spec (a file or a shipped spec's name) with `preset`, parse the `key=a,b` selection and run
    experiment `name` ("ablate" or "continual"); returns the path of the table it wrote."""
    from sdft.config import resolve_config_path

    experiment = EXPERIMENTS[name]
    chosen = parse_selection(selection, allowed=experiment.keys)
    return experiment.run(load_spec(resolve_config_path(spec), preset), chosen, command)
