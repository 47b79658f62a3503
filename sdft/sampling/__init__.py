"""On-policy sampling and greedy decoding behind one interface (`Sampler`): the native KV-cache sampler
(`native.py`) and the vLLM engine (`vllm.py`, the `[vllm]` extra). `build_sampler` is the only place that
looks at `generation.engine`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from sdft.sampling.base import Rollout, Sampler, SamplingParams, stop_token_ids
from sdft.sampling.native import NativeSampler

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sdft.config import GenerationConfig

__all__ = ["Rollout", "Sampler", "SamplingParams", "NativeSampler", "stop_token_ids", "build_sampler"]


def build_sampler(generation: "GenerationConfig", causal_lm: "nn.Module", tokenizer, *, seed: int = 0,
                  model_path: str | None = None, dtype: str = "float32",
                  weights: Callable[[], Iterable[tuple[str, "torch.Tensor"]]] | None = None,
                  sync_stop: Callable[[bool], bool] | None = None) -> Sampler:
    """The sampler of `generation.engine` for the student `causal_lm` (its root module: a peft, DDP or FSDP2
    wrapper is fine). native: decodes `causal_lm` itself
    (generation.batch_size prompts at a time). vllm: an engine started on `model_path` (the folder the
    student was loaded from) in `dtype`, reloaded from `weights()` (default: `policy_weights` of the wrapped causal LM)
    after `Sampler.weights_changed()`; the stop tokens are the student's (tokenizer and generation config).
    `sync_stop`: the native sampler of a sharded student decodes until every process is done (see NativeSampler)."""
    if generation.engine == "native":
        return NativeSampler(causal_lm, tokenizer, batch_size=generation.batch_size, seed=seed, sync_stop=sync_stop)
    from sdft.sampling.vllm import VLLMSampler, import_vllm
    from sdft.sampling.weights import policy_weights

    import_vllm()  # the missing extra is named before anything else is checked
    if model_path is None:
        raise ValueError("generation.engine=vllm needs the student's model folder (model.name as a local folder, "
                         "a hub id or the packaged SmolLM2), got none")
    from sdft.lm import causal_lm_of

    inner = causal_lm_of(causal_lm)  # (a peft or DDP wrapper's causal LM: the names the engine knows)
    return VLLMSampler(
        model_path, tokenizer, weights=weights or (lambda: policy_weights(inner)), dtype=dtype, seed=seed,
        generation_config=getattr(inner, "generation_config", None),
        max_model_len=generation.vllm_max_model_len, gpu_memory_utilization=generation.vllm_gpu_memory_utilization,
        cpu_kv_cache_bytes=int(generation.vllm_cpu_kv_cache_gib * 2**30), sleep=generation.vllm_sleep)
