"""Backends: the mechanisms that run the SDFT loop's model (`base.Backend`).

    local.py           a Hugging Face model on this machine (LoRA or full fine-tuning; static, EMA or sync teacher)
    tinker.py          the Tinker API (LoRA; static or sync teacher; top-K or sampled-token targets)
    tinker_offline.py  an in-process stand-in for the Tinker service, for debugging Tinker configs offline

This module is the only place that looks at `backend.kind`: `check_backend_config` states what each backend
can run (checked once, when a config loads), `build_backend` builds one from a config, `preflight` checks a
config's model without training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config module imports this one to validate configs
    from sdft.config import Config

__all__ = ["BackendLimits", "LIMITS", "check_backend_config", "build_backend", "preflight", "require_local_weights"]


@dataclass(frozen=True)
class BackendLimits:
    """What a backend can run; `why` explains each limit in the error message."""

    teacher_outputs: tuple[str, ...]   # TeacherRequest kinds it can compute
    teacher_modes: tuple[str, ...]
    student_modes: tuple[str, ...]
    temperature_one_only: bool
    single_process: bool
    local_weights: bool                # the student's weights live on this machine
    trained_on: str                    # where the student is trained, in words (model cards)
    why: str = ""


LIMITS = {
    "local": BackendLimits(teacher_outputs=("hidden", "topk", "logprobs"), teacher_modes=("static", "ema", "sync"),
                           student_modes=("lora", "full"), temperature_one_only=False, single_process=False,
                           local_weights=True, trained_on="a local Hugging Face model"),
    "tinker": BackendLimits(teacher_outputs=("topk", "logprobs"), teacher_modes=("static", "sync"),
                            student_modes=("lora",), temperature_one_only=True, single_process=True,
                            local_weights=False, trained_on="the Tinker API", why="Tinker trains LoRA adapters, exposes top-K log-probs at "
                                                     "temperature 1 and cannot average weights"),
}


def check_backend_config(config: "Config") -> None:
    """The config asks only for what backend.kind can run; a ValueError naming the key and the fix otherwise."""
    from sdft.objectives import build_objective

    kind = config.backend.kind
    limits = LIMITS[kind]

    def fail(message: str) -> None:
        raise ValueError(f"invalid config: backend.kind={kind} with {message}")

    if kind == "tinker" and not config.backend.tinker_base_model:
        raise ValueError("invalid config: backend.kind=tinker needs backend.tinker_base_model (the Tinker base "
                         "model name)")
    lm_eval = [b.name for b in config.eval.benchmarks if b.kind == "lm_eval"]
    if lm_eval and not limits.local_weights:
        fail(f"eval.benchmarks {lm_eval} of kind lm_eval: the harness scores a model held in this process; "
             "remove them, or evaluate with backend.kind=local")
    if kind != "local" and config.generation.engine != "native":
        fail(f"generation.engine={config.generation.engine}: only the local backend decodes with it; allowed: "
             "generation.engine=native")
    if config.student.mode not in limits.student_modes:
        fail(f"student.mode={config.student.mode}: {limits.why}; allowed: student.mode="
             + " or ".join(limits.student_modes))
    if config.algorithm != "sdft":  # the SFT baseline uses neither the teacher nor the objective
        return
    if config.teacher.mode not in limits.teacher_modes:
        fail(f"teacher.mode={config.teacher.mode}: the teacher can only be the base model or a saved copy "
             f"({limits.why}); allowed: " + ", ".join(f"teacher.mode={m}" for m in limits.teacher_modes))
    request = build_objective(config.objective).teacher_request
    if request.kind not in limits.teacher_outputs:
        fail(f"objective.targets={config.objective.targets}: it needs the teacher's {request.kind} ({limits.why}); "
             "use objective.targets=topk or objective.targets=sampled")
    if limits.temperature_one_only and config.objective.temperature != 1.0:
        fail(f"objective.temperature={config.objective.temperature}: {limits.why}; allowed: "
             "objective.temperature=1.0")


def require_local_weights(config: "Config", where: str) -> None:
    """A clear error when the student of this config does not live on this machine (a Tinker run)."""
    if not LIMITS[config.backend.kind].local_weights:
        raise ValueError(f"{where}: backend.kind={config.backend.kind!r}; only local runs can be rebuilt or "
                         "evaluated here (a Tinker run's weights live on the Tinker service)")


def build_backend(config: "Config", *, steps: int, parallel=None, device=None,
                  run_dir: str | os.PathLike | None = None, model=None, tokenizer=None, service_client=None):
    """The backend of `config` for a run of `steps` optimizer steps; its tokenizer is `backend.tokenizer`.

    local: `model`/`tokenizer` (loaded from model.name when not given), prepared for `parallel`
    (`sdft.parallel.Parallel`: one process, DDP or FSDP2; its device unless `device` is given); the LoRA init
    is the same on every process, the sampler's own seed is offset by rank.
    tinker: `service_client` (None: the offline stand-in serving model.name when
    backend.tinker_service=offline, with its checkpoints under run_dir/tinker_offline; else the Tinker API,
    which needs TINKER_API_KEY)."""
    from sdft.models import configured_tokenizer, load_configured, resolve_model_path
    from sdft.parallel import Parallel

    parallel = parallel or Parallel()
    kind = config.backend.kind
    if LIMITS[kind].single_process and parallel.world_size > 1:
        raise ValueError(f"backend.kind={kind} runs in one process ({kind} batches the work itself); got "
                         f"{parallel.world_size} processes: launch scripts/train.py without accelerate")
    lm_eval = [b.name for b in config.eval.benchmarks if b.kind == "lm_eval"]
    if lm_eval and parallel.world_size > 1:
        raise ValueError(f"eval.benchmarks {lm_eval} of kind lm_eval run the harness on a whole model in one "
                         f"process; got {parallel.world_size} processes: evaluate the run afterwards with "
                         "`sdft evaluate --run RUN` in one process, or remove them")
    if kind == "local":
        from sdft.backends.local import LocalBackend

        if model is None and parallel.ram_efficient_loading:
            from sdft.parallel import load_on_main_only

            model, tokenizer = load_on_main_only(config.model, parallel, dtype=LocalBackend.weights_dtype(config, parallel))
        elif model is None:
            model, tokenizer = load_configured(config.model, dtype=LocalBackend.weights_dtype(config, parallel))
        model_path = None
        if config.generation.engine == "vllm":  # the engine starts from the student's folder
            model_path = resolve_model_path(config.model.name, cache_dir=config.model.cache_dir)
        return LocalBackend(model, tokenizer, student=config.student, teacher=config.teacher, optim=config.optim,
                            generation=config.generation, model_settings=config.model, steps=steps,
                            device=device if device is not None else parallel.device, seed=config.seed,
                            sampler_seed=config.seed + 1000003 * parallel.rank, parallel=parallel,
                            model_path=model_path)
    from sdft.backends.tinker import TinkerBackend, require_api_key

    if service_client is None and config.backend.tinker_service == "offline":
        from sdft.backends.tinker_offline import OfflineServiceClient

        if model is None:
            model, tokenizer = load_configured(config.model)
        if device is not None:
            model.to(device)
        root = Path(run_dir) / "tinker_offline" if run_dir is not None else None
        service_client = OfflineServiceClient(model, tokenizer, base_model=config.backend.tinker_base_model, root=root,
                                              lora_alpha=config.student.lora_alpha,
                                              lora_dropout=config.student.lora_dropout, seed=config.seed)
    elif service_client is None:
        require_api_key()
    if tokenizer is None:
        tokenizer = configured_tokenizer(config.model)
    return TinkerBackend(tokenizer, backend=config.backend, teacher=config.teacher, optim=config.optim, steps=steps,
                         seed=config.seed, service_client=service_client)


def preflight(config: "Config") -> tuple[object, list[str]]:
    """(tokenizer, report lines) for `--validate`: the model of a local or offline run loads with its chat
    tokenizer; a remote Tinker run needs only the tokenizer here, and the API key is reported."""
    from sdft.models import configured_tokenizer, load_configured, resolve_model_path

    backend = config.backend
    if backend.kind == "tinker" and backend.tinker_service == "remote":
        from sdft.backends.tinker import API_KEY_VARIABLE

        tokenizer = configured_tokenizer(config.model)
        key = "set" if os.environ.get(API_KEY_VARIABLE, "").strip() else "NOT set (training will stop)"
        return tokenizer, [f"tokenizer: ok ({config.model.name}, vocabulary {len(tokenizer)}); Tinker base model "
                           f"{backend.tinker_base_model}, {API_KEY_VARIABLE} {key}"]
    model_path = resolve_model_path(config.model.name, cache_dir=config.model.cache_dir)
    _, tokenizer = load_configured(config.model)
    return tokenizer, [f"model: ok ({config.model.name} -> {model_path}, vocabulary {len(tokenizer)})"]
