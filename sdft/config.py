"""Typed run configuration: frozen dataclasses loaded from YAML plus `key=value` overrides.

The schema is declarative: a field's type gives its parser (`Literal[...]` lists the allowed values,
`Optional[...]` allows `null`), and `_field(default, ge=..., gt=..., le=..., lt=..., check=...)` gives
its range or a custom check, so adding a field is one line. Every error is a ValueError that names the
dotted key, where it came from (`file:line` for YAML, the override text for `key=value`), the value
received and what is allowed. `load_config` also runs the cross-field rules of `validate_config`.

Sections are frozen; derive a changed config with `apply_overrides(config, ["loss.kind=reverse"])`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import string
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import yaml

from sdft.io import atomic_write_text
from sdft.prompts import resolve_teacher_template

__all__ = [
    "ModelConfig", "StudentConfig", "TeacherConfig", "LossConfig", "OptimConfig", "GenerationConfig",
    "DataConfig", "BenchmarkConfig", "EvalConfig", "LoggingConfig", "CheckpointConfig", "BackendConfig",
    "Config", "load_config", "apply_overrides", "validate_config", "config_to_dict", "dump_config",
]


def _field(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with range bounds (applied to non-null values) and an optional check that
    returns an error text (or None when the value is fine)."""
    meta = {key: value for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("check", check))
            if value is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _section(cls: type) -> Any:
    return field(default_factory=cls)


def _check_template(value: str) -> str | None:
    """A template name of `sdft.prompts.TEACHER_TEMPLATES` or a valid custom string.Template text."""
    try:
        text = resolve_teacher_template(value)
    except ValueError as error:
        return str(error)
    if any(match.group("invalid") is not None for match in string.Template.pattern.finditer(text)):
        return "is not a valid string.Template (write a literal '$' as '$$')"
    return None


def _check_run_name(value: str) -> str | None:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        return "must be a non-empty folder name without path separators"
    return None


def _check_non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


class _Section:
    """Shared constructors of the config dataclasses."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build and type-check this section from plain data (cross-field rules: `validate_config`)."""
        return _build(cls, data, (), {})

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = _field("SmolLM2-135M-Instruct", check=_check_non_empty)  # packaged default, local folder or hub id
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    cache_dir: Optional[str] = None


@dataclass(frozen=True)
class StudentConfig(_Section):
    mode: Literal["lora", "full"] = "lora"
    lora_rank: int = _field(16, ge=1)
    lora_alpha: float = _field(32.0, gt=0)
    lora_dropout: float = _field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = _field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class TeacherConfig(_Section):
    mode: Literal["static", "ema", "sync"] = "ema"
    ema_alpha: float = _field(0.01, gt=0, le=1)  # phi <- (1 - a) phi + a theta after every optimizer step
    ema_fp32: bool = True  # bf16/fp16 full fine-tuning: keep the EMA average in fp32 (a=0.01 steps round away)
    sync_every: int = _field(0, ge=0)          # mode=sync: copy the student every N optimizer steps
    template: str = _field("official", check=_check_template)  # a TEACHER_TEMPLATES name or a text


@dataclass(frozen=True)
class LossConfig(_Section):
    targets: Literal["full", "topk", "sampled"] = "full"
    kind: Literal["forward", "reverse", "jsd"] = "forward"
    beta: float = _field(0.5, ge=0, le=1)  # teacher weight of the JSD mixture
    topk: int = _field(20, ge=1)
    topk_normalize: Literal["renormalize", "tail"] = "renormalize"
    topk_kind: Literal["cross_entropy", "forward_kl", "reverse_kl"] = "cross_entropy"  # reverse_kl: renormalize only
    reduction: Literal["seq_mean", "token_mean", "sum"] = "seq_mean"
    skip_first_n_tokens: int = _field(3, ge=0)
    temperature: float = _field(1.0, gt=0)
    is_clip: Optional[float] = _field(2.0, gt=0)  # truncated importance weight; null disables
    impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    chunk_size: Optional[int] = _field(None, ge=1)


