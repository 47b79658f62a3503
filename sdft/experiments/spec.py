"""Experiment specifications: a YAML file naming a base run config, the tasks, the methods and presets.

Shared layout of `configs/ablation_*.yaml` and `configs/continual_learning.yaml`:

    name: ablation_tooluse                 # results/<name>/ (with the preset appended unless it is the default)
    config: tooluse                        # the run config every cell starts from (a shipped name or a path)
    tasks:                                 # every task is trained on and/or evaluated; evaluation order = this order
      tooluse: {title: Tool-use, kind: tooluse, path: ..., split: api, test_fraction: 0.3, split_seed: 0,
                benchmark: {max_new_tokens: 1024, tooluse_mode: strict}}
      toolcalls: {title: Tool calls, kind: jsonl, train_path: package:laptop/toolcalls/train.jsonl,
                  test_path: package:laptop/toolcalls/heldout.jsonl}
      facts: {title: Facts, kind: tasks, test_path: package:laptop/facts}        # evaluated only
      hellaswag: {title: HellaSwag, kind: lm_eval, benchmark: {task: hellaswag, metric: acc_norm}}
    methods:                               # name -> fields; `overrides` are key=value run-config overrides
      full_ema: {overrides: [objective.targets=full, teacher.mode=ema], kl: Full-vocab, ema: "yes"}
    seeds: [0, 1, 2]
    overrides: [...]                       # applied to every cell
    presets:                               # named variants; a preset may replace seeds/methods/tasks fields
      tiny: {overrides: [...], seeds: [0, 1], tasks: {tooluse: {benchmark: {max_items: 26}}}, notes: [...]}
      laptop: {tasks: {tooluse: null, facts: {kind: tasks, ...}}}   # null removes a task, a `kind` adds one
    default_preset: tiny

Task kinds: `tooluse` and `science` (the official folders), `jsonl` (PromptExample JSONL files, scored by
each row's task: tool calls or the `contains` verifier), and the evaluation-only kinds `tasks` (an evsys
benchmark folder) and `lm_eval` (an lm-evaluation-harness task, `benchmark.task`). A `jsonl` task without
`train_path` is evaluated only too; only tasks with a train part can be trained on.

Paths are relative to the working directory, as in run configs (`package:` names data shipped with sdft).
Errors name the file and the key; an unknown key (top level, task entry or preset field) is an error with
the closest allowed key.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sdft.io import read_text
from sdft.verifiers import MCQ_MODES, TOOLUSE_MODES

TASK_KINDS = ("tooluse", "science", "jsonl", "tasks", "lm_eval")
EVAL_ONLY_KINDS = ("tasks", "lm_eval")   # never trained on
SPLITS = ("api", "random")
_TASK_KEYS = ("title", "kind", "path", "split", "test_fraction", "split_seed", "train_path", "test_path",
              "benchmark", "also_score")
_ALSO_SCORE = {"tooluse": TOOLUSE_MODES, "science": MCQ_MODES}
SPEC_KEYS = ("name", "config", "tasks", "methods", "seeds", "overrides", "notes", "presets", "default_preset")
# Top-level keys read by one experiment (documented in sdft/experiments/ablation.py and continual.py).
EXPERIMENT_KEYS = ("train_task", "reference", "columns",          # ablation
                   "stages", "learning_rates", "stage_overrides")  # continual learning


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its train and test parts come from and how it is evaluated.

    Either `path` + `split` (the experiment splits the folder itself, by API name or at random with
    `split_seed`) or `train_path` + `test_path` (official train folder and an evaluation folder); an
    evaluation-only task has `test_path` alone (kind lm_eval: no path, `benchmark.task` names it).
    `benchmark`: fields of the run config's eval.benchmarks entry (max_new_tokens, max_items, modes).
    `also_score`: other scorer modes applied to the saved predictions (secondary columns).
    """

    name: str
    title: str
    kind: str
    path: str | None = None
    split: str | None = None
    test_fraction: float = 0.3
    split_seed: int = 0
    train_path: str | None = None
    test_path: str | None = None
    benchmark: dict = field(default_factory=dict)
    also_score: tuple[str, ...] = ()

    @property
    def trainable(self) -> bool:
        """Whether the task has a train part (a split folder or a train_path)."""
        return self.path is not None or self.train_path is not None


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment after its preset is applied."""

    name: str
    source: str                 # the spec file, for error messages and the report
    preset: str | None
    config: str                 # base run config path
    tasks: dict[str, TaskSpec]
    methods: dict[str, dict]    # name -> {"overrides": [...], other display fields}
    seeds: list[int]
    overrides: list[str]
    notes: list[str]
    extra: dict                 # experiment-specific top-level keys (reference, stages, learning_rates, ...)


def load_spec(path: str | Path, preset: str | None = None) -> ExperimentSpec:
    """Read an experiment YAML and apply `preset` (None: the file's default_preset, if any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment spec {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    where = str(path)
    _refuse_unknown(raw, SPEC_KEYS + EXPERIMENT_KEYS, where, "")
    presets = raw.pop("presets", {}) or {}
    _expect(isinstance(presets, dict), where, "presets", "a mapping of preset name -> fields")
    default_preset = raw.pop("default_preset", None)
    preset_fields = sorted({"overrides", "seeds", "methods", "tasks", "notes", "config"} | set(raw)
                           | set(EXPERIMENT_KEYS) - {"name"})
    for preset_name, body in presets.items():   # every preset, so that a typo in an unused one shows too
        _expect(isinstance(body or {}, dict), where, f"presets.{preset_name}", "a mapping")
        _refuse_unknown(body or {}, preset_fields, where, f"presets.{preset_name}.")
    chosen = preset if preset is not None else default_preset
    notes: list[str] = []
    is_default = chosen == default_preset
    if chosen is not None:
        if chosen not in presets:
            raise ValueError(f"{where}: preset {chosen!r} is not defined; allowed: {sorted(presets)}")
        body = presets[chosen] or {}
        raw = _apply_preset(raw, body, where, chosen)
        notes = list(body.get("notes", []) or [])
    for key in ("name", "config", "tasks", "methods"):
        _expect(key in raw, where, key, "a required key")
    name = raw.pop("name")
    _expect(isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(), where, "name",
            "letters, digits, '-' and '_'")
    if chosen is not None and not is_default:
        name = f"{name}_{chosen}"
    config = raw.pop("config")
    _expect(isinstance(config, str), where, "config", "a path to a run config YAML")
    tasks = _parse_tasks(raw.pop("tasks"), where)
    methods = raw.pop("methods")
    _expect(isinstance(methods, dict) and methods, where, "methods", "a non-empty mapping of name -> fields")
    for method, body in methods.items():
        _expect(isinstance(body, dict), where, f"methods.{method}", "a mapping with an 'overrides' list")
        _expect(_is_str_list(body.get("overrides", [])), where, f"methods.{method}.overrides",
                "a list of key=value strings")
        body.setdefault("overrides", [])
    seeds = raw.pop("seeds", [0])
    _expect(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
            where, "seeds", "a non-empty list of integers")
    overrides = raw.pop("overrides", []) or []
    _expect(_is_str_list(overrides), where, "overrides", "a list of key=value strings")
    raw.pop("notes", None)
    return ExperimentSpec(name=name, source=where, preset=chosen, config=config, tasks=tasks, methods=methods,
                          seeds=list(seeds), overrides=list(overrides), notes=notes, extra=raw)


def require_trainable(spec: ExperimentSpec, task: str, key: str) -> TaskSpec:
    """The task named by spec key `key` (train_task, stages), which must exist and have a train part."""
    if task not in spec.tasks:
        raise ValueError(f"{spec.source}: {key} {task!r} is not a task; allowed: {sorted(spec.tasks)}")
    if not spec.tasks[task].trainable:
        allowed = sorted(name for name, t in spec.tasks.items() if t.trainable)
        raise ValueError(f"{spec.source}: {key} {task!r} is evaluated only (kind {spec.tasks[task].kind}, no train "
                         f"part); tasks that can be trained on: {allowed}")
    return spec.tasks[task]


def select(spec: ExperimentSpec, key: str, chosen: list[str] | None, allowed: list[str]) -> list[str]:
    """Names chosen on the command line (None: all allowed), checked against `allowed`."""
    if chosen is None:
        return list(allowed)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise ValueError(f"{key}={','.join(chosen)}: {unknown} not in {spec.source}; allowed: {allowed}")
    return list(chosen)


def _apply_preset(raw: dict, body: Mapping[str, Any], where: str, preset: str) -> dict:
    out = copy.deepcopy(raw)
    for key, value in body.items():
        if key == "notes":
            continue
        if key == "overrides":
            out["overrides"] = list(out.get("overrides", []) or []) + list(value or [])
        elif key == "methods" and isinstance(value, list):   # a subset of the methods, by name
            missing = [m for m in value if m not in out.get("methods", {})]
            if missing:
                raise ValueError(f"{where}: presets.{preset}.methods names unknown methods {missing}; "
                                 f"allowed: {sorted(out.get('methods', {}))}")
            out["methods"] = {m: out["methods"][m] for m in value}
        elif key == "tasks":
            _expect(isinstance(value, dict), where, f"presets.{preset}.tasks", "a mapping of task -> fields")
            for task, fields in value.items():
                if fields is None:      # `task: null` removes a task
                    out.get("tasks", {}).pop(task, None)
                elif task in out.get("tasks", {}):
                    out["tasks"][task] = _deep_merge(out["tasks"][task], fields)
                elif isinstance(fields, dict) and "kind" in fields:   # a whole new task
                    out.setdefault("tasks", {})[task] = copy.deepcopy(fields)
                else:
                    raise ValueError(f"{where}: presets.{preset}.tasks.{task} is not a task; allowed: "
                                     f"{sorted(out.get('tasks', {}))} (a new task needs its 'kind'; null removes one)")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_tasks(tasks: Any, where: str) -> dict[str, TaskSpec]:
    _expect(isinstance(tasks, dict) and tasks, where, "tasks", "a non-empty mapping of task name -> fields")
    out = {}
    for name, body in tasks.items():
        key = f"tasks.{name}"
        _expect(isinstance(body, dict), where, key, "a mapping")
        _refuse_unknown(body, _TASK_KEYS, where, f"{key}.")
        kind = body.get("kind")
        _expect(kind in TASK_KINDS, where, f"{key}.kind", f"one of {list(TASK_KINDS)}")
        has_split = body.get("path") is not None
        has_train, has_test = body.get("train_path") is not None, body.get("test_path") is not None
        if kind == "lm_eval":
            _expect(not (has_split or has_train or has_test), where, key,
                    "no path, train_path or test_path for kind lm_eval (benchmark.task names the task, "
                    "benchmark.path an optional folder of task YAMLs)")
            _expect(bool((body.get("benchmark") or {}).get("task")), where, f"{key}.benchmark.task",
                    "the lm-evaluation-harness task name (kind lm_eval)")
        elif kind == "tasks":
            _expect(has_test and not (has_split or has_train), where, key,
                    "test_path alone (an evsys benchmark folder) for kind tasks")
        elif kind == "jsonl":
            _expect(has_test and not has_split, where, key,
                    "test_path (a JSONL file), and train_path when the task is trained on, for kind jsonl")
        else:
            _expect(has_split != (has_train and has_test), where, key,
                    "either path + split, or train_path + test_path")
        if has_split:
            _expect(body.get("split") in SPLITS, where, f"{key}.split", f"one of {list(SPLITS)}")
        fraction = body.get("test_fraction", 0.3)
        _expect(isinstance(fraction, (int, float)) and 0 < fraction < 1, where, f"{key}.test_fraction",
                "a number strictly between 0 and 1")
        benchmark = body.get("benchmark", {}) or {}
        _expect(isinstance(benchmark, dict), where, f"{key}.benchmark", "a mapping of eval.benchmarks fields")
        also = body.get("also_score", []) or []
        allowed_modes = _ALSO_SCORE.get(kind, ())
        _expect(isinstance(also, list) and all(m in allowed_modes for m in also), where, f"{key}.also_score",
                f"a list of scorer modes from {list(allowed_modes)}")
        out[name] = TaskSpec(name=name, title=str(body.get("title", name)), kind=kind, path=body.get("path"),
                             split=body.get("split"), test_fraction=float(fraction),
                             split_seed=int(body.get("split_seed", 0)), train_path=body.get("train_path"),
                             test_path=body.get("test_path"), benchmark=dict(benchmark), also_score=tuple(also))
    return out


def _deep_merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _deep_merge(base.get(key), value)
        return merged
    return copy.deepcopy(update)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value)


def _refuse_unknown(body: Mapping[str, Any], allowed: tuple[str, ...] | list[str], where: str, prefix: str) -> None:
    """A ValueError naming the file, the first key of `body` not in `allowed`, the closest allowed key and
    all allowed keys (`prefix` is the key's path, e.g. "tasks.tooluse.")."""
    for key in body:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {prefix + str(key)!r}{hint}; allowed: {sorted(allowed)}")


def _expect(ok: bool, where: str, key: str, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{where}: key {key!r}: expected {allowed}")
