"""The SDFT training loop, and the run shell it shares with the SFT baseline.

One SDFT step (any backend, any objective):
    rollouts = backend.sample(student prompts)                          on-policy, sampler log-probs kept
    targets  = backend.teacher_targets(teacher prompts, rollouts, obj)  what the objective asks of the teacher
    metrics  = backend.train_step(rollouts, targets, obj)               one optimizer step of the objective
    backend.update_teacher(step)                                        static: no-op; ema; sync every N

`run_training` wraps any such step function with what every run needs: deterministic batches, evaluation
before, during and after training, metrics.jsonl / TensorBoard / progress, checkpoints every N steps with
exact resume, a learning-curve plot and summary.md.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sdft.batches import EncodedExample, batch_indices
from sdft.checkpoint import capture_rng_state, load_latest_intact, restore_rng_state, save_checkpoint
from sdft.config import Config, config_to_dict, dump_config
from sdft.evaluation import Benchmark, EvalResult, evaluate_benchmarks
from sdft.logs import (MetricsLogger, ProgressBar, check_logging_requirements, plot_learning_curves,
                       write_summary)
from sdft.objectives import build_objective
from sdft.parallel import Parallel
from sdft.rundir import RunFolder, claim_run_folder
from sdft.sampling import SamplingParams

StepFn = Callable[[Any, Sequence[EncodedExample], int], dict]
"""(backend, batch, step) -> metrics of one optimizer step."""


def sampling_seed(seed: int, step: int, position: int) -> int:
    """The random stream of the prompt at `position` of step `step`'s global batch (a 63-bit integer)."""
    return ((seed * 1_000_003 + step) * 1_000_033 + position) & (2**63 - 1)


def sdft_step_fn(config: Config, *, rank: int = 0, world_size: int = 1) -> StepFn:
    """The SDFT step: sample, score with the teacher, train, update the teacher.

    Each prompt is sampled from its own stream `sampling_seed(seed, step, position)`, so a run gives the
    same rollouts whether the batch is split over processes or not; with `world_size` > 1 this process
    handles the positions rank, rank + world_size, ... of every batch.
    """
    objective = build_objective(config.objective)
    gen = config.generation
    sampling = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p)

    def step_fn(backend, batch: Sequence[EncodedExample], step: int) -> dict:
        start = time.perf_counter()
        positions = list(range(rank, len(batch), world_size))
        batch = [batch[i] for i in positions]
        seeds = [sampling_seed(config.seed, step, i) for i in positions]
        rollouts = backend.sample([b.student_ids for b in batch], sampling, seeds=seeds)
        sampled = time.perf_counter()
        targets = backend.teacher_targets([b.teacher_ids for b in batch], rollouts, objective)
        scored = time.perf_counter()
        metrics = dict(backend.train_step(rollouts, targets, objective))
        trained = time.perf_counter()
        backend.update_teacher(step)
        metrics.update(sample_time_s=sampled - start, teacher_time_s=scored - sampled,
                       train_time_s=trained - scored, step_time_s=time.perf_counter() - start,
                       completion_len=sum(len(r.completion_ids) for r in rollouts) / max(1, len(rollouts)),
                       finished_frac=sum(r.finished for r in rollouts) / max(1, len(rollouts)))
        return metrics
    return step_fn


@dataclass
class RunResult:
    """`start_step`: the checkpoint step the run resumed from (0: from the start); equal to `steps` when
    a finished run was only evaluated again."""
    run_dir: Path
    steps: int
    scores_before: dict[str, EvalResult] = field(default_factory=dict)
    scores_after: dict[str, EvalResult] = field(default_factory=dict)
    start_step: int = 0


