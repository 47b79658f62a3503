"""lm-evaluation-harness tasks as benchmarks: prior capabilities (HellaSwag, MMLU, ...) scored per item.

The paper measures forgetting with lm-evaluation-harness (pip `lm-eval`): 0-shot HellaSwag, MMLU,
TruthfulQA (mc1), Winogrande, HumanEval and IFEval. An `LmEvalBenchmark` runs one such task (or group)
through the harness itself, on the model in memory (the student with its LoRA adapter, or a plain
causal LM), and returns the same `sdft.evaluation.EvalResult` as the generation benchmarks: per-item
0/1 outcomes of one harness metric, their mean as pass@1 with a Wilson 95% interval, and a predictions
file, so it is logged, tabulated and compared like any other benchmark.

Config (an `eval.benchmarks` entry)::

    {name: hellaswag, kind: lm_eval, task: hellaswag, metric: acc_norm}        # lm-eval's own task list
    {name: local, kind: lm_eval, task: my_task, path: tasks/lm_eval}            # only the YAMLs in `path`

- `metric`: the per-document metric read from the harness' logged samples (acc, acc_norm, exact_match,
  pass@1, prompt_level_strict_acc, ...); it must be 0/1 per document.
- A group task (mmlu) contributes the documents of all its subtasks, in subtask-name order: pass@1 is
  then the mean over all documents (micro average). `max_items` caps the documents of each subtask
  (the harness' `limit`).
- `num_fewshot` (default 0, as in the paper), `chat_template` (apply the tokenizer's chat template, off by
  default as in the harness), `allow_code_execution` (HumanEval runs the generated code: opt in),
  `max_new_tokens` (generation tasks' `max_gen_toks`).

lm-eval is an optional dependency (`pip install 'sdft[lm_eval]'`); without it, building such a benchmark
is an error that says so. The harness downloads its datasets from the Hugging Face hub unless a task's
YAML points at local files (`dataset_path: json` with `data_files`).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

from sdft.io import atomic_write_jsonl
from sdft.stats import wilson_interval

INSTALL_HINT = "pip install 'sdft[lm_eval]' (or pip install lm-eval)"


def lm_eval_available() -> bool:
    """Whether the lm-evaluation-harness package can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval(what: str) -> None:
    """A clear error when lm-eval is missing; `what` names the benchmark or key that needs it."""
    if not lm_eval_available():
        raise ValueError(f"{what}: kind lm_eval needs the lm-evaluation-harness package, which is not "
                         f"installed; {INSTALL_HINT}")


@dataclass(frozen=True)
class LmEvalBenchmark:
    """One lm-evaluation-harness task or group, evaluated as a benchmark (see the module docstring).

    `include_path`: a folder of task YAMLs; when given, only those tasks are indexed (fast, and hermetic
    for tests), else the harness' own task registry.
    """

    name: str
    task: str
    include_path: str | None = None
    metric: str = "acc"
    num_fewshot: int = 0
    chat_template: bool = False
    allow_code_execution: bool = False
    split: str = "val"
    run_every: int | None = None
    max_new_tokens: int = 256

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"benchmark name {self.name!r}: must be non-empty and contain no '/'")
        if not isinstance(self.task, str) or not self.task.strip():
            raise ValueError(f"benchmark {self.name!r}: task must name an lm-eval task, got {self.task!r}")
        if not isinstance(self.num_fewshot, int) or isinstance(self.num_fewshot, bool) or self.num_fewshot < 0:
            raise ValueError(f"benchmark {self.name!r}: num_fewshot {self.num_fewshot!r} must be an integer >= 0")
        if self.include_path is not None and not os.path.isdir(self.include_path):
            raise ValueError(f"benchmark {self.name!r}: path {self.include_path!r} is not a folder of lm-eval "
                             "task YAMLs")
        require_lm_eval(f"benchmark {self.name!r}")

    @functools.cached_property
    def items(self) -> tuple[str, ...]:
        """Ids "<task>/<doc index>" of the documents, loaded by the harness (a group's subtasks in name
        order); for counting them (`--validate`), the evaluation does not need this."""
        from lm_eval.tasks import get_task_dict

        manager = _task_manager(self)
        ids = []
        for name, task in sorted(_leaf_tasks(get_task_dict([self.task], manager)).items()):
            ids += [f"{name}/{index}" for index in range(len(task.eval_docs))]
        return tuple(ids)


