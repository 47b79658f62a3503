"""The run configuration: typed sections loaded from YAML plus `key=value` overrides.

Sections: model, student, teacher, objective (in `sdft.objectives`), optim, generation, data, eval, logging,
checkpoint, backend. Types, ranges and each section's own rules are checked by `sdft.schema` while the
config is built; `validate_config` adds the rules that span sections (and asks the backend what it can
run, `sdft.backends.check_backend_config`). Every error names the key, where it came from (`file:line` or the
override) and what is allowed; a key that moved names its new place.

Sections are frozen; derive a changed config with `apply_overrides(config, ["objective.targets=topk"])`.
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from sdft.io import atomic_write_text
from sdft.objectives.config import ObjectiveConfig
from sdft.prompts import resolve_teacher_template
from sdft.schema import Section, load_tree, override_tree, section_to_dict, setting, subsection

__all__ = [
    "ModelConfig", "StudentConfig", "TeacherConfig", "ObjectiveConfig", "OptimConfig", "GenerationConfig",
    "DataConfig", "BenchmarkConfig", "EvalConfig", "LoggingConfig", "CheckpointConfig", "BackendConfig",
    "Config", "load_config", "apply_overrides", "validate_config", "config_to_dict", "dump_config", "MOVED_KEYS",
    "TRACKERS", "SHIPPED_CONFIG_DIR", "shipped_config_names", "resolve_config_path",
]

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The configs that ship inside the package (the repository's configs/ folder): `--config quickstart` names one."""

MOVED_KEYS = {
    "loss.targets": "objective.targets", "loss.kind": "objective.full.kind", "loss.beta": "objective.full.beta",
    "loss.topk": "objective.topk.k", "loss.topk_normalize": "objective.topk.normalize",
    "loss.topk_kind": "objective.topk.kind", "loss.reduction": "objective.reduction",
    "loss.skip_first_n_tokens": "objective.skip_first_n_tokens", "loss.temperature": "objective.temperature",
    "loss.is_clip": "objective.is_clip", "loss.impl": "objective.impl", "loss.chunk_size": "objective.chunk_size",
    "loss": "objective",
}
"""Old dotted keys and where they live now: using an old key is an error that names the new one."""


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


@dataclass(frozen=True)
class ModelConfig(Section):
    name: str = setting("SmolLM2-135M-Instruct", check=_check_non_empty,
                        doc="the packaged SmolLM2-135M-Instruct, a local folder, or a hub id")
    dtype: Literal["float32", "bfloat16", "float64"] = setting(
        "float32", doc="weights and compute dtype (float64: for numerics checks)")
    gradient_checkpointing: bool = setting(False, doc="recompute activations in the backward pass")
    revision: Optional[str] = setting(None, doc="hub id: the branch, tag or commit to load")
    trust_remote_code: bool = setting(False, doc="hub id: allow the model's own modeling code")
    attn_implementation: Optional[str] = setting(None, doc="transformers attention: e.g. sdpa, eager, flash_attention_2")
    cache_dir: Optional[str] = setting(None, doc="where the packaged model is converted to (default ~/.cache/sdft)")


@dataclass(frozen=True)
class StudentConfig(Section):
    mode: Literal["lora", "full"] = setting("lora", doc="LoRA adapters (peft) or full fine-tuning")
    lora_rank: int = setting(16, ge=1)
    lora_alpha: float = setting(32.0, gt=0)
    lora_dropout: float = setting(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        doc="module names that get adapters (never the output layer)")


@dataclass(frozen=True)
class TeacherConfig(Section):
    mode: Literal["static", "ema", "sync"] = setting(
        "ema", doc="static: the base model; ema: phi <- (1 - a) phi + a theta after every step; sync: a copy every N steps")
    ema_alpha: float = setting(0.01, gt=0, le=1, doc="a of the EMA update")
    ema_fp32: bool = setting(True, doc="bf16 full fine-tuning: keep the EMA average in fp32 (a=0.01 steps round away)")
    sync_every: int = setting(0, ge=0, doc="mode=sync: optimizer steps between copies")
    template: str = setting("official", check=_check_template,
                            doc="teacher prompt: official, cookbook, or a text with $orig_content and $output_text")

    def check(self) -> str | None:
        if self.mode == "sync" and self.sync_every < 1:
            return (f"teacher.mode=sync needs teacher.sync_every >= 1 (optimizer steps between copies), "
                    f"got teacher.sync_every={self.sync_every}")
        return None