@dataclass(frozen=True)
class OptimConfig(_Section):
    lr: float = _field(2e-5, gt=0)
    weight_decay: float = _field(0.0, ge=0)
    beta1: float = _field(0.9, ge=0, lt=1)
    beta2: float = _field(0.999, ge=0, lt=1)
    eps: float = _field(1e-8, gt=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_ratio: float = _field(0.1, ge=0, lt=1)
    max_grad_norm: Optional[float] = _field(1.0, gt=0)  # null disables clipping
    batch_size: int = _field(32, ge=1)                  # prompts per optimizer step
    micro_batch_size: int = _field(1, ge=1)             # prompts per forward/backward
    epochs: float = _field(1.0, gt=0)
    max_steps: Optional[int] = _field(None, ge=1)       # caps the optimizer steps
    # full fine-tuning of bf16/fp16 weights: AdamW updates fp32 master copies (false: the weights in place,
    # as the official code does; updates below half a bf16 rounding step are then lost)
    master_weights: bool = True


@dataclass(frozen=True)
class GenerationConfig(_Section):
    max_new_tokens: int = _field(1024, ge=1)
    temperature: float = _field(1.0, gt=0)
    top_p: float = _field(1.0, gt=0, le=1)
    batch_size: int = _field(8, ge=1)  # prompts per sampling call


@dataclass(frozen=True)
class DataConfig(_Section):
    kind: Literal["jsonl", "tooluse", "science", "hf"] = "jsonl"
    path: Optional[str] = None  # required (validate_config): a file, a folder or a dataset id
    user_template: str = "{question}"
    system_prompt: Optional[str] = None
    max_prompt_tokens: int = _field(1024, ge=1)  # longer prompts are truncated from the left
    thinking_format: bool = False
    split: Literal["none", "random", "api"] = "none"  # how a held-out test split is carved out
    test_fraction: float = _field(0.2, gt=0, lt=1)
    split_seed: int = 0
    hf_split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    max_examples: Optional[int] = _field(None, ge=1)
    # used instead of `path` when `path` does not exist (e.g. the official train folder is not downloaded):
    fallback_path: Optional[str] = None
    fallback_split: Literal["none", "random", "api"] = "none"  # replaces `split` when the fallback is used


@dataclass(frozen=True)
class BenchmarkConfig(_Section):
    name: str = _field("", check=_check_run_name)
    # heldout: the test split made by data.split (or data.fallback_split); without a split, `path` loaded like data
    kind: Literal["tasks", "tooluse", "science", "jsonl", "heldout"] = "tasks"
    path: Optional[str] = None
    run_every: Optional[int] = _field(None, ge=1)  # null: once after training
    split: str = "val"
    max_items: Optional[int] = _field(None, ge=1)
    max_new_tokens: int = _field(256, ge=1)
    tooluse_mode: Literal["strict", "robust", "actions"] = "strict"
    mcq_mode: Literal["official", "lenient"] = "official"


@dataclass(frozen=True)
class EvalConfig(_Section):
    benchmarks: list[BenchmarkConfig] = _field([])
    before_training: bool = True
    batch_size: int = _field(8, ge=1)


@dataclass(frozen=True)
class LoggingConfig(_Section):
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    every: int = _field(0, ge=0)  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = _field(2, ge=1)


@dataclass(frozen=True)
class BackendConfig(_Section):
    kind: Literal["local", "tinker"] = "local"
    tinker_base_model: Optional[str] = None  # required when kind=tinker
    # remote: the Tinker API (TINKER_API_KEY); offline: sdft's in-process stand-in running model.name locally
    tinker_service: Literal["remote", "offline"] = "remote"
    tinker_lora_rank: int = _field(32, ge=1)
    tinker_train_unembed: bool = True  # LoRA on the output layer too (the SDK's default)
    max_retries: int = _field(5, ge=0)  # retries of an idempotent Tinker request after a transient error
    retry_backoff_s: float = _field(1.0, ge=0)  # first retry delay, doubled after every failed attempt


@dataclass(frozen=True)
class Config(_Section):
    seed: int = 0
    run_name: str = _field("sdft", check=_check_run_name)
    output_dir: str = _field("runs", check=_check_non_empty)
    resume: bool = False
    overwrite: bool = False  # start anew in a folder that holds a run: the old folder is moved aside
    algorithm: Literal["sdft", "sft"] = "sdft"
    model: ModelConfig = _section(ModelConfig)
    student: StudentConfig = _section(StudentConfig)
    teacher: TeacherConfig = _section(TeacherConfig)
    loss: LossConfig = _section(LossConfig)
    optim: OptimConfig = _section(OptimConfig)
    generation: GenerationConfig = _section(GenerationConfig)
    data: DataConfig = _section(DataConfig)
    eval: EvalConfig = _section(EvalConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    backend: BackendConfig = _section(BackendConfig)


# ----------------------------------------------------------------------------------------------
# Loading

KeyPath = tuple  # a dotted key as a tuple of names (str) and list indices (int)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML file at `path` (None: all defaults), apply `key=value` overrides in order, type-check
    every field and run `validate_config`."""
    data: dict[str, Any] = {}
    sources: dict[KeyPath, str] = {}
    if path is not None:
        data, sources = _read_yaml(os.fspath(path))
    data = _apply_override_texts(data, overrides, sources)
    config = _build(Config, data, (), sources)
    validate_config(config)
    return config


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A copy of `config` with `key=value` overrides applied, type-checked and validated."""
    sources: dict[KeyPath, str] = {}
    data = _apply_override_texts(config_to_dict(config), overrides, sources)
    new = _build(Config, data, (), sources)
    validate_config(new)
    return new


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML- and JSON-serializable)."""
    return dataclasses.asdict(config)


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Write `config` as YAML atomically; `load_config(path)` reads it back equal."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=100)
    atomic_write_text(path, text)


def _read_yaml(filename: str) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    try:
        with open(filename, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read config file {filename}: {error.strerror or error}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ValueError(f"{filename}:{line}: the top level of a config must be a mapping of sections, "
                         f"got {type(data).__name__}")
    sources: dict[KeyPath, str] = {}
    _record_lines(node, (), filename, sources)
    return data, sources


def _record_lines(node: yaml.Node, path: KeyPath, filename: str, sources: dict[KeyPath, str]) -> None:
    """Map every dotted key of the composed YAML tree to `file:line`; duplicate keys are errors."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise ValueError(f"{filename}:{line}: duplicate key {_format_path(path + (key_node.value,))!r} "
                                 f"(first given at line {seen[key_node.value]})")
            seen[key_node.value] = line
            sources[path + (key_node.value,)] = f"{filename}:{line}"
            _record_lines(value_node, path + (key_node.value,), filename, sources)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            sources[path + (index,)] = f"{filename}:{item.start_mark.line + 1}"
            _record_lines(item, path + (index,), filename, sources)


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*$")