def _evaluate_all(backend, tokenizer, benchmarks, *, config: Config, run_dir: Path, tag: str, parallel: Parallel,
                  only=None, progress: bool = False) -> dict[str, EvalResult]:
    """Evaluate each benchmark (those `only` accepts) with the backend's greedy decoding, the items shared
    out over the processes; the main process writes the predictions."""
    def generate(prompts, max_new_tokens):
        return backend.generate_greedy(prompts, max_new_tokens, batch_size=config.eval.batch_size)

    chosen = [(b, m) for b, m in benchmarks if only is None or only(b)]
    return evaluate_benchmarks(chosen, parallel.share_generate(generate), tokenizer,
                               predictions_dir=run_dir / "predictions" if parallel.is_main else None, tag=tag,
                               max_prompt_tokens=config.data.max_prompt_tokens,
                               chunk_size=config.eval.batch_size * parallel.world_size, progress=progress,
                               causal_lm=getattr(backend, "module", None),
                               chat_template_kwargs=config.data.chat_template_kwargs)


def _eval_metrics(results: dict[str, EvalResult]) -> dict:
    out = {}
    for result in results.values():
        out.update(result.metrics())
    return out


def _result_to_state(results: dict[str, EvalResult]) -> dict:
    return {name: {"name": r.name, "split": r.split, "n": r.n, "correct": r.correct, "pass_at_1": r.pass_at_1,
                   "ci_low": r.ci_low, "ci_high": r.ci_high, "per_item": list(r.per_item)}
            for name, r in results.items()}


def _result_from_state(state: dict) -> dict[str, EvalResult]:
    return {name: EvalResult(**{**row, "per_item": list(row["per_item"])}) for name, row in state.items()}