@dataclass(frozen=True)
class OptimConfig(Section):
    lr: float = setting(2e-5, gt=0, doc="peak learning rate")
    weight_decay: float = setting(0.0, ge=0)
    beta1: float = setting(0.9, ge=0, lt=1)
    beta2: float = setting(0.999, ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    schedule: Literal["constant", "cosine"] = setting("cosine", doc="cosine with linear warm-up, or constant")
    warmup_ratio: float = setting(0.1, ge=0, lt=1)
    max_grad_norm: Optional[float] = setting(1.0, gt=0, doc="gradient-norm clip; null disables clipping")
    batch_size: int = setting(32, ge=1, doc="prompts per optimizer step")
    micro_batch_size: int = setting(1, ge=1, doc="prompts per forward/backward (gradient accumulation)")
    epochs: float = setting(1.0, gt=0)
    max_steps: Optional[int] = setting(None, ge=1, doc="caps the optimizer steps")
    master_weights: bool = setting(True, doc="full fine-tuning of bf16 weights: AdamW steps fp32 master copies "
                                             "(false: in place, as the official code; small updates are lost)")

    def check(self) -> str | None:
        if self.batch_size % self.micro_batch_size:
            return f"optim.micro_batch_size={self.micro_batch_size} must divide optim.batch_size={self.batch_size}"
        return None


@dataclass(frozen=True)
class GenerationConfig(Section):
    max_new_tokens: int = setting(1024, ge=1, doc="completion length cap of on-policy samples")
    temperature: float = setting(1.0, gt=0)
    top_p: float = setting(1.0, gt=0, le=1)
    batch_size: int = setting(8, ge=1, doc="prompts per sampling call (native engine)")
    engine: Literal["native", "vllm"] = setting(
        "native", doc="native: batched KV-cache decoding in PyTorch; vllm: an in-process vLLM engine (the "
                      "[vllm] extra), weights reloaded after every optimizer step")
    vllm_gpu_memory_utilization: float = setting(0.3, gt=0, le=1, doc="engine=vllm on a GPU: its share of the "
                                                                      "GPU's memory")
    vllm_cpu_kv_cache_gib: float = setting(1.0, gt=0, doc="engine=vllm on the CPU: its KV cache (GiB)")
    vllm_max_model_len: Optional[int] = setting(None, ge=1, doc="engine=vllm: longest prompt + completion "
                                                                "(null: the model's)")
    vllm_sleep: Optional[bool] = setting(None, doc="engine=vllm: sleep between generations, weights and KV "
                                                   "cache off the GPU (null: on GPUs)")


@dataclass(frozen=True)
class DataConfig(Section):
    kind: Literal["jsonl", "messages", "prompt_completion", "privileged_context", "hf", "tooluse", "science"] = setting(
        "jsonl", doc="the row schema: jsonl (evsys {inputs, expected}), messages, prompt_completion, "
                     "privileged_context (TRL SDFT), hf (question/answer columns), tooluse, science")
    path: Optional[str] = setting(None, doc="required: a .jsonl/.json/.parquet file, a dataset folder (save_to_disk "
                                            "or data files), or a hub dataset id (downloaded once, then cached)")
    hf_config: Optional[str] = setting(None, doc="the dataset's config (subset) name, for a hub id or a data folder")
    hf_split: str = setting("train", doc="the split of a hub id, a data folder or a DatasetDict folder")
    hf_revision: Optional[str] = setting(None, doc="a hub dataset's branch, tag or commit (null: main)")
    user_template: str = setting("{question}", doc="jsonl/hf: the user turn, formatted with the row's fields")
    system_prompt: Optional[str] = setting(
        None, doc="the system turn of every example's prompts, student and teacher, training and held-out "
                  "(replaces a row's own); evsys task folders are evaluated as written")
    chat_template_kwargs: dict[str, Any] = setting(
        {}, doc="extra variables for the chat template of every prompt, e.g. {enable_thinking: false}")
    max_prompt_tokens: int = setting(
        1024, ge=1, doc="student prompts are cut from the left; teacher prompts from the end of the demonstration")
    thinking_format: bool = setting(False, doc="science: the cookbook's thinking format")
    split: Literal["none", "random", "api"] = setting("none", doc="how a held-out test split is carved out")
    test_fraction: float = setting(0.2, gt=0, lt=1)
    split_seed: int = 0
    question_field: str = setting("question", doc="hf: the column that fills {question} of user_template")
    answer_field: str = setting("answer", doc="hf: the answer and demonstration column; other kinds: the held-out "
                                              "reference when the row has it (else the demonstration)")
    max_examples: Optional[int] = setting(None, ge=1, doc="caps the training examples")
    fallback_path: Optional[str] = setting(None, doc="used instead of path when path does not exist")
    fallback_split: Literal["none", "random", "api"] = setting("none", doc="replaces split when the fallback is used")

    def check(self) -> str | None:
        if self.path is None or not self.path.strip():
            return (f"data.path is required (data.kind={self.kind}: a data file, a dataset folder or a hub "
                    "dataset id)")
        if self.system_prompt is not None and not self.system_prompt.strip():
            return "data.system_prompt is blank; give a text with at least one non-space character, or null"
        return None


@dataclass(frozen=True)
class BenchmarkConfig(Section):
    name: str = setting("", check=_check_run_name)
    kind: Literal["tasks", "tooluse", "science", "jsonl", "heldout", "lm_eval"] = setting(
        "tasks", doc="heldout: the test split made by data.split (or data.fallback_split); lm_eval: an "
                     "lm-evaluation-harness task (sdft.lm_eval_bridge)")
    path: Optional[str] = setting(None, doc="the data; kind=lm_eval: an optional folder of task YAMLs")
    run_every: Optional[int] = setting(None, ge=1, doc="steps between evaluations; null: once after training")
    split: str = "val"
    max_items: Optional[int] = setting(None, ge=1)
    max_new_tokens: int = setting(256, ge=1)
    tooluse_mode: Literal["strict", "robust", "actions"] = "strict"
    mcq_mode: Literal["official", "lenient"] = "official"
    task: Optional[str] = setting(None, doc="kind=lm_eval: the harness task or group (hellaswag, mmlu, ...)")
    metric: str = setting("acc", check=_check_non_empty, doc="kind=lm_eval: the 0/1 per-document metric scored")
    num_fewshot: int = setting(0, ge=0, doc="kind=lm_eval: in-context examples (0: the paper's setting)")
    chat_template: bool = setting(False, doc="kind=lm_eval: apply the tokenizer's chat template")
    allow_code_execution: bool = setting(False, doc="kind=lm_eval: let code tasks (humaneval) run generated code")


@dataclass(frozen=True)
class EvalConfig(Section):
    benchmarks: list[BenchmarkConfig] = setting([])
    before_training: bool = True
    batch_size: int = setting(8, ge=1, doc="prompts per greedy decoding call")


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
"""The experiment trackers of `logging.report_to` (accelerate.tracking names)."""


@dataclass(frozen=True)
class LoggingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = setting(
        ["tensorboard"], doc="trackers that get every metrics.jsonl row (accelerate.tracking); [] for none")
    project: str = setting("sdft", check=_check_non_empty,
                           doc="the wandb and trackio project, the MLflow experiment; the run is run_name")
    tensorboard: Optional[bool] = setting(
        None, doc="the older switch: true adds tensorboard to report_to, false removes it (null: report_to decides)")
    plot: bool = setting(True, doc="learning_curves.png at the end")
    progress: bool = True

    def check(self) -> str | None:
        repeated = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if repeated:
            return f"logging.report_to names {', '.join(repeated)} more than once"
        return None

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers this run logs to: report_to, with tensorboard added or removed by `tensorboard`."""
        chosen = [name for name in self.report_to if name != "tensorboard" or self.tensorboard is not False]
        if self.tensorboard and "tensorboard" not in chosen:
            chosen.insert(0, "tensorboard")
        return tuple(chosen)


@dataclass(frozen=True)
class CheckpointConfig(Section):
    every: int = setting(0, ge=0, doc="optimizer steps between checkpoints; 0: only at the end")
    keep_last: int = setting(2, ge=1)


@dataclass(frozen=True)
class BackendConfig(Section):
    kind: Literal["local", "tinker"] = setting("local", doc="local Hugging Face model, or the Tinker API")
    tinker_base_model: Optional[str] = setting(None, doc="kind=tinker: the Tinker base model name")
    tinker_service: Literal["remote", "offline"] = setting(
        "remote", doc="remote: the Tinker API (TINKER_API_KEY); offline: model.name served in-process")
    tinker_lora_rank: int = setting(32, ge=1)
    tinker_train_unembed: bool = setting(True, doc="LoRA on the output layer too (the SDK's default)")
    max_retries: int = setting(5, ge=0, doc="retries of an idempotent Tinker request after a transient error")
    retry_backoff_s: float = setting(1.0, ge=0, doc="first retry delay, doubled after every failed attempt")


@dataclass(frozen=True)
class Config(Section):
    seed: int = 0
    run_name: str = setting("sdft", check=_check_run_name)
    output_dir: str = setting("runs", check=_check_non_empty)
    resume: bool = setting(False, doc="continue the run in output_dir/run_name from its newest intact checkpoint")
    overwrite: bool = setting(False, doc="start anew in a folder that holds a run: the old folder is moved aside")
    algorithm: Literal["sdft", "sft"] = setting("sdft", doc="sft: the cross-entropy baseline on the demonstrations")
    model: ModelConfig = subsection(ModelConfig)
    student: StudentConfig = subsection(StudentConfig)
    teacher: TeacherConfig = subsection(TeacherConfig)
    objective: ObjectiveConfig = subsection(ObjectiveConfig)
    optim: OptimConfig = subsection(OptimConfig)
    generation: GenerationConfig = subsection(GenerationConfig)
    data: DataConfig = subsection(DataConfig)
    eval: EvalConfig = subsection(EvalConfig)
    logging: LoggingConfig = subsection(LoggingConfig)
    checkpoint: CheckpointConfig = subsection(CheckpointConfig)
    backend: BackendConfig = subsection(BackendConfig)


def shipped_config_names() -> list[str]:
    """The names of the shipped configs (run configs and experiment specs), sorted."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file: `name_or_path` itself when it is a file, else the shipped config of that name
    ("quickstart" or "quickstart.yaml"); a FileNotFoundError naming the shipped configs otherwise."""
    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():  # a file (or /dev/null: all defaults)
        return path
    text = os.fspath(name_or_path)
    if path.parent == Path(".") and text not in ("", ".", ".."):
        shipped = SHIPPED_CONFIG_DIR / (text if text.endswith((".yaml", ".yml")) else text + ".yaml")
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(f"config {text!r} is neither a file nor a shipped config; shipped configs: "
                            f"{', '.join(shipped_config_names()) or 'none'}")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML file at `path` (a file or the name of a shipped config, `resolve_config_path`; None: all
    defaults), apply `key=value` overrides in order, type-check every field and run `validate_config`."""
    if path is not None:
        path = resolve_config_path(path)
    config = load_tree(Config, path, overrides, moved=MOVED_KEYS)
    validate_config(config)
    return config


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A copy of `config` with `key=value` overrides applied, type-checked and validated."""
    new = override_tree(config, overrides, moved=MOVED_KEYS)
    validate_config(new)
    return new


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML- and JSON-serializable)."""
    return section_to_dict(config)


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Write `config` as YAML atomically; `load_config(path)` reads it back equal."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=100)
    atomic_write_text(path, text)


def validate_config(config: Config) -> None:
    """Rules that span sections; raises ValueError naming the keys, values and the fix."""
    from sdft.backends import check_backend_config

    check_backend_config(config)
    names = [benchmark.name for benchmark in config.eval.benchmarks]
    data = config.data
    for index, benchmark in enumerate(config.eval.benchmarks):
        key = f"eval.benchmarks[{index}]"
        if not benchmark.name:
            raise ValueError(f"invalid config: {key}.name is required")
        if benchmark.name in names[:index]:
            raise ValueError(f"invalid config: {key}.name={benchmark.name!r} is used by more than one benchmark; "
                             "names must be unique")
        if benchmark.kind == "heldout":
            splits = data.split != "none" or (data.fallback_path is not None and data.fallback_split != "none")
            if not splits and not benchmark.path:
                raise ValueError(
                    f"invalid config: {key}.kind=heldout evaluates the test split made by data.split, but "
                    f"data.split=none and {key}.path is not set; allowed: data.split=random or data.split=api, "
                    "or a path to evaluate when no split is made")
        elif benchmark.kind == "lm_eval":
            if not benchmark.task:
                raise ValueError(f"invalid config: {key}.task is required for {key}.kind=lm_eval (an "
                                 "lm-evaluation-harness task name such as hellaswag)")
        elif not benchmark.path:
            raise ValueError(f"invalid config: {key}.path is required for {key}.kind={benchmark.kind} "
                             "(only kind=heldout and kind=lm_eval need no path)")
        if benchmark.task is not None and benchmark.kind != "lm_eval":
            raise ValueError(f"invalid config: {key}.task={benchmark.task!r} is only read by kind=lm_eval, "
                             f"not kind={benchmark.kind}")