def _parse_override_key(key: str, text: str) -> KeyPath:
    if not _OVERRIDE_KEY.match(key):
        raise ValueError(f"override {text!r}: malformed key {key!r}; expected dotted names with optional "
                         "list indices, e.g. loss.kind=reverse or eval.benchmarks[0].max_items=10")
    path: list[Any] = []
    for part in key.split("."):
        name, *indices = re.split(r"\[", part)
        path.append(name)
        path.extend(int(index.rstrip("]")) for index in indices)
    return tuple(path)


def _apply_override_texts(data: dict[str, Any], overrides: Sequence[str],
                          sources: dict[KeyPath, str]) -> dict[str, Any]:
    if isinstance(overrides, str):
        raise ValueError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    data = _copy_tree(data)
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ValueError(f"override {text!r} is not of the form key=value (e.g. loss.kind=reverse)")
        key, raw = text.split("=", 1)
        path = _parse_override_key(key.strip(), text)
        _check_override_path(path, text)
        target = _type_at(path)
        stripped = raw.strip()
        if target in (str, Optional[str]) and not (len(stripped) >= 2 and stripped[0] == stripped[-1]
                                                   and stripped[0] in "'\""):
            # String fields take the text verbatim ({question}, "a: b", 2024); `null` where optional.
            value = None if target is Optional[str] and stripped in ("", "null", "~") else raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise ValueError(f"override {text!r}: the value is not valid YAML: "
                                 f"{getattr(error, 'problem', None) or error}") from None
        _set_path(data, path, value, text)
        for known in [p for p in sources if p[:len(path)] == path]:
            del sources[known]
        sources[path] = f"override {text!r}"
    return data


