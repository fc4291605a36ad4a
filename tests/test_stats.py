"""moe_vision.results.stats against independent references: the Wilson closed form, exact
binomial sums for McNemar, brute-force resampling loops for the bootstraps, full enumeration of
sign flips for the permutation test, and a coverage simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moe_vision.results import stats


def _wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (31, 50), (200, 400), (1, 2400)])
def test_wilson_matches_closed_form(k: int, n: int) -> None:
    lo, hi = stats.wilson_interval(k, n)
    ref = _wilson_closed_form(k, n)
    assert lo == pytest.approx(max(ref[0], 0.0), abs=1e-12)
    assert hi == pytest.approx(min(ref[1], 1.0), abs=1e-12)


def test_wilson_bad_input_and_empty() -> None:
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= successes <= n, got 5 of 3"):
        stats.wilson_interval(5, 3)


def test_wilson_coverage_is_near_nominal() -> None:
    rng = np.random.default_rng(1)
    n, p = 400, 0.3
    hits = 0
    for k in rng.binomial(n, p, size=400):
        lo, hi = stats.wilson_interval(int(k), n)
        hits += lo <= p <= hi
    assert 0.92 <= hits / 400 <= 0.98


def test_interval_metrics_per_category_and_overall() -> None:
    preds = [{"category": "a", "score": s} for s in (1, 1, 0, 1)]
    preds += [{"category": "b", "score": s} for s in (0, 0, 1)]
    m = stats.interval_metrics(preds)
    assert m["n/a"] == 4 and m["n/b"] == 3 and m["n/overall"] == 7
    assert (m["accuracy/a/lo"], m["accuracy/a/hi"]) == stats.wilson_interval(3, 4)
    assert (m["accuracy/overall/lo"], m["accuracy/overall/hi"]) == stats.wilson_interval(4, 7)
    # fractional (VQA-style) scores: a bootstrap interval around the mean, inside [0, 1]
    frac = stats.score_interval([1 / 3, 2 / 3, 1.0, 0.0] * 10)
    assert 0.0 <= frac[0] < 0.5 < frac[1] <= 1.0


def test_crossed_bootstrap_matches_resampling_loop() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.random((3, 120)) < np.array([[0.4], [0.5], [0.6]])).astype(float)
    lo, hi = stats.crossed_bootstrap(scores, n_boot=4000, seed=1)
    # reference: explicit resampling of seeds, then of question indices shared by the seeds
    ref_rng = np.random.default_rng(2)
    reps = []
    for _ in range(4000):
        seeds = ref_rng.integers(0, 3, size=3)
        questions = ref_rng.integers(0, 120, size=120)
        reps.append(scores[seeds][:, questions].mean())
    ref_lo, ref_hi = np.quantile(reps, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=0.015) and hi == pytest.approx(ref_hi, abs=0.015)
    # seeds add spread: wider than the question-only interval of the pooled answers
    one = stats.crossed_bootstrap(scores.mean(0, keepdims=True), n_boot=4000, seed=1)
    assert hi - lo > one[1] - one[0]
    with pytest.raises(ValueError, match="seeds, questions"):
        stats.crossed_bootstrap(np.zeros(5))


def test_summarize_seeds() -> None:
    scores = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=float)
    s = stats.summarize_seeds(scores)
    assert s.mean == pytest.approx(0.625) and s.n_seeds == 2 and s.n == 4
    assert s.std == pytest.approx(np.std([0.75, 0.5], ddof=1))
    assert s.lo <= s.mean <= s.hi


def test_paired_bootstrap_matches_loop_with_same_draws() -> None:
    rng = np.random.default_rng(3)
    a = (rng.random(80) < 0.6).astype(float)
    b = (rng.random(80) < 0.4).astype(float)
    diff, lo, hi = stats.paired_bootstrap(a, b, n_boot=500, seed=7)
    assert diff == pytest.approx(a.mean() - b.mean())
    ref_rng = np.random.default_rng(7)
    idx = ref_rng.integers(0, 80, size=(500, 80))
    reps = [a[i].mean() - b[i].mean() for i in idx]  # loop over replicates
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_bootstrap(a, b[:10])


def _exact_two_sided(k: int, n: int) -> float:
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_matches_exact_binomial_sum() -> None:
    a = np.array([1] * 30 + [0] * 12 + [1] * 20 + [0] * 38, dtype=float)
    b = np.array([1] * 30 + [1] * 12 + [0] * 20 + [0] * 38, dtype=float)
    p, a_only, b_only = stats.mcnemar_exact(a, b)
    assert (a_only, b_only) == (20, 12)
    assert p == pytest.approx(_exact_two_sided(12, 32), rel=1e-9)
    assert stats.mcnemar_exact(a, a) == (1.0, 0, 0)
    with pytest.raises(ValueError, match="0/1 scores"):
        stats.mcnemar_exact(a * 0.5, b)


def test_permutation_p_value_matches_full_enumeration() -> None:
    a = np.array([1, 2 / 3, 1, 1 / 3, 1, 0, 2 / 3, 1, 1, 1 / 3])
    b = np.array([2 / 3, 2 / 3, 0, 1 / 3, 1 / 3, 0, 1, 1 / 3, 2 / 3, 0])
    d = a - b
    observed = d.mean()
    means = [np.mean(d * s) for s in itertools.product([1, -1], repeat=len(d))]
    less = np.mean([m <= observed + 1e-12 for m in means])
    greater = np.mean([m >= observed - 1e-12 for m in means])
    assert stats.paired_p_value(a, b) == pytest.approx(min(1.0, 2 * min(less, greater)))


def test_detectable_difference_has_the_promised_power() -> None:
    # unpaired, worst case p = 0.5: the textbook sample size n = (z_a + z_b)^2 * 2pq / d^2
    d = stats.detectable_difference(400)
    assert d == pytest.approx((1.959964 + 0.841621) * math.sqrt(0.5 / 400), rel=1e-5)
    # paired: simulate exact McNemar tests at the detectable difference: about 80% power
    pd = 0.3
    d = stats.detectable_difference(400, discordance=pd)
    assert d < stats.detectable_difference(400)  # pairing helps
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        b, c, _ = rng.multinomial(400, [(pd - d) / 2, (pd + d) / 2, 1 - pd])
        a = np.r_[np.ones(b), np.zeros(c)]
        hits += stats.mcnemar_exact(a, 1 - a)[0] < 0.05
    assert 0.7 <= hits / 400 <= 0.9
    with pytest.raises(ValueError, match="discordance"):
        stats.detectable_difference(10, discordance=0)
