"""Evaluation outside training: a model, or a local run's student at one of its checkpoints, on the
benchmarks of a config (`eval.benchmarks`), decoded greedily exactly as during training.

The base model (no run) is decoded with the plain causal LM, which gives the completions of a run's
evaluation before training; a run's student is rebuilt from its config.yaml and checkpoint on the local
backend (LoRA adapter left unmerged), which gives the completions of the run's own evaluation at that
step. Outputs in `out_dir`: predictions/<benchmark>.jsonl, results.json and results.md (pass@1 with its
Wilson 95% interval per benchmark).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from sdft.config import Config, load_config
from sdft.io import atomic_write_json, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


@dataclass(frozen=True)
class RunStudent:
    """A local run's student rebuilt from its folder: the backend holding it, its tokenizer, the run's
    config, the checkpoint folder whose weights were loaded, and notes on how it was chosen (damaged newer
    checkpoints skipped, a checkpoint without checksums)."""
    backend: object
    tokenizer: object
    config: Config
    checkpoint: Path
    notes: tuple[str, ...] = ()


def load_run_config(run_dir: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of the run in `run_dir` (its config.yaml plus `overrides`)."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.yaml: not a run folder")
    return load_config(config_path, list(overrides))


def find_run_checkpoint(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder `checkpoint` (a folder name such as "step_00000004" inside run_dir/checkpoints,
    or a path) of the run in `run_dir`; None: the latest complete checkpoint."""
    from sdft.checkpoint import latest_checkpoint, list_checkpoints

    run_dir = Path(run_dir)
    if checkpoint is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
        return path
    candidates = [Path(checkpoint), run_dir / "checkpoints" / str(checkpoint)]
    path = next((c for c in candidates if c.is_dir()), None)  # loading then names what a damaged one lacks
    if path is None:
        names = [p.name for p in list_checkpoints(run_dir)]
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} not found in {run_dir / 'checkpoints'}; "
                                f"complete checkpoints: {names or 'none'}")
    return path


def load_run_student(run_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                     overrides: list[str] | tuple[str, ...] = (), device=None) -> RunStudent:
    """Rebuild the student of the local run in `run_dir` (its config.yaml plus `overrides`) with the weights of
    `checkpoint` (a folder name such as "step_00000004" inside run_dir/checkpoints, or a path; default:
    the newest intact checkpoint). The checkpoint's files are verified (sdft.checkpoint.load_checkpoint): a
    damaged chosen checkpoint is a CheckpointError naming the file; without `checkpoint`, damaged newer ones
    are skipped and said in `notes`."""
    from sdft.backends import build_backend, require_local_weights
    from sdft.checkpoint import load_checkpoint, load_latest_intact

    run_dir = Path(run_dir)
    config = load_run_config(run_dir, overrides)
    require_local_weights(config, str(run_dir / "config.yaml"))
    notes = []
    if checkpoint is None:
        loaded, damaged = load_latest_intact(run_dir, objects=False)
        if loaded is None:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
        notes += [f"damaged checkpoint skipped: {line}" for line in damaged]
        if damaged:
            notes.append(f"evaluated {loaded.path.name}, the newest intact checkpoint")
    else:
        loaded = load_checkpoint(find_run_checkpoint(run_dir, checkpoint), objects=False)
    if not loaded.verified:
        notes.append(f"{loaded.path.name} was saved without checksums by an earlier version: loaded unverified")
    backend = build_backend(config, steps=1, device=device)
    backend.load_state_tensors(loaded.tensors)
    return RunStudent(backend=backend, tokenizer=backend.tokenizer, config=config, checkpoint=loaded.path,
                      notes=tuple(notes))