def _check_override_path(path: KeyPath, text: str) -> None:
    """Reject a key that descends into a plain value of the schema (e.g. loss.kind.inner)."""
    for end in range(1, len(path)):
        declared = _type_at(path[:end])
        if declared is None:
            return  # an unknown key: the build names it with the allowed keys
        tp = _strip_optional(declared)
        is_section = isinstance(tp, type) and dataclasses.is_dataclass(tp)
        if not is_section and typing.get_origin(tp) is not list:
            raise ValueError(f"override {text!r}: {_format_path(path[:end])} is a single value "
                             f"({_describe(declared)}), not a section or a list")


def _copy_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_tree(item) for item in value]
    return value


def _set_path(data: dict[str, Any], path: KeyPath, value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        where = _format_path(path[:depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ValueError(f"override {text!r}: index {part} is out of range for {_format_path(path[:depth])} "
                                 f"({size} entries)")
            if not isinstance(node[part], dict):
                raise ValueError(f"override {text!r}: {where} is not a mapping")
            node = node[part]
            continue
        if part not in node or node[part] is None:
            if isinstance(nxt, int):
                default = _default_at(path[:depth + 1])
                node[part] = [config_to_dict(item) if dataclasses.is_dataclass(item) else item
                              for item in default or []]
            else:
                node[part] = {}
        child = node[part]
        if isinstance(nxt, int) and not isinstance(child, list):
            raise ValueError(f"override {text!r}: {where} is not a list")
        if isinstance(nxt, str) and not isinstance(child, dict):
            raise ValueError(f"override {text!r}: {where} is not a mapping")
        node = child
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            size = len(node) if isinstance(node, list) else 0
            raise ValueError(f"override {text!r}: index {last} is out of range for {_format_path(path[:-1])} "
                             f"({size} entries)")
    node[last] = value


def _type_at(path: KeyPath) -> Any:
    """The declared type at a dotted key, or None when the key is not in the schema."""
    tp: Any = Config
    for part in path:
        tp = _strip_optional(tp)
        if isinstance(part, int):
            if typing.get_origin(tp) is not list:
                return None
            tp = typing.get_args(tp)[0]
        else:
            if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
                return None
            hints = _hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
    return tp


def _default_at(path: KeyPath) -> Any:
    value: Any = Config()
    for part in path:
        try:
            value = value[part] if isinstance(part, int) else getattr(value, part)
        except (AttributeError, IndexError, TypeError):
            return None
    return value


# ----------------------------------------------------------------------------------------------
# Building and type checking


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _where(path: KeyPath, sources: Mapping[KeyPath, str]) -> str:
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return f" ({sources[path[:end]]})"
    return ""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return " or ".join(_describe(arg) for arg in inner) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: Any, path: KeyPath, sources: Mapping[KeyPath, str]) -> Any:
    name = _format_path(path) or "the config"
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        data = config_to_dict(data)
    if data is None and path:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}{_where(path, sources)}: expected {_describe(cls)}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            dotted = _format_path(path + (str(key),))
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {_format_path(path + (close[0],))!r}?" if close else ""
            scope = f"in {name}" if path else "at the top level"
            raise ValueError(f"unknown key {dotted!r}{_where(path + (key,), sources)}{hint} "
                             f"Allowed keys {scope}: {', '.join(fields)}")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(value, hints[key], path + (key,), sources, fields[key].metadata)
    return cls(**values)


def _coerce(value: Any, tp: Any, path: KeyPath, sources: Mapping[KeyPath, str], meta: Mapping[str, Any]) -> Any:
    key = _format_path(path)
    where = _where(path, sources)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        tp = _strip_optional(tp)
        origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path, sources)

    def fail(problem: str) -> ValueError:
        return ValueError(f"{key}{where}: {problem}")

    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(f"got {value!r}; allowed values: {', '.join(map(repr, allowed))}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail(f"got {value!r}; expected {_describe(tp)}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, path + (index,), sources, {}) for index, item in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"got {value!r}; expected a bool (true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"got {value!r}; expected an int")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise fail(f"got {value!r}; expected a float") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"got {value!r}; expected a float")
        value = float(value)
        if math.isnan(value):
            raise fail("got nan; expected a number")
    elif tp is str:
        if not isinstance(value, str):
            raise fail(f"got {value!r}; expected a string")
    else:  # pragma: no cover - a schema error, not a user error
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    _check_range(value, meta, fail)
    check = meta.get("check")
    if check is not None:
        problem = check(value)
        if problem:
            raise fail(f"got {value!r}; {problem}")
    return value


