"""The native sampler: KV-cache decoding of a Hugging Face causal LM in PyTorch.

Prompts are left-padded, position ids counted over the real tokens only, and decoded `batch_size` at a
time with the model's KV cache. Sampling draws from softmax(z / T) restricted to the top-p nucleus; the
log-probability of each drawn token under that restricted distribution is returned (greedy decoding
returns log-softmax(z) of the argmax). A prompt is finished when it produced a stop token (kept);
positions after that are dropped.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from sdft.sampling.base import (Rollout, SamplingParams, check_positive_int, check_token_lists, padding_token_id,
                                stop_token_ids)

__all__ = ["NativeSampler", "decode_batch", "sampling_logprobs", "draw_token"]


class NativeSampler:
    """Decodes `causal_lm` (a module whose forward returns logits; for a peft student the base model with
    the adapter layers injected, so the active adapter decides what is decoded). Implements
    `sdft.sampling.base.Sampler`. Without per-prompt seeds, draws come from one generator seeded by `seed`
    (its state is `generator`, kept in checkpoints). `batch_size`: prompts per decoding batch (None: all)."""

    def __init__(self, causal_lm: nn.Module, tokenizer, *, batch_size: int | None = None, seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None, sync_stop: Callable[[bool], bool] | None = None):
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        self.causal_lm = causal_lm
        self.stop_ids = stop_token_ids(tokenizer, getattr(causal_lm, "generation_config", None), eos_token_ids)
        self.pad_id = padding_token_id(tokenizer, self.stop_ids)
        self.batch_size = batch_size
        self.sync_stop = sync_stop
        device = next(causal_lm.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed))

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = check_token_lists("prompt_ids", prompt_ids)
        generators = None
        if seeds is not None:
            if len(seeds) != len(prompts):
                raise ValueError(f"seeds must have one entry per prompt: got {len(seeds)} seeds for "
                                 f"{len(prompts)} prompts")
            device = self.generator.device
            generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        out = self._decode(prompts, params.max_new_tokens, params.temperature, params.top_p, greedy=False,
                           generators=generators)
        return [Rollout(tuple(p), tuple(ids), tuple(lps), finished) for p, (ids, lps, finished) in zip(prompts, out)]

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
               batch_size: int | None = None) -> list[list[int]]:
        check_positive_int("max_new_tokens", max_new_tokens)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        prompts = check_token_lists("prompt_ids", prompt_ids)
        return [ids for ids, _, _ in self._decode(prompts, max_new_tokens, 1.0, 1.0, greedy=True,
                                                  batch_size=batch_size)]

    def _decode(self, prompts, max_new_tokens, temperature, top_p, greedy, generators=None, batch_size=None):
        """decode_batch over `batch_size` prompts at a time in eval mode under no_grad (training mode restored)."""
        size = batch_size or self.batch_size or len(prompts)
        causal_lm, results = self.causal_lm, []
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(prompts), size):
                    results.extend(decode_batch(
                        causal_lm, prompts[start:start + size], max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, greedy=greedy, pad_token_id=self.pad_id,
                        eos_token_ids=self.stop_ids, generator=self.generator,
                        generators=None if generators is None else generators[start:start + size],
                        sync_stop=self.sync_stop))
        finally:
            causal_lm.train(was_training)
        return results


def decode_batch(causal_lm: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float, top_p: float, greedy: bool, pad_token_id: int, eos_token_ids: Sequence[int],
                 generator: torch.Generator | None = None, generators: Sequence[torch.Generator] | None = None,
                 sync_stop: Callable[[bool], bool] | None = None) -> list[tuple[list[int], list[float], bool]]:
    """Left-padded KV-cache decoding of one batch of prompts (call under torch.no_grad(), in eval mode);
    returns (completion ids, sampler log-probs, finished) per prompt. `generators` gives prompt b its own
    random stream (results then do not depend on batching), else `generator` is shared. `sync_stop(alive)`
    -> whether any process still decodes: with a sharded model every forward is collective, so every process
    decodes until all are done."""
    device = next(causal_lm.parameters()).device
    pad, eos_ids = int(pad_token_id), [int(i) for i in eos_token_ids]
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[b, width - len(prompt):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    out = causal_lm(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, alive = [], [], []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if greedy:
            token = logits.argmax(-1)
            token_lp = torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
        else:
            token, token_lp = draw_token(logits, temperature, top_p, generator=generator, generators=generators)
        alive.append(~done)
        token = torch.where(done, torch.full_like(token, pad), token)
        tokens.append(token)
        logprobs.append(token_lp)
        done = done | torch.isin(token, eos)
        alive_here = not bool(done.all())
        if t == max_new_tokens - 1 or not (sync_stop(alive_here) if sync_stop is not None else alive_here):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = causal_lm(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos,
                        past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    tokens = torch.stack(tokens, 1).tolist()
    logprobs = torch.stack(logprobs, 1).tolist()
    alive = torch.stack(alive, 1).tolist()
    finished = done.tolist()
    results = []
    for b in range(batch):
        n = sum(alive[b])
        results.append((tokens[b][:n], [float(x) for x in logprobs[b][:n]], bool(finished[b])))
    return results


def draw_token(logits: torch.Tensor, temperature: float, top_p: float, *, generator: torch.Generator | None = None,
               generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits [B, V] from softmax(z / T) within the top-p nucleus, and its log-prob
    under that distribution: (tokens [B] int64, log-probs [B] float32). Row b uses generators[b] when given."""
    lp = sampling_logprobs(logits, temperature, top_p)
    probs = lp.exp()
    if generators is None:
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        token = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
    return token, lp.gather(-1, token[:, None])[:, 0]


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log-softmax(z / T) [B, V] restricted to the smallest set of most likely tokens whose probability
    reaches top_p (the rest get -inf), renormalized."""
    scaled = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, -1)
