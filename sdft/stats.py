"""Confidence intervals for pass@1 and its differences (Wilson score, paired bootstrap), and the exact paired
test of a change in pass@1 on the same items (McNemar).

One tool-use eval item is about 1 point of accuracy, so single-run differences between methods are
usually inside these intervals; report them next to every score. Everything here is numpy only and
deterministic given `seed`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n.

    With z the two-sided normal quantile, p = successes / n:
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``. n = 0 gives (0, 1).
    """
    _check_confidence(confidence)
    if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in (successes, n)):
        raise ValueError(f"wilson_interval: successes and n must be integers, got {successes!r} and {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    successes, n = int(successes), int(n)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_mean_ci(values: Any, confidence: float = 0.95, n_resamples: int = 10000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Percentile-bootstrap interval for the mean; returns (mean, low, high).

    `values`: per-item scores [items], or [seeds, items] for several runs on the same items. The 2-D
    case is resampled hierarchically: seeds with replacement, then items with replacement, the same
    item draw shared by all drawn seeds (every run saw the same items, so item difficulty is a shared
    effect, and drawing items independently per seed would understate it).
    """
    matrix = _as_matrix(values, "values")
    return _bootstrap(matrix, confidence, n_resamples, seed)


def paired_difference_ci(a: Any, b: Any, confidence: float = 0.95, n_resamples: int = 10000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap interval for mean(a) - mean(b); returns (mean difference, low, high).

    `a` and `b` have the same shape ([items] or [seeds, items]) and are aligned: position (s, i) of
    both is item i under seed s. Each resample draws the same seeds and items for both, which is the
    bootstrap of the per-position differences.
    """
    left, right = _aligned(a, b, "paired_difference_ci")
    return _bootstrap(left - right, confidence, n_resamples, seed)


def paired_ratio_ci(a: Any, b: Any, confidence: float = 0.95, n_resamples: int = 10000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap interval for mean(a) / mean(b) (e.g. retention = accuracy after / before);
    returns (ratio, low, high), NaN where mean(b) is 0. Alignment and resampling as `paired_difference_ci`.
    Resamples where mean(b) is 0 are dropped from the interval."""
    left, right = _aligned(a, b, "paired_ratio_ci")
    _check_confidence(confidence)
    if right.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    top, bottom = _resampled_means(left, n_resamples, seed), _resampled_means(right, n_resamples, seed)
    keep = bottom > 0
    if not keep.any():
        return float(left.mean() / right.mean()), float("nan"), float("nan")
    alpha = 1.0 - confidence
    low, high = np.quantile(top[keep] / bottom[keep], [alpha / 2, 1 - alpha / 2])
    return float(left.mean() / right.mean()), float(low), float(high)


def _bootstrap(matrix: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float, float]:
    """matrix: [seeds, items] float64; (mean, low, high) of the percentile bootstrap."""
    _check_confidence(confidence)
    means = _resampled_means(matrix, n_resamples, seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(matrix.mean()), float(low), float(high)


def _resampled_means(matrix: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """[R] bootstrap means of a [seeds, items] matrix. Counts-based resampling: a draw is a multinomial
    count vector; the draws depend only on the shape and `seed`, so two aligned matrices get the same."""
    if not isinstance(n_resamples, Integral) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    n_seeds, n_items = matrix.shape
    rng = np.random.default_rng(seed)
    item_counts = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_resamples)  # [R, items]
    per_seed = item_counts @ matrix.T / n_items                                                # [R, seeds]
    if n_seeds > 1:
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_resamples)
        means = (seed_counts * per_seed).sum(axis=1) / n_seeds                                  # [R]
    else:
        means = per_seed[:, 0]
    return means


def _aligned(a: Any, b: Any, caller: str) -> tuple[np.ndarray, np.ndarray]:
    left, right = _as_matrix(a, "a"), _as_matrix(b, "b")
    if left.shape != right.shape:
        raise ValueError(f"{caller}: a has shape {np.shape(a)} and b has shape {np.shape(b)}; "
                         "they must be equal (the same seeds and items, aligned)")
    return left, right


def _as_matrix(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [items] or [seeds, items] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: all values must be finite, got {int((~np.isfinite(array)).sum())} non-finite")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of before -> after on the same items: `gained` items went 0 -> 1, `lost` 1 -> 0;
    `p_value` is two-sided."""

    n: int
    gained: int
    lost: int
    p_value: float

    def describe(self) -> str:
        """'5 gained, 3 lost of 36 (exact McNemar p = 0.727)'."""
        return f"{self.gained} gained, {self.lost} lost of {self.n} (exact McNemar p = {self.p_value:.3g})"


def mcnemar_exact(before: Sequence[Any], after: Sequence[Any]) -> PairedTest:
    """Exact two-sided McNemar (sign) test on paired 0/1 outcomes of the same items.

    Only discordant items count: with b = gained (0 -> 1) and c = lost (1 -> 0), under the null hypothesis
    (no change) b ~ Binomial(b + c, 1/2), and p = min(1, 2 P(X <= min(b, c))). No discordant item gives p = 1.
    """
    if len(before) != len(after):
        raise ValueError(f"mcnemar_exact: before has {len(before)} items and after has {len(after)}; "
                         "they must be the same items, aligned")
    pairs = []
    for index, (x, y) in enumerate(zip(before, after)):
        if x not in (0, 1) or y not in (0, 1):
            raise ValueError(f"mcnemar_exact: item {index} has outcomes {x!r} -> {y!r}; expected 0/1 or booleans")
        pairs.append((int(x), int(y)))
    gained = sum(1 for x, y in pairs if (x, y) == (0, 1))
    lost = sum(1 for x, y in pairs if (x, y) == (1, 0))
    discordant = gained + lost
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1)) / 2 ** discordant
    return PairedTest(n=len(pairs), gained=gained, lost=lost, p_value=min(1.0, 2 * tail))
