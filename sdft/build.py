"""Build the pieces of a run from a Config: data, benchmarks, model and backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdft.config import Config
from sdft.data import QUICKSTART_DIR, PromptExample, load_examples, split_examples
from sdft.evaluation import Benchmark, benchmark_from_examples, load_task_benchmark

PACKAGE_PREFIX = "package:"
"""Paths starting with this prefix point into the data shipped with sdft (e.g. package:quickstart/train.jsonl)."""


def resolve_path(path: str) -> Path:
    """A config path: "package:<rel>" inside the data shipped with sdft, else a normal path."""
    if path.startswith(PACKAGE_PREFIX):
        return QUICKSTART_DIR.parent / path[len(PACKAGE_PREFIX):]
    return Path(path).expanduser()


@dataclass
class RunData:
    """Training examples, the held-out split (empty when data.split is "none") and notes for the summary."""

    train: list[PromptExample]
    heldout: list[PromptExample]
    notes: list[str] = field(default_factory=list)


def _loader_options(config: Config) -> dict:
    data = config.data
    if data.kind == "jsonl":
        return {"user_template": data.user_template, "system_prompt": data.system_prompt}
    if data.kind == "science":
        return {"thinking_format": data.thinking_format}
    if data.kind == "hf":
        return {"split": data.hf_split, "question_field": data.question_field, "answer_field": data.answer_field,
                "user_template": data.user_template}
    return {}


def load_run_data(config: Config) -> RunData:
    """Load data.path with the loader of data.kind, optionally cap and split it."""
    data = config.data
    path, split, notes = resolve_path(data.path), data.split, []
    if not path.exists() and data.fallback_path is not None:
        fallback = resolve_path(data.fallback_path)
        if not fallback.exists():
            raise FileNotFoundError(f"data.path={data.path!r} does not exist and neither does "
                                    f"data.fallback_path={data.fallback_path!r}")
        notes.append(f"data.path {data.path} is absent: training on data.fallback_path {data.fallback_path} "
                     f"instead, split by {data.fallback_split!r}")
        path, split = fallback, data.fallback_split
    examples = load_examples(data.kind, path, **_loader_options(config))
    if not examples:
        raise ValueError(f"data.path={data.path!r}: the dataset is empty")
    notes.append(f"data: {len(examples)} examples of kind {data.kind!r} from {path}")
    if split == "none":
        train, heldout = examples, []
    else:
        train, heldout = split_examples(examples, by=split, test_fraction=data.test_fraction,
                                        seed=data.split_seed)
        notes.append(f"split by {split!r} (test_fraction={data.test_fraction}, seed={data.split_seed}): "
                     f"{len(train)} train / {len(heldout)} held out")
        if split == "api":
            held_apis = sorted({e.id.rsplit('/', 1)[0] for e in heldout})
            notes.append(f"held-out APIs (never seen in training): {', '.join(held_apis)}")
    if data.max_examples is not None and len(train) > data.max_examples:
        train = train[:data.max_examples]
        notes.append(f"training capped at data.max_examples={data.max_examples}")
    return RunData(train=train, heldout=heldout, notes=notes)


def build_benchmarks(config: Config, heldout: list[PromptExample]) -> list[tuple[Benchmark, int | None]]:
    """Each configured benchmark with its max_items."""
    out = []
    for bench in config.eval.benchmarks:
        common = {"split": bench.split, "run_every": bench.run_every, "max_new_tokens": bench.max_new_tokens}
        if bench.kind == "tasks":
            benchmark = load_task_benchmark(resolve_path(bench.path), name=bench.name, **common)
        else:
            if bench.kind == "heldout" and heldout:
                examples = heldout
            elif bench.kind == "heldout" and not bench.path:
                raise ValueError(f"eval.benchmarks {bench.name!r}: kind 'heldout' needs a data split or a path")
            elif bench.kind == "heldout":
                examples = load_examples(config.data.kind, resolve_path(bench.path), **_loader_options(config))
            else:
                options = {"thinking_format": config.data.thinking_format} if bench.kind == "science" else {}
                if bench.kind == "jsonl":
                    options = {"user_template": config.data.user_template, "system_prompt": config.data.system_prompt}
                examples = load_examples(bench.kind, resolve_path(bench.path), **options)
            benchmark = benchmark_from_examples(bench.name, examples, tooluse_mode=bench.tooluse_mode,
                                                mcq_mode=bench.mcq_mode, **common)
        out.append((benchmark, bench.max_items))
    return out


def build_local_backend(config: Config, model, tokenizer, *, steps: int, device=None, grad_sync=None, rank: int = 0):
    """A LocalBackend configured from the student, teacher, optim and model sections. `grad_sync` (called
    with the trainable parameters before each optimizer step) averages gradients in a distributed run;
    `rank` offsets the sampling seed so that processes draw different samples."""
    from sdft.backends.local import LocalBackend

    student, teacher, optim = config.student, config.teacher, config.optim
    return LocalBackend(
        model, tokenizer, student_mode=student.mode, lora_rank=student.lora_rank, lora_alpha=student.lora_alpha,
        lora_dropout=student.lora_dropout, lora_target_modules=list(student.lora_target_modules),
        teacher_mode=teacher.mode, ema_alpha=teacher.ema_alpha, ema_fp32=teacher.ema_fp32,
        sync_every=teacher.sync_every if teacher.mode == "sync" else None,
        lr=optim.lr, weight_decay=optim.weight_decay, beta1=optim.beta1, beta2=optim.beta2, eps=optim.eps,
        schedule=optim.schedule, total_steps=steps, warmup_ratio=optim.warmup_ratio,
        max_grad_norm=optim.max_grad_norm, gradient_checkpointing=config.model.gradient_checkpointing,
        dtype=config.model.dtype, device=device, seed=config.seed + 1000003 * rank,
        generation_batch_size=config.generation.batch_size, grad_sync=grad_sync,
        master_weights=config.optim.master_weights,
    )


def build_tinker_backend(config: Config, tokenizer, *, steps: int, service_client=None):
    """A TinkerBackend configured from the backend, student, teacher and optim sections. `service_client`:
    an injected service (e.g. `sdft.backends.tinker_offline.OfflineServiceClient`); None builds
    `tinker.ServiceClient()`, which needs TINKER_API_KEY."""
    from sdft.backends.tinker import TinkerBackend

    backend, teacher, optim = config.backend, config.teacher, config.optim
    return TinkerBackend(
        backend.tinker_base_model, tokenizer, service_client=service_client, lora_rank=backend.tinker_lora_rank,
        seed=config.seed, train_unembed=backend.tinker_train_unembed, teacher_mode=teacher.mode,
        sync_every=teacher.sync_every if teacher.mode == "sync" else None, lr=optim.lr, beta1=optim.beta1,
        beta2=optim.beta2, eps=optim.eps, weight_decay=optim.weight_decay, max_grad_norm=optim.max_grad_norm,
        schedule=optim.schedule, total_steps=steps, warmup_ratio=optim.warmup_ratio,
        max_retries=backend.max_retries, retry_backoff_s=backend.retry_backoff_s,
    )


def build_offline_tinker_service(config: Config, model, tokenizer, *, root):
    """The in-process Tinker stand-in serving `model` (loaded from model.name) under the name
    backend.tinker_base_model, with the student's LoRA alpha and dropout; checkpoints under `root`."""
    from sdft.backends.tinker_offline import OfflineServiceClient

    return OfflineServiceClient(model, tokenizer, base_model=config.backend.tinker_base_model, root=root,
                                lora_alpha=config.student.lora_alpha, lora_dropout=config.student.lora_dropout,
                                seed=config.seed)
