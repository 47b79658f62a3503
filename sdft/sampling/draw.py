"""Drawing tokens: counter-based noise and one batched inverse-CDF draw per decoding step.

The noise of prompt b at token t is a pure function of (seeds[b], t): `counter_uniforms` hashes the pair
with the SplitMix64 generator (state mix64(seed) advanced t + 1 times, output mix64(state)), so a prompt's
completion does not depend on which other prompts share its batch, on the order of the batch or on how a
batch is split over processes, and all rows are drawn in one tensor operation. (Written here because torch
offers no counter-based generator keyed per row: a torch.Generator is one sequential stream, and one per
prompt means one draw call per row.)

`draw_tokens` turns one uniform u per row into a token by inverting the cumulative distribution of
softmax(z / T) restricted to the top-p nucleus: token = the first index i with cdf(i) > u * cdf(V - 1),
where cdf is the running sum of the (unnormalized) probabilities in float64. The token is drawn with
probability exactly p_i (up to the float rounding of each p_i); tokens outside the nucleus, or whose
probability underflows to zero, have an empty interval and are never drawn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["counter_uniforms", "draw_tokens", "greedy_tokens", "draw_seeds"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (the golden ratio in 64 bits)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SEED_HIGH = 2**63 - 1  # seeds are non-negative 63-bit integers


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64, every input bit affects every output bit)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seeds: Sequence[int], steps: int, *, device=None) -> torch.Tensor:
    """[len(seeds), steps] float64 uniforms in [0, 1): u[b, t] = top 53 bits of mix64(mix64(seed_b) + (t + 1) G)
    / 2^53, G the SplitMix64 increment. A pure function of (seeds[b], t)."""
    keys = np.array([int(s) & (2**64 - 1) for s in seeds], dtype=np.uint64)
    counters = np.arange(1, steps + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64 by design
        bits = _mix64(_mix64(keys)[:, None] + counters[None, :] * _GAMMA)
    uniforms = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy(uniforms).to(device)


def draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """`count` stream seeds drawn from `generator` (for calls without per-prompt seeds)."""
    return torch.randint(0, _SEED_HIGH, (count,), generator=generator, device=generator.device).tolist()


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T in float32 (float64 logits stay float64)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return z / temperature if temperature != 1.0 else z


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, V] bool over probabilities sorted in descending order: the smallest prefix whose mass reaches
    top_p (a token is kept while the mass before it is below top_p; the first is always kept)."""
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep = mass_before < top_p
    keep[:, 0] = True
    return keep


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits [B, V] from softmax(z / T) within the top-p nucleus, by inverse CDF with
    uniforms [B] in [0, 1): the first token, in vocabulary order, whose running probability sum exceeds
    u * (the sum over the nucleus); and its log-prob under that distribution. Returns (tokens [B] int64,
    log-probs [B] float32, float64 for float64 logits). One batched pass, no per-row loop."""
    scaled = _scaled(logits, temperature)
    if top_p < 1.0:
        sorted_scaled, order = scaled.sort(-1, descending=True)
        keep_sorted = _nucleus(sorted_scaled.softmax(-1), top_p)
        outside = torch.zeros_like(keep_sorted).scatter_(-1, order, ~keep_sorted)
        scaled = scaled.masked_fill(outside, float("-inf"))
    top = scaled.max(-1, keepdim=True).values
    weights = (scaled - top).exp()                                 # [B, V] unnormalized probabilities, max 1
    cdf = weights.cumsum(-1, dtype=torch.float64)                  # [B, V]
    total = cdf[:, -1:]
    # u * total < total always: the last interval ends at total, and a zero-width interval is never hit
    target = torch.minimum(uniforms[:, None].to(torch.float64) * total, total.nextafter(torch.zeros_like(total)))
    token = torch.searchsorted(cdf, target, right=True)           # [B, 1] first i with cdf[i] > target
    token_lp = ((scaled.gather(-1, token) - top).double() - total.log()).to(scaled.dtype)
    return token[:, 0], token_lp[:, 0]


def greedy_tokens(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax of each row of logits [B, V] and its log-softmax(z): (tokens [B], log-probs [B])."""
    z = _scaled(logits, 1.0)
    token = z.argmax(-1, keepdim=True)
    return token[:, 0], (z.gather(-1, token) - z.logsumexp(-1, keepdim=True))[:, 0]