def evaluate_lm_eval(benchmark: LmEvalBenchmark, causal_lm: Any, tokenizer: Any, *, max_items: int | None = None,
                     batch_size: int = 8, predictions_path: str | os.PathLike | None = None) -> Any:
    """Run `benchmark.task` with the harness on `causal_lm` (a Hugging Face causal LM, or a peft or DDP
    wrapper of one: the student with its adapter) and return an `sdft.evaluation.EvalResult` over its documents.

    The model is put in eval mode by the harness and returned to its previous train/eval mode.
    Predictions (JSONL, written atomically): ``{"id": "<task>/<doc_id>", "prompt", "completion",
    "correct", "reference"}``; for a multiple-choice task the completion is the choice with the highest
    log-likelihood and the row also has "loglikelihoods" (one per choice).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from sdft.evaluation import EvalResult

    from sdft.lm import causal_lm_of

    model = causal_lm_of(causal_lm)   # a peft model's base model, its LoRA layers injected and active
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = _task_manager(benchmark)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=[benchmark.task], task_manager=manager, num_fewshot=benchmark.num_fewshot,
            limit=max_items, log_samples=True, bootstrap_iters=0, apply_chat_template=benchmark.chat_template,
            gen_kwargs={"max_gen_toks": benchmark.max_new_tokens},
            confirm_run_unsafe_code=benchmark.allow_code_execution)
    finally:
        model.train(was_training)
    rows = prediction_rows(benchmark, output["samples"])
    per_item = [row["correct"] for row in rows]
    if not per_item:
        raise ValueError(f"benchmark {benchmark.name!r}: task {benchmark.task!r} produced no documents")
    correct = sum(per_item)
    low, high = wilson_interval(correct, len(per_item))
    if predictions_path is not None:
        atomic_write_jsonl(predictions_path, rows)
    return EvalResult(name=benchmark.name, split=benchmark.split, n=len(per_item), correct=correct,
                      pass_at_1=correct / len(per_item), ci_low=low, ci_high=high, per_item=per_item)


def _task_manager(benchmark: LmEvalBenchmark):
    """The harness' task index: only `include_path` when given, else lm-eval's own tasks; the task must be in it."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=benchmark.include_path, include_defaults=benchmark.include_path is None)
    if not manager.match_tasks([benchmark.task]):
        where = f"the folder {benchmark.include_path}" if benchmark.include_path else "lm-eval's task registry"
        raise ValueError(f"benchmark {benchmark.name!r}: task {benchmark.task!r} is not in {where}")
    return manager


def _leaf_tasks(tree: dict) -> dict:
    """{task name: Task} from the harness' nested {group: {task: Task}} dictionary."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaf_tasks(value))
        else:
            out[str(key)] = value
    return out


def prediction_rows(benchmark: LmEvalBenchmark, samples: dict[str, list[dict]]) -> list[dict]:
    """One row per document of the harness' logged `samples` ({task: [sample, ...]}), tasks in name order,
    documents in doc_id order; "correct" is the benchmark's metric, which must be 0/1."""
    rows = []
    for task in sorted(samples):
        for sample in sorted(samples[task], key=lambda s: s["doc_id"]):
            if benchmark.metric not in sample:
                available = sorted(sample.get("metrics", []))
                raise ValueError(f"benchmark {benchmark.name!r}: task {task!r} has no per-document metric "
                                 f"{benchmark.metric!r}; its metrics: {available}")
            value = sample[benchmark.metric]
            if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
                correct = bool(value)
            else:
                raise ValueError(f"benchmark {benchmark.name!r}: metric {benchmark.metric!r} of task {task!r} is "
                                 f"{value!r} for document {sample['doc_id']}; only 0/1 per-document metrics can "
                                 "be scored as pass@1")
            arguments = sample["arguments"]
            row = {"id": f"{task}/{sample['doc_id']}", "prompt": str(arguments[0][0]), "correct": correct,
                   "reference": _plain(sample.get("target"))}
            responses = sample["filtered_resps"]
            if all(isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float)) for r in responses):
                loglikelihoods = [float(r[0]) for r in responses]   # multiple choice: (loglik, is_greedy)
                best = max(range(len(loglikelihoods)), key=lambda i: loglikelihoods[i])
                row["completion"] = str(arguments[best][1])
                row["loglikelihoods"] = [x if math.isfinite(x) else None for x in loglikelihoods]
            else:
                first = responses[0] if responses else ""
                row["completion"] = first if isinstance(first, str) else str(first)
            rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a harness target (numbers, strings, lists of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
