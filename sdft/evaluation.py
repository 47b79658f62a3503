"""Greedy evaluation: render prompts, generate, score each completion, write predictions.

Generation is a plain callable, so the same evaluation runs on any backend::

    GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
    # (prompt token ids per item, max_new_tokens) -> completion token ids per item, greedy decoding

`sdft.sampling.NativeSampler(model, tokenizer).greedy` is one for a local Hugging Face model. A benchmark is a named tuple of
`EvalItem`s, each carrying its own verifier; it comes from an evsys task folder (`load_task_benchmark`)
or from training-style examples (`benchmark_from_examples`). Results carry pass@1 with a Wilson 95%
interval and use the evsys metric keys ``<split>/<benchmark>/pass@1``.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from sdft.data import iter_text_lines
from sdft.io import atomic_write_jsonl
from sdft.stats import wilson_interval
from sdft.verifiers import (MCQ_MODES, TOOLUSE_MODES, VERIFIERS, check_expected, get_verifier,
                            score_mcq, score_tool_calls)

if TYPE_CHECKING:
    from sdft.data import PromptExample
    from sdft.lm_eval_bridge import LmEvalBenchmark

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
DEFAULT_MAX_NEW_TOKENS = 256
TASKS_FILE = "tasks.jsonl"
_TASK_KEYS = ("task_id", "instruction", "verifier")
_VERIFIER_KEYS = ("kind", "fn_name", "expected")
_VERIFIER_KINDS = ("in_process",)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class EvalItem:
    """One scored prompt: chat messages (user turn last), a text -> bool verifier, and its reference."""
    id: str
    messages: tuple[dict, ...]
    verifier: Callable[[str], bool]
    reference: Any = None


@dataclass(frozen=True)
class Benchmark:
    """A named set of items; `split` labels its metrics, `run_every` N scores it every N steps (None:
    once, after training)."""
    name: str
    items: tuple[EvalItem, ...]
    split: str = "val"
    run_every: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"benchmark name {self.name!r}: must be non-empty and contain no '/'")
        if not self.split or "/" in self.split:
            raise ValueError(f"benchmark {self.name!r}: split {self.split!r} must be non-empty without '/'")
        if self.run_every is not None and not _is_positive_int(self.run_every):
            raise ValueError(f"benchmark {self.name!r}: run_every {self.run_every!r} must be a positive "
                             "integer or None (once, after training)")
        if not _is_positive_int(self.max_new_tokens):
            raise ValueError(f"benchmark {self.name!r}: max_new_tokens {self.max_new_tokens!r} must be a "
                             "positive integer")
        if not self.items:
            raise ValueError(f"benchmark {self.name!r}: has no items")
        ids = [item.id for item in self.items]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"benchmark {self.name!r}: item id {duplicate!r} appears more than once")


@dataclass(frozen=True)
class EvalResult:
    """pass@1 of one benchmark with its Wilson interval and the per-item outcomes."""
    name: str
    split: str
    n: int
    correct: int
    pass_at_1: float
    ci_low: float
    ci_high: float
    per_item: list[bool] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``{"<split>/<name>/pass@1", ".../ci_low", ".../ci_high", ".../n"}``."""
        prefix = f"{self.split}/{self.name}"
        return {f"{prefix}/pass@1": self.pass_at_1, f"{prefix}/ci_low": self.ci_low,
                f"{prefix}/ci_high": self.ci_high, f"{prefix}/n": self.n}


