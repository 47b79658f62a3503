"""From a Config to a finished run: load model, data and benchmarks, build the backend, run the loop.

Under `accelerate launch` with P processes (`sdft.parallel`: DDP or FSDP2) each process takes its share of
every batch and of every evaluation, the objective is normalized over the whole batch, and only the main
process writes metrics, predictions and the summary.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from sdft.batches import encode_examples, total_steps, truncation_report
from sdft.build import build_benchmarks, load_run_data
from sdft.config import Config
from sdft.loop import RunResult, run_training, sdft_step_fn
from sdft.parallel import Parallel
from sdft.rundir import RunFolder, claim_run_folder
from sdft.sft import sft_step_fn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validate_run(config: Config) -> list[str]:
    """Check a config offline without training: the model and tokenizer load (chat template present), the
    data loads and encodes, and every benchmark loads. Returns human-readable lines; raises on the first problem."""
    from sdft.backends import preflight

    from sdft.logs import check_logging_requirements

    lines = [f"config: ok ({config.algorithm}, teacher {config.teacher.mode}, objective {config.objective.targets}, "
             f"backend {config.backend.kind})"]
    check_logging_requirements(config.logging.trackers, config.logging.plot)
    lines.append(f"logging: ok (trackers: {', '.join(config.logging.trackers) or 'none'}; "
                 f"plot {'on' if config.logging.plot else 'off'})")
    tokenizer, model_lines = preflight(config)
    lines += model_lines
    data = load_run_data(config)
    encoded = encode_examples(tokenizer, data.train, template=config.teacher.template,
                              max_prompt_tokens=config.data.max_prompt_tokens,
                              chat_template_kwargs=config.data.chat_template_kwargs)
    lines += [f"data: ok ({note})" for note in data.notes]
    lines.append(f"prompts: {truncation_report(encoded, config.data.max_prompt_tokens).describe()}")
    for benchmark, max_items in build_benchmarks(config, data.heldout):
        lines.append(f"benchmark {benchmark.name}: ok ({len(benchmark.items)} items"
                     + (f", first {max_items} used" if max_items else "") + ")")
    return lines


def _averaging_metrics(step_fn, parallel: Parallel):
    """Wrap a step so that every process reports the mean over processes of each metric (the objective's
    metrics are already those of the whole batch; times and rates differ by process)."""
    def averaged(backend, batch, step):
        metrics = step_fn(backend, batch, step)
        keys = sorted(metrics)
        values = parallel.sum([float(metrics[k]) for k in keys])
        return {key: value / parallel.world_size for key, value in zip(keys, values)}
    return averaged


def train_from_config(config: Config, *, parallel: Parallel | None = None, stop_after: int | None = None) -> RunResult:
    """Run the whole job described by `config` (see `sdft.loop.run_training`). The run folder is claimed
    first (`sdft.rundir.claim_run_folder`: in use, already holding a run, or resumed with other settings
    stops here, before any model is loaded) and held until the run ends."""
    parallel = parallel or Parallel()
    if config.optim.batch_size % parallel.world_size:
        raise ValueError(f"optim.batch_size={config.optim.batch_size} must be a multiple of the number of processes "
                         f"({parallel.world_size}): every process takes an equal share of each batch")
    with claim_run_folder(config, is_main=parallel.is_main, world_size=parallel.world_size) as folder:
        return _train_in_folder(config, folder, parallel, stop_after)


def _train_in_folder(config: Config, folder: RunFolder, parallel: Parallel, stop_after: int | None) -> RunResult:
    from sdft.backends import build_backend

    run_dir = folder.path
    seed_everything(config.seed)
    data = load_run_data(config)
    steps = total_steps(len(data.train), config.optim.batch_size, config.optim.epochs, config.optim.max_steps)
    backend = build_backend(config, steps=steps, parallel=parallel, run_dir=run_dir)
    tokenizer = backend.tokenizer
    train = encode_examples(tokenizer, data.train, template=config.teacher.template,
                            max_prompt_tokens=config.data.max_prompt_tokens,
                            chat_template_kwargs=config.data.chat_template_kwargs)
    benchmarks = build_benchmarks(config, data.heldout)
    make_step = sdft_step_fn if config.algorithm == "sdft" else sft_step_fn
    step_fn = make_step(config, rank=parallel.rank, world_size=parallel.world_size)
    if parallel.world_size > 1:
        step_fn = _averaging_metrics(step_fn, parallel)
    notes = list(data.notes) + [f"{steps} optimizer steps of {config.optim.batch_size} prompts"]
    truncation = truncation_report(train, config.data.max_prompt_tokens).note
    if truncation is not None:
        notes.append(truncation)
        if parallel.is_main:
            warnings.warn(truncation, stacklevel=2)
    notes += backend.notes
    return run_training(config, backend=backend, tokenizer=tokenizer, train=train, benchmarks=benchmarks, steps=steps,
                        step_fn=step_fn, run_dir=run_dir, notes=notes, parallel=parallel, stop_after=stop_after,
                        run_folder=folder)