def run_training(config: Config, *, backend, tokenizer, train: Sequence[EncodedExample],
                 benchmarks: Sequence[tuple[Benchmark, int | None]], steps: int, step_fn: StepFn,
                 run_dir: str | Path, notes: Sequence[str] = (), parallel: Parallel | None = None,
                 stop_after: int | None = None, run_folder: RunFolder | None = None) -> RunResult:
    """Train for `steps` optimizer steps with `step_fn`, evaluating and checkpointing along the way.

    `run_folder`: run_dir as claimed by `sdft.rundir.claim_run_folder` (lock held, config checked against the
    run it continues); None claims run_dir for the duration of this call.
    With config.resume and a checkpoint in run_dir, continues after the step of the newest intact checkpoint
    (a damaged newer one is reported and skipped; none intact among several is an error) with the same
    weights, optimizer, schedule, RNG streams and batch order; metrics rows past the checkpoint are dropped.
    Resuming from the final step's checkpoint runs no step: the final evaluation is done again with the
    current eval settings (its metrics rows, predictions and summary.md replace the earlier ones; the
    checkpoint, the train rows, and the evaluations before and during training are kept).
    `stop_after` ends the run early after that step (without the final evaluation), for tests and
    time-boxed jobs; `parallel` (`sdft.parallel.Parallel`): only its main process writes anything, and
    evaluations are shared out over its processes.
    """
    parallel = parallel or Parallel()
    is_main_process = parallel.is_main
    if run_folder is None:
        with claim_run_folder(config, run_dir=run_dir, is_main=is_main_process,
                              world_size=parallel.world_size) as claimed:
            return run_training(config, backend=backend, tokenizer=tokenizer, train=train, benchmarks=benchmarks,
                                steps=steps, step_fn=step_fn, run_dir=run_dir, notes=notes, parallel=parallel,
                                stop_after=stop_after, run_folder=claimed)
    run_dir = run_folder.path
    if is_main_process:
        check_logging_requirements(config.logging.trackers, config.logging.plot)
    show_progress = config.logging.progress and is_main_process
    start_step, scores_before = 0, {}
    # (`like`: the live state a sharded checkpoint is loaded into, each process its shards)
    ckpt, damaged = load_latest_intact(run_dir, parallel=parallel, like=lambda: (
        backend.state_tensors(), {"optimizer": backend.optimizer_state()})) if config.resume else (None, [])
    checkpoint_path = None if ckpt is None else ckpt.path
    new_notes = list(run_folder.notes) + [f"damaged checkpoint skipped: {line}" for line in damaged]
    if ckpt is not None:
        new_notes += [f"resumed from {ckpt.path.name}" + (", the newest intact checkpoint" if damaged else "")
                      + ("" if ckpt.verified else " (saved without checksums by an earlier version: unverified)")]
    elif run_folder.continues:
        new_notes.append(f"resume=true but {run_dir / 'checkpoints'} holds no checkpoint: started from step 0")
    notes = [*notes, *new_notes]
    if is_main_process:
        for note in new_notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    if ckpt is not None:
        backend.load_state_tensors(ckpt.tensors)
        backend.load_optimizer_state(ckpt.objects["optimizer"])
        restore_rng_state(ckpt.rng)
        start_step = ckpt.step
        scores_before = _result_from_state(ckpt.state.get("scores_before", {}))
    if is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_folder.record_start(config)
        dump_config(config, run_dir / "config.yaml")
    last = steps if stop_after is None else min(steps, stop_after)
    reevaluate = checkpoint_path is not None and start_step == last == steps  # only the final evaluation again
    logger = MetricsLogger(run_dir, report_to=config.logging.trackers, run_name=config.run_name,
                           project=config.logging.project, config=config_to_dict(config),
                           resume_step=start_step if checkpoint_path is not None else None,
                           keep_at_resume_step=("train",) if reevaluate else None) if is_main_process else None

    def log(step, split, metrics):
        if logger is not None:
            logger.log(step, split, metrics)

    if start_step == 0 and config.eval.before_training and benchmarks:
        scores_before = _evaluate_all(backend, tokenizer, benchmarks, config=config, run_dir=run_dir, tag=".before",
                                      parallel=parallel, progress=show_progress)
        for split in sorted({r.split for r in scores_before.values()}):
            log(0, split, _eval_metrics({k: v for k, v in scores_before.items() if v.split == split}))

    def save(step):
        tensors, optimizer = backend.state_tensors(), backend.optimizer_state()  # every process takes part
        save_checkpoint(run_dir, step, tensors=tensors, objects={"optimizer": optimizer},
                        state={"step": step, "scores_before": _result_to_state(scores_before)},
                        keep_last=config.checkpoint.keep_last, rng=capture_rng_state(), parallel=parallel)

    with ProgressBar(steps, initial=start_step, desc=config.run_name, enabled=show_progress) as bar:
        for step in range(start_step + 1, last + 1):
            batch = [train[i] for i in batch_indices(step, n_examples=len(train), batch_size=config.optim.batch_size,
                                                     seed=config.seed)]
            metrics = step_fn(backend, batch, step)
            log(step, "train", {f"train/{k}": v for k, v in metrics.items()})
            due = [b for b, _ in benchmarks if b.run_every and step % b.run_every == 0 and step != steps]
            if due:
                names = {b.name for b in due}
                results = _evaluate_all(backend, tokenizer, benchmarks, config=config, run_dir=run_dir,
                                        tag=f".step{step}", only=lambda b: b.name in names, parallel=parallel,
                                        progress=show_progress)
                for split in sorted({r.split for r in results.values()}):
                    log(step, split, _eval_metrics({k: v for k, v in results.items() if v.split == split}))
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step != steps:
                save(step)
            bar.update(1, loss=round(float(metrics.get("loss", float("nan"))), 4))
    if last < steps:
        if logger is not None:
            logger.close()
        return RunResult(run_dir=run_dir, steps=last, scores_before=scores_before, start_step=start_step)

    scores_after = _evaluate_all(backend, tokenizer, benchmarks, config=config, run_dir=run_dir, tag="",
                                 parallel=parallel, progress=show_progress)
    for split in sorted({r.split for r in scores_after.values()}):
        log(steps, split, _eval_metrics({k: v for k, v in scores_after.items() if v.split == split}))
    if not reevaluate:  # a re-evaluation keeps the final checkpoint it loaded
        save(steps)
    if logger is not None:
        logger.close()
    if is_main_process:
        if config.logging.plot:
            plot_learning_curves(run_dir / "metrics.jsonl", run_dir / "learning_curves.png")
        write_summary(run_dir / "summary.md", title=f"{config.algorithm.upper()} run {config.run_name}",
                      config=config_to_dict(config), scores_before=scores_before, scores_after=scores_after,
                      notes=list(notes))
    return RunResult(run_dir=run_dir, steps=steps, scores_before=scores_before, scores_after=scores_after,
                     start_step=start_step)
