"""Build the data pieces of a run from a Config: training examples, the held-out split and benchmarks
(the backend is built by `sdft.backends.build_backend`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdft.config import Config
from sdft.data import (CONVERSATIONAL_KINDS, QUICKSTART_DIR, PromptExample, load_examples, split_examples,
                       with_system_prompt)
from sdft.evaluation import Benchmark, benchmark_from_examples, load_task_benchmark
from sdft.lm_eval_bridge import LmEvalBenchmark

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
    source = {"split": data.hf_split, "config": data.hf_config, "revision": data.hf_revision}
    if data.kind == "jsonl":
        return {"user_template": data.user_template}
    if data.kind == "science":
        return {"thinking_format": data.thinking_format}
    if data.kind == "hf":
        return {**source, "question_field": data.question_field, "answer_field": data.answer_field,
                "user_template": data.user_template}
    if data.kind in CONVERSATIONAL_KINDS:
        return {**source, "answer_field": data.answer_field}
    return {}


def _load(kind: str, path: Path, system_prompt: str | None, **options) -> list[PromptExample]:
    """Examples of a loader, with data.system_prompt as their system turn (every kind)."""
    return [with_system_prompt(example, system_prompt) for example in load_examples(kind, path, **options)]


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
    examples = _load(data.kind, path, data.system_prompt, **_loader_options(config))
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


def build_benchmarks(config: Config,
                     heldout: list[PromptExample]) -> list[tuple[Benchmark | LmEvalBenchmark, int | None]]:
    """Each configured benchmark with its max_items (kind lm_eval: an `LmEvalBenchmark`)."""
    out = []
    for bench in config.eval.benchmarks:
        common = {"split": bench.split, "run_every": bench.run_every, "max_new_tokens": bench.max_new_tokens}
        if bench.kind == "lm_eval":
            folder = None if bench.path is None else str(resolve_path(bench.path))
            benchmark = LmEvalBenchmark(
                name=bench.name, task=bench.task, include_path=folder, metric=bench.metric,
                num_fewshot=bench.num_fewshot, chat_template=bench.chat_template,
                allow_code_execution=bench.allow_code_execution, **common)
        elif bench.kind == "tasks":
            benchmark = load_task_benchmark(resolve_path(bench.path), name=bench.name, **common)
        else:
            if bench.kind == "heldout" and heldout:
                examples = heldout
            elif bench.kind == "heldout" and not bench.path:
                raise ValueError(f"eval.benchmarks {bench.name!r}: kind 'heldout' needs a data split or a path")
            elif bench.kind == "heldout":
                examples = _load(config.data.kind, resolve_path(bench.path), config.data.system_prompt,
                                 **_loader_options(config))
            else:
                options = {"thinking_format": config.data.thinking_format} if bench.kind == "science" else {}
                if bench.kind == "jsonl":
                    options = {"user_template": config.data.user_template}
                examples = _load(bench.kind, resolve_path(bench.path), config.data.system_prompt, **options)
            benchmark = benchmark_from_examples(bench.name, examples, tooluse_mode=bench.tooluse_mode,
                                                mcq_mode=bench.mcq_mode, **common)
        out.append((benchmark, bench.max_items))
    return out