# ------------------------------------------------------------------------------------------ loading
def load_task_benchmark(folder: str | os.PathLike, name: str | None = None, split: str = "val",
                        run_every: int | None = None,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Benchmark:
    """Read an evsys benchmark folder: ``<folder>/tasks.jsonl``, one task per line::

        {"task_id": str, "instruction": str,
         "verifier": {"kind": "in_process", "fn_name": <a VERIFIERS name>, "expected": ...}}

    The instruction becomes a single user message. `name` defaults to the folder's name. Errors name
    the file and line; a degenerate `expected` (blank, a regex that matches the empty string, no tool
    calls: see `sdft.verifiers`) is refused as the field 'verifier.expected'.
    """
    path = Path(folder) / TASKS_FILE
    if not path.is_file():
        raise ValueError(f"benchmark folder {str(folder)!r}: no {TASKS_FILE} in it")
    items = []
    seen: dict[str, int] = {}
    for line_number, line in iter_text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        item = _task_item(line, where)
        if item.id in seen:
            raise ValueError(f"{where}: task_id {item.id!r} already used on line {seen[item.id]}")
        seen[item.id] = line_number
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no tasks (the file is empty)")
    return Benchmark(name=name or Path(folder).resolve().name, items=tuple(items), split=split,
                     run_every=run_every, max_new_tokens=max_new_tokens)


def _task_item(line: str, where: str) -> EvalItem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(_TASK_KEYS)}, got {type(row).__name__}")
    missing = [key for key in _TASK_KEYS if key not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a task needs {list(_TASK_KEYS)}")
    task_id, instruction, spec = row["task_id"], row["instruction"], row["verifier"]
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
        raise ValueError(f"{where}: task_id must be a string, got {task_id!r}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: instruction must be a non-empty string, got {instruction!r:.80}")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: verifier must be an object with keys {list(_VERIFIER_KEYS)}, got {spec!r:.80}")
    missing = [key for key in _VERIFIER_KEYS if key not in spec]
    if missing:
        raise ValueError(f"{where}: verifier is missing key(s) {missing}; it needs {list(_VERIFIER_KEYS)}")
    if spec["kind"] not in _VERIFIER_KINDS:
        raise ValueError(f"{where}: verifier kind {spec['kind']!r} is not supported; allowed: {list(_VERIFIER_KINDS)}")
    fn_name = spec["fn_name"]
    if fn_name not in VERIFIERS:
        raise ValueError(f"{where}: verifier fn_name {fn_name!r} is not one of {sorted(VERIFIERS)}")
    try:
        check_expected(fn_name, spec["expected"])
    except ValueError as err:
        raise ValueError(f"{where}: field 'verifier.expected': {err}") from None
    return EvalItem(id=str(task_id), messages=({"role": "user", "content": instruction},),
                    verifier=functools.partial(VERIFIERS[fn_name], expected=spec["expected"]),
                    reference=spec["expected"])


def benchmark_from_examples(name: str, examples: Iterable[PromptExample], *, tooluse_mode: str = "strict",
                            mcq_mode: str = "official", generic_verifier: str = "contains",
                            split: str = "val", run_every: int | None = None,
                            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Benchmark:
    """A benchmark from `sdft.data.PromptExample`s, scored by `example.task`:

    - "tooluse": `score_tool_calls(text, example.answer, tooluse_mode)`;
    - "science": `score_mcq(text, example.answer, mcq_mode)`;
    - "generic": the evsys verifier `generic_verifier` with `expected=example.answer`.
    The student messages are the prompt; `example.answer` is the reference.
    """
    if tooluse_mode not in TOOLUSE_MODES:
        raise ValueError(f"tooluse_mode {tooluse_mode!r} is not one of {list(TOOLUSE_MODES)}")
    if mcq_mode not in MCQ_MODES:
        raise ValueError(f"mcq_mode {mcq_mode!r} is not one of {list(MCQ_MODES)}")
    generic = get_verifier(generic_verifier)
    items = []
    for example in examples:
        task, answer = example.task, example.answer
        try:
            if task == "tooluse":
                check_expected("tool_calls_match", answer)
                verifier = functools.partial(score_tool_calls, golden_answer=answer, mode=tooluse_mode)
            elif task == "science":
                if not isinstance(answer, str) or not answer.strip():
                    raise ValueError(f"the answer must be a letter string, got {answer!r}")
                verifier = functools.partial(score_mcq, answer=answer, mode=mcq_mode)
            elif task == "generic":
                check_expected(generic_verifier, answer)
                verifier = functools.partial(generic, expected=answer)
            else:
                raise ValueError(f"task {task!r} is not one of ['tooluse', 'science', 'generic']")
        except ValueError as err:
            raise ValueError(f"benchmark {name!r}, example {example.id!r}: {err}") from None
        items.append(EvalItem(id=str(example.id), messages=tuple(example.messages), verifier=verifier,
                              reference=answer))
    return Benchmark(name=name, items=tuple(items), split=split, run_every=run_every,
                     max_new_tokens=max_new_tokens)


# --------------------------------------------------------------------------------------- evaluation
def evaluate(benchmark: Benchmark, generate: GenerateFn, tokenizer: Any, *,
             max_prompt_tokens: int | None = None, max_items: int | None = None,
             predictions_path: str | os.PathLike | None = None, chunk_size: int | None = None,
             on_progress: Callable[[int], None] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> EvalResult:
    """Generate greedily for each item (the first `max_items`), decode without special tokens, score.

    `generate` is called on `chunk_size` prompts at a time, in order (None: all at once), and
    `on_progress(n)` after each call with the number of items it completed (a progress bar's update).

    Prompts are rendered by `sdft.prompts.render_prompt_ids` (chat template with `chat_template_kwargs`,
    generation prompt, left truncation to `max_prompt_tokens`). With `predictions_path`, writes one JSONL row per item
    atomically: ``{"id", "prompt" (last user message), "completion", "correct", "reference"}``.
    """
    from sdft.prompts import render_prompt_ids

    if max_items is not None and not _is_positive_int(max_items):
        raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
    items = benchmark.items[:max_items] if max_items is not None else benchmark.items
    prompts = [render_prompt_ids(tokenizer, list(item.messages), max_prompt_tokens, chat_template_kwargs)
               for item in items]
    if chunk_size is not None and not _is_positive_int(chunk_size):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    step = chunk_size or max(1, len(prompts))
    completion_ids = []
    for start in range(0, len(prompts), step):
        part = generate(prompts[start:start + step], benchmark.max_new_tokens)
        if len(part) != len(prompts[start:start + step]):
            raise ValueError(f"benchmark {benchmark.name!r}: generate returned {len(part)} completions "
                             f"for {len(prompts[start:start + step])} prompts")
        completion_ids.extend(part)
        if on_progress is not None:
            on_progress(len(part))
    texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in completion_ids]
    per_item = [bool(item.verifier(text)) for item, text in zip(items, texts)]
    correct = sum(per_item)
    low, high = wilson_interval(correct, len(items))
    if predictions_path is not None:
        atomic_write_jsonl(predictions_path, (
            {"id": item.id, "prompt": _last_user_message(item.messages), "completion": text,
             "correct": ok, "reference": item.reference}
            for item, text, ok in zip(items, texts, per_item)))
    return EvalResult(name=benchmark.name, split=benchmark.split, n=len(items), correct=correct,
                      pass_at_1=correct / len(items), ci_low=low, ci_high=high, per_item=per_item)


def evaluate_benchmarks(benchmarks: Iterable[tuple[Benchmark | LmEvalBenchmark, int | None]], generate: GenerateFn,
                        tokenizer: Any, *, predictions_dir: str | os.PathLike | None, tag: str = "",
                        max_prompt_tokens: int | None = None, chunk_size: int | None = None, progress: bool = False,
                        causal_lm: Any = None, chat_template_kwargs: Mapping[str, Any] | None = None,
                        ) -> dict[str, EvalResult]:
    """`evaluate` on each (benchmark, max_items), predictions to <predictions_dir>/<name><tag>.jsonl (None: not
    written); with `progress`, a bar per benchmark counting items (`chunk_size` prompts per generate call).

    An `sdft.lm_eval_bridge.LmEvalBenchmark` is run by the harness on `causal_lm` (the model that
    `generate` decodes; required for such benchmarks) with `chunk_size` as its batch size."""
    from sdft.lm_eval_bridge import LmEvalBenchmark, evaluate_lm_eval
    from sdft.logs import ProgressBar

    results = {}
    for benchmark, max_items in benchmarks:
        path = None if predictions_dir is None else Path(predictions_dir) / f"{benchmark.name}{tag}.jsonl"
        if isinstance(benchmark, LmEvalBenchmark):
            if causal_lm is None:
                raise ValueError(f"benchmark {benchmark.name!r} (kind lm_eval) needs the model itself, not only a "
                                 "decoding function: pass causal_lm")
            results[benchmark.name] = evaluate_lm_eval(benchmark, causal_lm, tokenizer, max_items=max_items,
                                                       batch_size=chunk_size or 8, predictions_path=path)
            continue
        n_items = min(len(benchmark.items), max_items or len(benchmark.items))
        with ProgressBar(n_items, desc=f"eval {benchmark.name}{tag}", enabled=progress) as bar:
            results[benchmark.name] = evaluate(
                benchmark, generate, tokenizer, max_prompt_tokens=max_prompt_tokens, max_items=max_items,
                predictions_path=path, chunk_size=chunk_size,
                on_progress=bar.update, chat_template_kwargs=chat_template_kwargs)
    return results


def _last_user_message(messages: Sequence[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""