def _check_range(value: float, meta: Mapping[str, Any], fail: Callable[[str], ValueError]) -> None:
    ge, gt, le, lt = (meta.get(name) for name in ("ge", "gt", "le", "lt"))
    low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    high_ok = (le is None or value <= le) and (lt is None or value < lt)
    if low_ok and high_ok:
        return
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "")
    high = f"{le}]" if le is not None else (f"{lt})" if lt is not None else "")
    if low and high:
        allowed = f"a value in {low}, {high}"
    elif low:
        allowed = f"a value {'>=' if ge is not None else '>'} {low[1:]}"
    else:
        allowed = f"a value {'<=' if le is not None else '<'} {high[:-1]}"
    raise fail(f"got {value!r}, out of range; allowed: {allowed}")


# ----------------------------------------------------------------------------------------------
# Cross-field rules


def validate_config(config: Config) -> None:
    """Rules that involve more than one field; raises ValueError naming the keys, values and the fix."""
    def fail(message: str) -> None:
        raise ValueError(f"invalid config: {message}")

    teacher, loss, optim, data, backend = config.teacher, config.loss, config.optim, config.data, config.backend
    if teacher.mode == "sync" and teacher.sync_every < 1:
        fail(f"teacher.mode=sync needs teacher.sync_every >= 1 (optimizer steps between copies), "
             f"got teacher.sync_every={teacher.sync_every}")
    if optim.batch_size % optim.micro_batch_size:
        fail(f"optim.micro_batch_size={optim.micro_batch_size} must divide optim.batch_size={optim.batch_size}")
    if loss.targets == "sampled" and loss.kind != "reverse":
        fail(f"loss.targets=sampled estimates the reverse KL from the sampled token only; "
             f"got loss.kind={loss.kind}, allowed: loss.kind=reverse")
    if data.path is None or not data.path.strip():
        fail(f"data.path is required (data.kind={data.kind}: a JSONL file, a dataset folder or a dataset id)")
    if backend.kind == "tinker":
        distills = config.algorithm == "sdft"  # the SFT baseline uses neither the teacher nor the loss section
        if distills and teacher.mode == "ema":
            fail("backend.kind=tinker with teacher.mode=ema: EMA is impossible on Tinker: the teacher can only "
                 "be the base model or a saved copy; use teacher.mode=static or teacher.mode=sync")
        if distills and loss.targets == "full":
            fail("backend.kind=tinker with loss.targets=full: full-vocabulary targets need teacher hidden "
                 "states; Tinker exposes top-K log-probs only; use loss.targets=topk or loss.targets=sampled")
        if config.student.mode == "full":
            fail("backend.kind=tinker with student.mode=full: Tinker trains LoRA adapters only; "
                 "use student.mode=lora")
        if not backend.tinker_base_model:
            fail("backend.kind=tinker needs backend.tinker_base_model (the Tinker base model name)")
        if loss.temperature != 1.0:
            fail(f"backend.kind=tinker with loss.temperature={loss.temperature}: Tinker scores teacher and student "
                 "log-probs at temperature 1 only; allowed: loss.temperature=1.0")
    if loss.topk_kind == "reverse_kl" and loss.topk_normalize != "renormalize":
        fail(f"loss.topk_kind=reverse_kl compares the renormalized top-K distributions; got "
             f"loss.topk_normalize={loss.topk_normalize}, allowed: loss.topk_normalize=renormalize")
    names = [benchmark.name for benchmark in config.eval.benchmarks]
    for index, benchmark in enumerate(config.eval.benchmarks):
        key = f"eval.benchmarks[{index}]"
        if not benchmark.name:
            fail(f"{key}.name is required")
        if benchmark.name in names[:index]:
            fail(f"{key}.name={benchmark.name!r} is used by more than one benchmark; names must be unique")
        if benchmark.kind == "heldout":
            splits = data.split != "none" or (data.fallback_path is not None and data.fallback_split != "none")
            if not splits and not benchmark.path:
                fail(f"{key}.kind=heldout evaluates the test split made by data.split, but data.split=none and "
                     f"{key}.path is not set; allowed: data.split=random or data.split=api, or a path to evaluate "
                     "when no split is made")
        elif not benchmark.path:
            fail(f"{key}.path is required for {key}.kind={benchmark.kind} (only kind=heldout needs no path)")
