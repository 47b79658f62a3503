"""From a Config to a finished run: load model, data and benchmarks, build the backend, run the loop.

Under `accelerate launch --num_processes P` each process takes its share of every batch, gradients are
averaged across processes before each optimizer step, and only the main process writes metrics,
predictions, checkpoints and the summary.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdft.batches import encode_examples, total_steps
from sdft.build import build_benchmarks, build_local_backend, build_tinker_backend, load_run_data
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


def _tinker_parts(config: Config, run_dir: Path, device=None):
    """(tokenizer, service client or None) for backend.kind=tinker: offline serves model.name locally (on
    `device` when given); remote checks TINKER_API_KEY first and loads only the tokenizer."""
    from sdft.backends.local import DTYPES
    from sdft.models import load_model_and_tokenizer, load_tokenizer

    if config.backend.tinker_service == "offline":
        from sdft.build import build_offline_tinker_service

        model, tokenizer = load_model_and_tokenizer(config.model.name, dtype=DTYPES[config.model.dtype],
                                                    cache_dir=config.model.cache_dir)
        if device is not None:
            model.to(device)
        return tokenizer, build_offline_tinker_service(config, model, tokenizer, root=run_dir / "tinker_offline")
    from sdft.backends.tinker import require_api_key

    require_api_key()
    return load_tokenizer(config.model.name, cache_dir=config.model.cache_dir), None


def validate_run(config: Config) -> list[str]:
    """Check a config offline without training: the model and tokenizer load (chat template present), the
    data loads, and every benchmark loads. Returns human-readable lines; raises on the first problem."""
    from sdft.models import load_model_and_tokenizer, load_tokenizer, resolve_model_path

    lines = [f"config: ok ({config.algorithm}, teacher {config.teacher.mode}, loss {config.loss.targets}, "
             f"backend {config.backend.kind})"]
    if config.backend.kind == "tinker" and config.backend.tinker_service == "remote":
        import os

        tokenizer = load_tokenizer(config.model.name, cache_dir=config.model.cache_dir)
        lines.append(f"tokenizer: ok ({config.model.name}, vocabulary {len(tokenizer)}); Tinker base model "
                     f"{config.backend.tinker_base_model}, TINKER_API_KEY "
                     f"{'set' if os.environ.get('TINKER_API_KEY', '').strip() else 'NOT set (training will stop)'}")
    else:
        model_path = resolve_model_path(config.model.name, cache_dir=config.model.cache_dir)
        _, tokenizer = load_model_and_tokenizer(model_path, cache_dir=config.model.cache_dir)
        lines.append(f"model: ok ({config.model.name} -> {model_path}, vocabulary {len(tokenizer)})")
    data = load_run_data(config)
    encode_examples(tokenizer, data.train[:4], template=config.teacher.template,
                    max_prompt_tokens=config.data.max_prompt_tokens)
    lines += [f"data: ok ({note})" for note in data.notes]
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
    from sdft.models import load_model_and_tokenizer

    run_dir = folder.path
    seed_everything(config.seed)
    if config.backend.kind == "tinker":
        if dist.world_size > 1:
            raise ValueError(f"backend.kind=tinker runs in one process (Tinker batches the work itself); got "
                             f"{dist.world_size} processes: launch scripts/train.py without accelerate")
        tokenizer, service = _tinker_parts(config, run_dir, dist.device)
    else:
        model, tokenizer = load_model_and_tokenizer(config.model.name, cache_dir=config.model.cache_dir)
    data = load_run_data(config)
    train = encode_examples(tokenizer, data.train, template=config.teacher.template,
                            max_prompt_tokens=config.data.max_prompt_tokens)
    benchmarks = build_benchmarks(config, data.heldout)
    steps = total_steps(len(train), config.optim.batch_size, config.optim.epochs, config.optim.max_steps)
    if config.backend.kind == "tinker":
        backend = build_tinker_backend(config, tokenizer, steps=steps, service_client=service)
    else:
        backend = build_local_backend(config, model, tokenizer, steps=steps, device=dist.device,
                                      grad_sync=_gradient_averager(dist.world_size), rank=dist.rank)
    make_step = sdft_step_fn if config.algorithm == "sdft" else sft_step_fn
    step_fn = make_step(config, rank=dist.rank, world_size=dist.world_size)
    if dist.world_size > 1:
        step_fn = _averaging_metrics(step_fn)
    notes = list(data.notes) + [f"{steps} optimizer steps of {config.optim.batch_size} prompts"
                                + (f" over {dist.world_size} processes" if dist.world_size > 1 else "")]
    if config.backend.kind == "tinker":
        notes.append(f"backend: Tinker ({config.backend.tinker_service} service), base model "
                     f"{config.backend.tinker_base_model}, LoRA rank {config.backend.tinker_lora_rank}")
    return run_training(config, backend=backend, tokenizer=tokenizer, train=train, benchmarks=benchmarks, steps=steps,
                        step_fn=step_fn, run_dir=run_dir, notes=notes, is_main_process=dist.is_main,
                        stop_after=stop_after, run_folder=folder)
