"""From a Config to a finished run: load model, data and benchmarks, build the backend, run the loop.

Under `accelerate launch --num_processes P` each process takes its share of every batch, gradients are
averaged across processes before each optimizer step, and only the main process writes metrics,
predictions, checkpoints and the summary.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from sdft.batches import encode_examples, total_steps, truncation_report
from sdft.build import build_benchmarks, load_run_data
from sdft.config import Config
from sdft.loop import RunResult, run_training, sdft_step_fn
from sdft.rundir import RunFolder, claim_run_folder
from sdft.sft import sft_step_fn


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_distributed() -> Distributed:
    """Rank and world size from accelerate when launched with it, else a single process."""
    try:
        from accelerate import PartialState
    except ImportError:
        return Distributed()
    state = PartialState()
    return Distributed(rank=state.process_index, world_size=state.num_processes, device=state.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validate_run(config: Config) -> list[str]:
    """Check a config offline without training: the model and tokenizer load (chat template present), the
    data loads and encodes, and every benchmark loads. Returns human-readable lines; raises on the first problem."""
    from sdft.backends import preflight

    lines = [f"config: ok ({config.algorithm}, teacher {config.teacher.mode}, objective {config.objective.targets}, "
             f"backend {config.backend.kind})"]
    tokenizer, model_lines = preflight(config)
    lines += model_lines
    data = load_run_data(config)
    encoded = encode_examples(tokenizer, data.train, template=config.teacher.template,
                              max_prompt_tokens=config.data.max_prompt_tokens)
    lines += [f"data: ok ({note})" for note in data.notes]
    lines.append(f"prompts: {truncation_report(encoded, config.data.max_prompt_tokens).describe()}")
    for benchmark, max_items in build_benchmarks(config, data.heldout):
        lines.append(f"benchmark {benchmark.name}: ok ({len(benchmark.items)} items"
                     + (f", first {max_items} used" if max_items else "") + ")")
    return lines


def _gradient_averager(world_size: int):
    if world_size == 1:
        return None

    def average(params):
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
    return average


def _averaging_metrics(step_fn):
    """Wrap a step so that every process reports the mean of the processes' metrics."""
    def averaged(backend, batch, step):
        metrics = step_fn(backend, batch, step)
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        values /= torch.distributed.get_world_size()
        return dict(zip(keys, values.tolist()))
    return averaged


def train_from_config(config: Config, *, dist: Distributed | None = None, stop_after: int | None = None) -> RunResult:
    """Run the whole job described by `config` (see `sdft.loop.run_training`). The run folder is claimed
    first (`sdft.rundir.claim_run_folder`: in use, already holding a run, or resumed with other settings
    stops here, before any model is loaded) and held until the run ends."""
    dist = dist or Distributed()
    with claim_run_folder(config, is_main=dist.is_main, world_size=dist.world_size) as folder:
        return _train_in_folder(config, folder, dist, stop_after)


def _train_in_folder(config: Config, folder: RunFolder, dist: Distributed, stop_after: int | None) -> RunResult:
    from sdft.backends import build_backend

    run_dir = folder.path
    seed_everything(config.seed)
    data = load_run_data(config)
    steps = total_steps(len(data.train), config.optim.batch_size, config.optim.epochs, config.optim.max_steps)
    backend = build_backend(config, steps=steps, rank=dist.rank, world_size=dist.world_size, device=dist.device,
                            grad_sync=_gradient_averager(dist.world_size), run_dir=run_dir)
    tokenizer = backend.tokenizer
    train = encode_examples(tokenizer, data.train, template=config.teacher.template,
                            max_prompt_tokens=config.data.max_prompt_tokens)
    benchmarks = build_benchmarks(config, data.heldout)
    make_step = sdft_step_fn if config.algorithm == "sdft" else sft_step_fn
    step_fn = make_step(config, rank=dist.rank, world_size=dist.world_size)
    if dist.world_size > 1:
        step_fn = _averaging_metrics(step_fn)
    notes = list(data.notes) + [f"{steps} optimizer steps of {config.optim.batch_size} prompts"
                                + (f" over {dist.world_size} processes" if dist.world_size > 1 else "")]
    truncation = truncation_report(train, config.data.max_prompt_tokens).note
    if truncation is not None:
        notes.append(truncation)
        if dist.is_main:
            warnings.warn(truncation, stacklevel=2)
    notes += backend.notes
    return run_training(config, backend=backend, tokenizer=tokenizer, train=train, benchmarks=benchmarks, steps=steps,
                        step_fn=step_fn, run_dir=run_dir, notes=notes, is_main_process=dist.is_main,
                        stop_after=stop_after, run_folder=folder)