def evaluate_model(config: Config | None, *, out_dir: str | os.PathLike | None = None,
                   run_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                   overrides: list[str] | tuple[str, ...] = (), device=None, progress: bool = False) -> dict:
    """Evaluate config.model.name (run_dir None) or the student of the run in `run_dir` (its own config with
    `overrides`; `config` is then ignored) on the configured benchmarks; write the outputs to `out_dir`
    (default: <run>/eval/<checkpoint name> for a run, else <output_dir>/eval/<last part of model.name>);
    `progress` draws a bar per benchmark (items done, time left).

    Returns the results.json content: {"model", "run", "checkpoint", "notes", "out_dir", "benchmarks": {name: the
    `EvalResult` fields ("name", "split", "n", "correct", "pass_at_1", "ci_low", "ci_high", "per_item" as 0/1)
    and "max_new_tokens"}}.
    """
    from sdft.backends import require_local_weights
    from sdft.build import build_benchmarks, load_run_data
    from sdft.evaluation import evaluate_benchmarks
    from sdft.models import load_configured
    from sdft.sampling import NativeSampler

    if run_dir is not None:
        student = load_run_student(run_dir, checkpoint=checkpoint, overrides=overrides, device=device)
        config, tokenizer = student.config, student.tokenizer
        generate = lambda prompts, n: student.backend.generate_greedy(  # noqa: E731
            prompts, n, batch_size=config.eval.batch_size)
        described = {"run": str(Path(run_dir)), "checkpoint": student.checkpoint.name, "notes": list(student.notes)}
        causal_lm = student.backend.module
    else:
        if config is None:
            raise ValueError("give a config (to evaluate its model.name) or a run folder")
        if checkpoint is not None:
            raise ValueError("a checkpoint needs the run folder it belongs to (run_dir)")
        require_local_weights(config, "evaluating model.name")
        model, tokenizer = load_configured(config.model)
        if device is not None:
            model.to(device)
        generate = NativeSampler(model, tokenizer, batch_size=config.eval.batch_size).greedy
        causal_lm = model
        described = {"run": None, "checkpoint": None, "notes": []}
    if not config.eval.benchmarks:
        raise ValueError("eval.benchmarks is empty: nothing to evaluate (set it in the config or as an override)")
    data = load_run_data(config)
    if out_dir is None:
        out_dir = (Path(run_dir) / "eval" / described["checkpoint"] if run_dir is not None
                   else Path(config.output_dir) / "eval" / Path(config.model.name.rstrip("/")).name)
    out_dir = Path(out_dir)
    report = {"model": config.model.name, **described, "out_dir": str(out_dir), "benchmarks": {}}
    benchmarks = build_benchmarks(config, data.heldout)
    results = evaluate_benchmarks(benchmarks, generate, tokenizer, predictions_dir=out_dir / "predictions",
                                  max_prompt_tokens=config.data.max_prompt_tokens, chunk_size=config.eval.batch_size,
                                  progress=progress, causal_lm=causal_lm,
                                  chat_template_kwargs=config.data.chat_template_kwargs)
    for benchmark, _ in benchmarks:
        row = asdict(results[benchmark.name])
        row["per_item"] = [int(x) for x in row["per_item"]]
        report["benchmarks"][benchmark.name] = {**row, "max_new_tokens": benchmark.max_new_tokens}
    atomic_write_json(out_dir / RESULTS_JSON, report)
    atomic_write_text(out_dir / RESULTS_MD, results_markdown(report))
    return report


def results_markdown(report: dict) -> str:
    """A markdown table of a results.json report: benchmark, items, pass@1 and its 95% interval."""
    what = report["model"] if report["run"] is None else f"{report['run']} at {report['checkpoint']}"
    lines = [f"# Evaluation of {what}", "", "| benchmark | items | new tokens | pass@1 (%) | 95% CI (Wilson) |",
             "|---|---:|---:|---:|---|"]
    for name, row in report["benchmarks"].items():
        lines.append(f"| {name} | {row['n']} | {row['max_new_tokens']} | {100 * row['pass_at_1']:.1f} | "
                     f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}] |")
    return "\n".join(lines) + "\n"

