"""What the base model does with a skill's data, greedy: the numbers that say whether SDFT can teach it.

For the held-out rows of a skill (PromptExample JSONL, scored like the training loop scores them):

- `student`: the bare prompt, i.e. the student before training;
- `teacher[<template>]`: the teacher prompt, the row's own demonstration in context (what the teacher
  sees during training; an upper bound that includes copying the answer from the demonstration);
- `fewshot<k>`: k training rows (fixed draw) as earlier user / assistant turns, then the held-out prompt:
  the skill the model shows in context on prompts whose answer it was not shown, the ceiling that a
  student distilled from such a teacher can be expected to reach;
- `retention` (optional): an evsys task folder the student should keep answering.

SDFT needs the teacher to be right and the few-shot score to be well above the student's: the student
learns from its own samples scored by the teacher, and keeps on unseen prompts what the model can do in
context. `python -m sdft.datasets.laptop.make_toolcalls --measure` and
`python -m sdft.datasets.laptop.make_laptop --measure` print these numbers (`generator_main`).
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

FEWSHOT_SEED = 0


def fewshot_messages(example, shots: Sequence) -> tuple[dict, ...]:
    """The example's messages preceded by each shot's (user turn, demonstration) pair."""
    turns = []
    for shot in shots:
        turns += [dict(shot.messages[-1]), {"role": "assistant", "content": shot.demonstration}]
    return tuple(turns) + tuple(dict(m) for m in example.messages)


def measure_skill(train_path: str | Path, heldout_path: str | Path, *, retention: str | Path | None = None,
                  templates: Sequence[str] = ("official", "turns"), shots: Sequence[int] = (1, 3),
                  model_name: str = "SmolLM2-135M-Instruct", max_new_tokens: int = 40, batch_size: int = 16,
                  max_items: int | None = None, predictions_dir: str | Path | None = None) -> dict:
    """{name: EvalResult} for the student, teacher and few-shot prompts on the held-out rows (the first
    `max_items`), and the retention folder when given; with `predictions_dir`, every completion is saved."""
    from sdft.data import load_jsonl_examples
    from sdft.evaluation import benchmark_from_examples, evaluate, load_task_benchmark
    from sdft.models import load_model_and_tokenizer
    from sdft.prompts import DEMONSTRATION_TURNS, TEACHER_TEMPLATES, teacher_messages
    from sdft.sampling import NativeSampler

    model, tokenizer = load_model_and_tokenizer(model_name)
    generate = NativeSampler(model, tokenizer, batch_size=batch_size).greedy
    train = load_jsonl_examples(train_path)
    heldout = load_jsonl_examples(heldout_path)[:max_items]
    variants = {"student": heldout}
    for template in templates:
        label = template if template in (*TEACHER_TEMPLATES, DEMONSTRATION_TURNS) else "custom"
        variants[f"teacher[{label}]"] = [replace(e, messages=tuple(teacher_messages(e, template))) for e in heldout]
    rng = random.Random(FEWSHOT_SEED)
    for k in shots:
        variants[f"fewshot{k}"] = [replace(e, messages=fewshot_messages(e, rng.sample(train, k))) for e in heldout]
    out = {}
    for name, examples in variants.items():
        benchmark = benchmark_from_examples(name.replace("[", "_").replace("]", ""), examples,
                                            max_new_tokens=max_new_tokens)
        out[name] = evaluate(benchmark, generate, tokenizer, chunk_size=batch_size,
                             predictions_path=None if predictions_dir is None
                             else Path(predictions_dir) / f"{benchmark.name}.jsonl")
    if retention is not None:
        benchmark = load_task_benchmark(retention, max_new_tokens=max_new_tokens)
        out["retention"] = evaluate(benchmark, generate, tokenizer, chunk_size=batch_size,
                                    predictions_path=None if predictions_dir is None
                                    else Path(predictions_dir) / "retention.jsonl")
    return out


def print_report(results: dict) -> None:
    for name, result in results.items():
        print(f"{name}: {result.correct}/{result.n} = {result.pass_at_1:.1%} "
              f"(95% Wilson {result.ci_low:.1%}-{result.ci_high:.1%})")


def write_files(files: Mapping[str, list[dict]], folder: str | Path) -> None:
    """Each {relative file name: rows} written as JSONL under `folder`, atomically."""
    from sdft.io import atomic_write_jsonl

    for name, rows in files.items():
        atomic_write_jsonl(Path(folder) / name, rows)


def generator_main(argv: Sequence[str] | None, *, description: str, build: Callable[[], Mapping[str, list[dict]]],
                   folder: Path, train: Path, heldout: Path, retention: Path | None = None,
                   max_new_tokens: int = 40) -> None:
    """The command line of a skill's data generator: (re)write `build()` under `folder`; with --measure, also
    `print_report(measure_skill(train, heldout, retention=retention))`."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--measure", action="store_true", help="also report greedy pass rates of the base model")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    args = parser.parse_args(argv)
    files = build()
    write_files(files, folder)
    print("wrote", ", ".join(f"{name}: {len(rows)} rows" for name, rows in files.items()))
    if args.measure:
        print_report(measure_skill(train, heldout, retention=retention, max_new_tokens=args.max_new_tokens))
