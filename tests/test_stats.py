import numpy as np
import pytest

from sdft.stats import bootstrap_mean_ci, mcnemar_exact, paired_difference_ci, wilson_interval


@pytest.mark.parametrize("successes,n,expected", [
    # Published 95% Wilson intervals (Newcombe 1998, Statistics in Medicine 17:857, Table II).
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
    # Textbook values.
    (0, 10, (0.0, 0.2775)),
    (5, 10, (0.2366, 0.7634)),
])
def test_wilson_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=5e-5)
    assert high == pytest.approx(expected[1], abs=5e-5)


def test_wilson_other_confidence_is_symmetric_and_wider():
    low95, high95 = wilson_interval(5, 10)
    low99, high99 = wilson_interval(5, 10, confidence=0.99)
    assert low99 < low95 and high99 > high95
    assert low99 + high99 == pytest.approx(1.0)
    assert (low99, high99) == pytest.approx((0.1842255, 0.8157745), abs=1e-6)


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(3, 7)
    assert 0 < low < 3 / 7 < high < 1
    for bad in [(-1, 5), (6, 5), (1.5, 5)]:
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


def test_bootstrap_is_deterministic_given_seed():
    values = np.random.default_rng(1).integers(0, 2, size=97)
    first = bootstrap_mean_ci(values, n_resamples=2000, seed=3)
    assert first == bootstrap_mean_ci(values, n_resamples=2000, seed=3)
    assert first != bootstrap_mean_ci(values, n_resamples=2000, seed=4)
    assert first[0] == pytest.approx(values.mean())
    assert first[1] < first[0] < first[2]


def test_bootstrap_one_dim_matches_normal_approximation():
    values = np.array([1] * 60 + [0] * 40)
    mean, low, high = bootstrap_mean_ci(values, n_resamples=20000, seed=0)
    half = 1.96 * np.sqrt(0.6 * 0.4 / 100)
    assert mean == pytest.approx(0.6)
    assert low == pytest.approx(0.6 - half, abs=0.015)
    assert high == pytest.approx(0.6 + half, abs=0.015)


def test_bootstrap_constant_values_give_a_point():
    assert bootstrap_mean_ci([1.0] * 20, n_resamples=100) == (1.0, 1.0, 1.0)
    assert bootstrap_mean_ci([[0.5] * 5] * 3, n_resamples=100) == (0.5, 0.5, 0.5)


def test_bootstrap_coverage_sanity():
    """Across simulated Bernoulli(0.3) data sets of 80 items, the 90% interval covers 0.3 about 90%."""
    rng = np.random.default_rng(7)
    covered = 0
    trials = 200
    for trial in range(trials):
        values = rng.random(80) < 0.3
        _, low, high = bootstrap_mean_ci(values, confidence=0.9, n_resamples=1000, seed=trial)
        covered += low <= 0.3 <= high
    assert 0.82 <= covered / trials <= 0.96


def test_hierarchical_bootstrap_includes_seed_variance():
    rng = np.random.default_rng(0)
    items = rng.random(50)
    seed_offsets = np.array([-0.2, 0.0, 0.2, 0.1, -0.1])
    matrix = np.clip(items[None, :] + seed_offsets[:, None], 0, 1)
    _, low_2d, high_2d = bootstrap_mean_ci(matrix, n_resamples=4000, seed=0)
    _, low_1d, high_1d = bootstrap_mean_ci(matrix.mean(axis=0), n_resamples=4000, seed=0)
    assert (high_2d - low_2d) > 1.3 * (high_1d - low_1d)
    # One seed row reduces to the 1-D case exactly.
    one_row = bootstrap_mean_ci(items[None, :], n_resamples=500, seed=2)
    assert one_row == bootstrap_mean_ci(items, n_resamples=500, seed=2)


def test_paired_difference_is_tighter_than_unpaired_widths():
    rng = np.random.default_rng(0)
    difficulty = rng.random(200)
    a = (difficulty < 0.7).astype(float)
    b = a.copy()
    flip = rng.choice(200, size=10, replace=False)
    b[flip] = 1 - b[flip]
    mean, low, high = paired_difference_ci(a, b, n_resamples=4000, seed=0)
    assert mean == pytest.approx(a.mean() - b.mean())
    assert low <= mean <= high
    _, low_a, high_a = bootstrap_mean_ci(a, n_resamples=4000, seed=0)
    assert (high - low) < 0.5 * (high_a - low_a)
    assert paired_difference_ci(a, a, n_resamples=100) == (0.0, 0.0, 0.0)


def test_paired_difference_two_dim_and_errors():
    a = np.ones((3, 10))
    b = np.zeros((3, 10))
    assert paired_difference_ci(a, b, n_resamples=100) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        paired_difference_ci(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean_ci([1.0], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1.0], confidence=0)


def _two_sided_by_enumeration(gained: int, lost: int) -> float:
    """Independent reference: the probability, under Binomial(b + c, 1/2), of every outcome whose probability
    is at most that of the observed one (the two-sided exact test by definition), in exact fractions."""
    from fractions import Fraction
    from math import comb

    n = gained + lost
    probability = [Fraction(comb(n, k), 2 ** n) for k in range(n + 1)]
    return float(sum(p for p in probability if p <= probability[gained]))


@pytest.mark.parametrize("gained, lost", [(5, 3), (8, 0), (10, 2), (0, 0), (3, 3), (1, 12), (20, 11)])
def test_mcnemar_exact_equals_the_enumerated_two_sided_binomial_test(gained, lost):
    ties = [(1, 1)] * 4 + [(0, 0)] * 6
    pairs = [(0, 1)] * gained + [(1, 0)] * lost + ties
    result = mcnemar_exact([x for x, _ in pairs], [y for _, y in pairs])
    assert (result.n, result.gained, result.lost) == (len(pairs), gained, lost)
    assert result.p_value == pytest.approx(_two_sided_by_enumeration(gained, lost), abs=1e-12)


def test_mcnemar_known_values_and_errors():
    assert mcnemar_exact([0] * 8, [1] * 8).p_value == pytest.approx(2 / 256)       # 8 gained, none lost
    assert mcnemar_exact([0] * 5 + [1] * 3, [1] * 5 + [0] * 3).p_value == pytest.approx(186 / 256)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0             # no discordant item
    assert mcnemar_exact([0] * 8, [1] * 8).describe() == "8 gained, 0 lost of 8 (exact McNemar p = 0.00781)"
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([0, 1], [1])
    with pytest.raises(ValueError, match="item 1 has outcomes 2 -> 1"):
        mcnemar_exact([0, 2], [1, 1])
