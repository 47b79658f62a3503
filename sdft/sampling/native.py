"""The native sampler: batched KV-cache decoding of a Hugging Face causal LM in PyTorch.

Prompts are left-padded, position ids counted over the real tokens only, and decoded `batch_size` at a
time with the model's KV cache. Every decoding step draws the next token of all rows in one batched
operation (`sdft.sampling.draw`): sampling inverts the CDF of softmax(z / T) restricted to the top-p
nucleus with counter-based uniforms keyed by (prompt seed, token index), so a prompt's completion does not
depend on the batch it is decoded in; the log-probability of each drawn token under that distribution is
returned (greedy decoding returns log-softmax(z) of the argmax). A prompt is finished when it produced a
stop token (kept). Finished rows are dropped from the batch (and from the KV cache) at stop checks, every
`stop_check_every` tokens: the only points where the host waits for the device.

Why not `model.generate`: it draws from one global generator (no per-prompt streams), keeps decoding
finished rows, and does not return the log-probs under the top-p-restricted distribution.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import nn

from sdft.sampling.base import (Rollout, SamplingParams, check_positive_int, checked_greedy_request,
                                checked_sample_request, padding_token_id, stop_token_ids)
from sdft.sampling.draw import counter_uniforms, draw_tokens, greedy_tokens

__all__ = ["NativeSampler", "decode_batch", "default_stop_check_every"]


class NativeSampler:
    """Decodes `causal_lm` (a module whose forward returns logits; for a peft student the base model with
    the adapter layers injected, so the active adapter decides what is decoded). Implements
    `sdft.sampling.base.Sampler`. Without per-prompt seeds, the prompts' stream seeds are drawn from one
    generator seeded by `seed` (its state is `generator`, kept in checkpoints). `batch_size`: prompts per
    decoding batch (None: all). `stop_check_every`: tokens between stop checks (None: see
    `default_stop_check_every`). `sync_stop(alive) -> any process alive`: with a sharded student every forward is
    collective, so every process decodes (a finished batch keeps one row) until all are done."""

    def __init__(self, causal_lm: nn.Module, tokenizer, *, batch_size: int | None = None, seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None, stop_check_every: int | None = None,
                 sync_stop: Callable[[bool], bool] | None = None):
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if stop_check_every is not None:
            check_positive_int("stop_check_every", stop_check_every)
        self.causal_lm = causal_lm
        self.stop_ids = stop_token_ids(tokenizer, getattr(causal_lm, "generation_config", None), eos_token_ids)
        self.pad_id = padding_token_id(tokenizer, self.stop_ids)
        self.batch_size = batch_size
        self.stop_check_every = stop_check_every
        self.sync_stop = sync_stop
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def weights_changed(self) -> None:
        """Nothing to do: decoding reads the live module."""

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        prompts, seeds = checked_sample_request(prompt_ids, params, seeds, self.generator)
        out = self._decode(prompts, params.max_new_tokens, params.temperature, params.top_p, greedy=False,
                           seeds=seeds)
        return [Rollout(tuple(p), tuple(ids), tuple(lps), finished) for p, (ids, lps, finished) in zip(prompts, out)]

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
               batch_size: int | None = None) -> list[list[int]]:
        prompts = checked_greedy_request(prompt_ids, max_new_tokens, batch_size)
        return [ids for ids, _, _ in self._decode(prompts, max_new_tokens, 1.0, 1.0, greedy=True,
                                                  batch_size=batch_size)]

    def _decode(self, prompts, max_new_tokens, temperature, top_p, greedy, seeds=None, batch_size=None):
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
                        eos_token_ids=self.stop_ids, seeds=None if seeds is None else seeds[start:start + size],
                        stop_check_every=self.stop_check_every, sync_stop=self.sync_stop))
        finally:
            causal_lm.train(was_training)
        return results


def default_stop_check_every(device: torch.device) -> int:
    """Tokens between stop checks: 1 on the CPU (the host is the device: a check costs nothing and a
    finished row leaves at once), 8 on an accelerator (a check waits for the device)."""
    return 1 if torch.device(device).type == "cpu" else 8


def decode_batch(causal_lm: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float, top_p: float, greedy: bool, pad_token_id: int, eos_token_ids: Sequence[int],
                 seeds: Sequence[int] | None = None, stop_check_every: int | None = None,
                 sync_stop: Callable[[bool], bool] | None = None) -> list[tuple[list[int], list[float], bool]]:
    """Left-padded KV-cache decoding of one batch of prompts (call under torch.no_grad(), in eval mode);
    returns (completion ids, sampler log-probs, finished) per prompt. Sampling needs `seeds`: prompt b draws
    its token t with the uniform counter_uniforms(seeds)[b, t], so its result does not depend on the batch.
    `sync_stop`: see NativeSampler (then the stop check runs every token)."""
    device = next(causal_lm.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    if not greedy and (seeds is None or len(seeds) != batch):
        raise ValueError("sampling needs one seed per prompt")
    check_every = 1 if sync_stop is not None else stop_check_every or default_stop_check_every(device)
    # attention over [prompt | completion]: left padding masked, every completion slot visible (causality
    # hides the ones not yet written)
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.long)
    attention = torch.ones((batch, width + max_new_tokens), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[b, :width - len(prompt)] = 0
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)
    uniforms = None if greedy else counter_uniforms(seeds, max_new_tokens, device=device)   # [B, T]
    eos = torch.tensor([int(i) for i in eos_token_ids], dtype=torch.long, device=device)

    cache = _new_cache(causal_lm)
    cache_kw = _cache_keyword(causal_lm)
    logits = causal_lm(input_ids=input_ids, attention_mask=attention[:, :width], position_ids=positions,
                       use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
    next_pos = positions[:, -1:] + 1                                          # [b, 1] of the live rows
    rows = torch.arange(batch, device=device)                                 # live row -> prompt index
    tokens = torch.full((batch, max_new_tokens), int(pad_token_id), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float64, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)            # [b] live rows that hit a stop
    for t in range(max_new_tokens):
        if greedy:
            token, token_lp = greedy_tokens(logits)
        else:
            token, token_lp = draw_tokens(logits, uniforms[rows, t], temperature, top_p)
        tokens[rows, t] = token
        logprobs[rows, t] = token_lp.double()
        new_stop = torch.isin(token, eos) & ~stopped
        lengths[rows] = torch.where(new_stop, t + 1, lengths[rows])
        stopped |= new_stop
        if t == max_new_tokens - 1:
            break
        if sync_stop is not None and not sync_stop(not bool(stopped.all())):  # once per token on every process
            break
        if (t + 1) % check_every == 0 and bool(stopped.any()):  # drop finished rows
            keep = (~stopped).nonzero()[:, 0]
            if keep.numel() == 0 and sync_stop is None:
                break
            if keep.numel() == 0:  # other processes still decode: keep one finished row as a filler
                keep = keep.new_zeros(1)
            rows, token, next_pos, stopped = rows[keep], token[keep], next_pos[keep], stopped[keep]
            attention = attention[keep]
            cache.reorder_cache(keep)
        span = width + t + 1
        logits = causal_lm(input_ids=token[:, None], attention_mask=attention[:, :span], position_ids=next_pos,
                           use_cache=True, **{cache_kw: cache}).logits[:, -1]
        next_pos = next_pos + 1
    lengths, tokens, logprobs = lengths.tolist(), tokens.tolist(), logprobs.tolist()
    return [(tokens[b][:n], logprobs[b][:n], n < max_new_tokens or tokens[b][n - 1] in eos_token_ids)
            for b, n in enumerate(lengths)]


def _new_cache(causal_lm: nn.Module):
    """An empty growing KV cache laid out for the model's layer types (sliding-window layers included)."""
    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache).parameters:
        return DynamicCache(config=causal_lm.config)
    return DynamicCache()


def _cache_keyword(causal_lm: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.x) or `past_key_values`."""
    from sdft.lm import causal_lm_of

    forward = causal_lm_of(causal_lm).forward  # (a peft or FSDP2 root passes keywords on)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
