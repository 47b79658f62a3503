"""Backends and objectives for tests, from the few settings a test cares about (the rest: defaults)."""
from __future__ import annotations

from sdft.config import BackendConfig, ModelConfig, ObjectiveConfig, OptimConfig, StudentConfig, TeacherConfig
from sdft.objectives import build_objective


def objective(targets="full", *, topk=20, topk_normalize="renormalize", topk_kind="cross_entropy", kind="forward",
              reduction="seq_mean", is_clip=None, temperature=1.0, skip_first_n_tokens=3, impl="auto"):
    """An Objective (is_clip off unless asked, unlike the config default)."""
    return build_objective(ObjectiveConfig.from_dict({
        "targets": targets, "full": {"kind": kind}, "reduction": reduction, "is_clip": is_clip,
        "topk": {"k": topk, "normalize": topk_normalize, "kind": topk_kind},
        "temperature": temperature, "skip_first_n_tokens": skip_first_n_tokens, "impl": impl}))


def optim(lr=1e-2, *, beta1=0.9, beta2=0.999, eps=1e-8, schedule="constant", warmup_ratio=0.0, max_grad_norm=None,
          micro_batch_size=4):
    return OptimConfig(lr=lr, beta1=beta1, beta2=beta2, eps=eps, schedule=schedule, warmup_ratio=warmup_ratio,
                       max_grad_norm=max_grad_norm, micro_batch_size=micro_batch_size, batch_size=micro_batch_size)


def local_backend(model, tokenizer, *, lora_rank=4, lora_alpha=32.0, lora_target_modules=None, teacher_mode="static",
                  sync_every=0, dtype="float32", seed=0, generation_batch_size=8, steps=1, **optim_kwargs):
    from sdft.backends.local import LocalBackend
    from sdft.config import GenerationConfig

    student = StudentConfig(lora_rank=lora_rank, lora_alpha=lora_alpha,
                            **({"lora_target_modules": lora_target_modules} if lora_target_modules else {}))
    return LocalBackend(model, tokenizer, student=student, teacher=TeacherConfig(mode=teacher_mode, sync_every=sync_every),
                        optim=optim(**optim_kwargs), generation=GenerationConfig(batch_size=generation_batch_size),
                        model_settings=ModelConfig(dtype=dtype), steps=steps, seed=seed)


def tinker_backend(base_model, tokenizer, service_client, *, lora_rank=32, train_unembed=True, teacher_mode="static",
                   sync_every=0, seed=0, steps=1, max_retries=5, retry_backoff_s=1.0, sleep=None, **optim_kwargs):
    from sdft.backends.tinker import TinkerBackend

    backend = BackendConfig(kind="tinker", tinker_base_model=base_model, tinker_lora_rank=lora_rank,
                            tinker_train_unembed=train_unembed, max_retries=max_retries,
                            retry_backoff_s=retry_backoff_s)
    extra = {"sleep": sleep} if sleep is not None else {}
    return TinkerBackend(tokenizer, backend=backend, teacher=TeacherConfig(mode=teacher_mode, sync_every=sync_every),
                         optim=optim(**optim_kwargs), steps=steps, seed=seed, service_client=service_client, **extra)
