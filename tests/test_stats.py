"""moe_vision.results.stats against independent references: the Wilson closed form, exact
binomial sums for McNemar, brute-force resampling loops for the bootstraps, full enumeration of
sign flips for the permutation test, statsmodels-free references for the corrections, and
coverage simulations (seed-level intervals against the crossed bootstrap)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moe_vision.results import seeds, stats


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
    p, test = stats.paired_test(a, b)
    assert p == pytest.approx(min(1.0, 2 * min(less, greater)), abs=1e-12)  # exact, no floor
    assert test == stats.TEST_SIGN_FLIP_EXACT


def test_paired_test_names_its_test_and_is_exact_for_seed_averages() -> None:
    a = np.array([1, 0, 1, 1, 0, 1], dtype=float)
    b = np.array([0, 0, 1, 0, 0, 1], dtype=float)
    assert stats.paired_test(a, b) == (stats.mcnemar_exact(a, b)[0], stats.TEST_MCNEMAR)
    # seed-averaged answers of two seeds: differences on the 1/2 lattice, 14 questions
    rng = np.random.default_rng(4)
    a2, b2 = rng.integers(0, 3, 14) / 2, rng.integers(0, 3, 14) / 2
    d = a2 - b2
    sums = [np.sum(d * s) for s in itertools.product([1, -1], repeat=14)]
    ref = np.mean(np.abs(sums) >= abs(d.sum()) - 1e-12)
    assert stats.sign_flip_exact(d) == pytest.approx(ref, abs=1e-12)
    assert stats.paired_test(a2, b2) == (pytest.approx(ref, abs=1e-12), stats.TEST_SIGN_FLIP_EXACT)
    # irrational differences: no lattice, the Monte Carlo test (named as such)
    assert stats.sign_flip_exact(d * np.pi / 7) is None
    assert stats.paired_test(a2 * np.pi / 7, b2)[1] == stats.TEST_SIGN_FLIP_MC


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


def _seed_dominated(mu: float, cluster_effects: np.ndarray, codes: np.ndarray, rng) -> np.ndarray:
    """0/1 scores ``(N, 3 seeds, Q)`` with success probability ``mu + seed effect + question
    cluster effect``: the seed effect (sd 0.15) dwarfs the clusters' (``cluster_effects (N,
    C)``, shared by the settings of one simulation); the truth is ``mu``."""
    n_sim, q = cluster_effects.shape[0], codes.size
    alpha = rng.normal(0, 0.15, (n_sim, 3, 1))
    p = np.clip(mu + alpha + cluster_effects[:, None, codes], 0, 1)
    return (rng.random((n_sim, 3, q)) < p).astype(float)


def test_seed_level_intervals_cover_the_truth_where_the_crossed_bootstrap_does_not() -> None:
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(40), 5)  # 200 questions in 40 answer clusters
    n_sim = 800
    gamma = rng.normal(0, 0.03, (n_sim, 40))
    a, b = _seed_dominated(0.6, gamma, codes, rng), _seed_dominated(0.5, gamma, codes, rng)
    mean_hits = diff_hits = 0
    for i in range(n_sim):
        r = seeds.seed_interval(a[i], codes, n_boot=100, seed=i)
        mean_hits += r.lo <= 0.6 <= r.hi
        d = seeds.seed_difference(a[i], b[i], codes, [0, 1, 2], [0, 1, 2], n_boot=100, seed=i)
        diff_hits += d.lo <= 0.1 <= d.hi
    assert mean_hits / n_sim >= 0.93 and diff_hits / n_sim >= 0.93
    crossed_hits = 0
    for i in range(300):
        lo, hi = stats.crossed_bootstrap(a[i], n_boot=100, seed=i)
        crossed_hits += lo <= 0.6 <= hi
    assert crossed_hits / 300 < 0.9  # the old interval is about the seeds' min-max


def test_seed_difference_pairs_within_seed_and_matches_hand_computation() -> None:
    rng = np.random.default_rng(2)
    a = (rng.random((3, 60)) < 0.7).astype(float)
    b = (rng.random((3, 60)) < 0.5).astype(float)
    paired = seeds.seed_difference(a, b[::-1], None, [0, 1, 2], [2, 1, 0], n_boot=4000)
    d = (a - b).mean(1)  # per-seed differences, seeds matched by name
    assert paired.paired and paired.estimate == pytest.approx(d.mean())
    assert paired.se >= d.std(ddof=1) / math.sqrt(3) - 1e-12  # seed part at least
    unpaired = seeds.seed_difference(a, b, None, n_boot=4000)
    assert not unpaired.paired and unpaired.estimate == pytest.approx(paired.estimate)
    assert paired.lo < paired.estimate < paired.hi and 0 <= paired.p_value <= 1
    same = seeds.seed_difference(a, a, None, [0, 1, 2], [0, 1, 2])
    assert (same.estimate, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="complete"):
        seeds.seed_difference(a[:, :0], b)


def test_welch_and_seeds_needed_against_references() -> None:
    from scipy import stats as sps

    ma, mb = [0.30, 0.28, 0.35], [0.10, 0.20, 0.09]
    assert seeds.welch_seeds(ma, mb) == pytest.approx(sps.ttest_ind(ma, mb, equal_var=False).pvalue)
    assert math.isnan(seeds.welch_seeds([0.3], mb))
    # G*Power's sample sizes for 80% power at 5%, two-sided: paired dz = 1 -> 10, dz = 0.5
    # -> 34; two independent groups d = 1 -> 17 per group
    assert seeds.seeds_needed(1.0, 1.0) == 10 and seeds.seeds_needed(0.05, 0.1) == 34
    assert seeds.seeds_needed(1.0, 1.0, paired=False) == 17
    # simulated power at the returned n reaches the target
    rng = np.random.default_rng(0)
    n = int(seeds.seeds_needed(0.1, 0.08, power=0.8))
    x = rng.normal(0.1, 0.08, (4000, n))
    assert np.mean(sps.ttest_1samp(x, 0, axis=1).pvalue < 0.05) >= 0.78
    assert math.isnan(seeds.seeds_needed(0.1, math.nan))


def test_adjust_p_holm_and_bh() -> None:
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    holm = stats.adjust_p(p, "holm")
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, running max
    assert holm[[4, 0, 2, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert math.isnan(holm[3])
    bh = stats.adjust_p(p, "bh")
    assert bh[[4, 0, 2, 1]] == pytest.approx([0.02, 0.02, 0.04, 0.04])
    with pytest.raises(ValueError, match="unknown correction 'bonf'"):
        stats.adjust_p(p, "bonf")
