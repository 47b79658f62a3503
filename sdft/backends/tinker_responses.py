"""Reading the Tinker teacher's responses into per-rollout targets; checked, never guessed.

A response whose top-K list has not exactly one entry per token of [teacher prompt | completion], or no entry
at a completion position, or more than K pairs there, is an error. Within a row, padding pairs (log-prob
<= -99999 or not finite), ids outside [0, vocab_size) and repeated ids are dropped and a shorter list is
padded; dropped slots are invalid (id -1) and the loss renormalizes the rest. The fraction of invalid slots
is reported as train/teacher_topk_invalid_frac.
"""
from __future__ import annotations

import math

import torch

__all__ = ["topk_rows_from_response", "sampled_rows", "PADDING_LOGPROB"]

PADDING_LOGPROB = -99999.0
"""The SDK fills missing top-K pairs with (token 0, log-prob -99999); such pairs are never teacher mass."""


def topk_rows_from_response(topk_prompt_logprobs, *, prompt_len: int, completion_len: int, k: int,
                            vocab_size: int, where: str = "teacher response") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The teacher's top-K at the completion positions of one [prompt | completion] sequence.

    topk_prompt_logprobs: `SampleResponse.topk_prompt_logprobs`, one entry per sequence position (a list of
    (token id, log-prob) pairs, or None where not scored); entry prompt_len + j belongs to completion token
    j. Returns (ids [T, K] int64 with -1 for invalid slots, log-probs [T, K] float32 with 0 there, the
    number of invalid slots). Errors, never a guess, when the positions do not line up: a list whose length
    is not prompt_len + completion_len, a missing entry at a completion position, more than K pairs, or a
    malformed pair. Dropped: padding pairs (log-prob <= -99999 or not finite), ids outside
    [0, vocab_size), repeated ids; a list shorter than K leaves its last slots invalid.
    """
    if topk_prompt_logprobs is None:
        raise ValueError(f"{where} has no topk_prompt_logprobs; the request must set include_prompt_logprobs=True "
                         "and topk_prompt_logprobs=K")
    expected = prompt_len + completion_len
    if len(topk_prompt_logprobs) != expected:
        raise ValueError(f"{where} has top-K entries for {len(topk_prompt_logprobs)} positions, expected one per "
                         f"token of [teacher prompt | completion] ({prompt_len} + {completion_len} = {expected}); "
                         "refusing to guess how teacher positions align with completion tokens")
    ids = torch.full((completion_len, k), -1, dtype=torch.long)
    lps = torch.zeros((completion_len, k), dtype=torch.float32)
    invalid = 0
    for j in range(completion_len):
        entry = topk_prompt_logprobs[prompt_len + j]
        if entry is None:
            raise ValueError(f"{where} has no top-K entry for completion token {j} (sequence position "
                             f"{prompt_len + j}); was prompt_logprobs_last_n smaller than the completion?")
        if len(entry) > k:
            raise ValueError(f"{where} has {len(entry)} top-K pairs for completion token {j}, more than K={k}")
        seen = set()
        for slot, pair in enumerate(entry):
            try:
                token, logprob = int(pair[0]), float(pair[1])
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"{where}: top-K pair {slot} of completion token {j} is {pair!r}, expected "
                                 "(token id, log-prob)") from None
            if not math.isfinite(logprob) or logprob <= PADDING_LOGPROB or not 0 <= token < vocab_size or token in seen:
                invalid += 1
                continue
            seen.add(token)
            ids[j, slot], lps[j, slot] = token, logprob
        invalid += k - len(entry)
    return ids, lps, invalid


def sampled_rows(logprobs, prompt_len: int, completion_len: int, where: str) -> torch.Tensor:
    """The teacher's log-prob of each completion token [T] from compute_logprobs over the whole sequence."""
    expected = prompt_len + completion_len
    if logprobs is None or len(logprobs) != expected:
        got = "none" if logprobs is None else len(logprobs)
        raise ValueError(f"{where} has log-probs for {got} positions, expected one per token of [teacher prompt | "
                         f"completion] ({expected})")
    values = logprobs[prompt_len:]
    bad = [j for j, v in enumerate(values) if v is None or not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"{where} has no finite log-prob for completion tokens {bad[:5]}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
