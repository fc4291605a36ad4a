"""Seed-level inference: accuracy and differences whose uncertainty counts seeds *and* questions.

A sweep cell is trained with ``S`` seeds, and every seed answers the same ``Q`` questions, so a
per-question score is ``y[s, q] = mu + seed effect + question effect + noise`` with seeds and
questions crossed. The mean over seeds ``ybar`` then varies with the seeds drawn *and* with the
questions drawn, and with 3 seeds the seed part usually dominates. Resampling 3 seeds cannot
show that (a percentile bootstrap over 3 values is about their min-max: the crossed bootstrap
of :mod:`moe_vision.results.stats` covers the truth about 3 times in 4 then), so the variance is
built in two stages, a **hierarchical** (seeds, then questions) estimate:

1. **seeds**: the sample variance of the seed means over ``S`` (``S - 1`` degrees of freedom);
   for a difference of two settings trained with the same seeds, of the per-seed differences
   (paired within seed), otherwise Welch's sum of the two;
2. **questions**: a **cluster bootstrap** of the mean over questions of the seed-averaged score
   (or difference), resampling clusters of questions (by default the question's reference
   answer: OCR questions about the same word are not independent) with replacement and the
   same draw for both settings (paired on the same questions), ``C - 1`` degrees of freedom;
   minus the within-cell noise already counted in stage 1 (the two-way residual mean square
   over ``S Q``; Cornfield & Tukey's crossed-effects decomposition).

The interval is ``estimate +- t(df) * se`` with Satterthwaite's ``df``, and the p-value the
two-sided t test of the same statistic (:data:`TEST_HIERARCHICAL`). :func:`welch_seeds` is a
cross-check that ignores the questions; :func:`seeds_needed` plans seeds from the observed seed
spread. Coverage is checked in ``tests/test_stats.py`` (seed-dominated simulation: >= 93%).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from moe_vision.results.stats import CONFIDENCE, N_BOOT

TEST_HIERARCHICAL = "hierarchical t (seeds, answer-clustered questions), two-sided"
TEST_WELCH = "Welch t over seed means, two-sided"


@dataclass(frozen=True)
class SeedEstimate:
    """A seed-level mean or difference.

    Attributes:
        estimate: mean over seeds of the per-seed accuracy (or difference of two such means).
        lo, hi: its interval at the requested confidence.
        se: standard error (seed and question parts together).
        df: Satterthwaite degrees of freedom of the t reference (``inf`` when ``se == 0``).
        p_value: two-sided p of ``estimate == 0`` (NaN for a single setting's accuracy).
        n_seeds: seeds on each side (``(S,)`` or ``(S_a, S_b)``).
        paired: a difference paired within seed.
    """

    estimate: float
    lo: float
    hi: float
    se: float
    df: float
    p_value: float
    n_seeds: tuple[int, ...]
    paired: bool = False


def cluster_codes(keys: Sequence[Any] | np.ndarray | None, q: int) -> np.ndarray:
    """Integer cluster codes ``(Q,)`` of the questions' ``keys`` (``None``: one cluster per
    question; empty keys, e.g. answers a cell did not record, are their own clusters)."""
    if keys is None:
        return np.arange(q)
    if np.shape(keys) != (q,):
        raise ValueError(f"cluster keys: need one per question ({q}), got {np.shape(keys)}")
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        return pd.factorize(keys)[0]
    keys = np.array(
        [f"\0{i}" if k is None or k == "" or k != k else str(k) for i, k in enumerate(keys)],
        dtype=object,
    )
    return pd.factorize(keys)[0]


def _matrix(scores: Any, name: str) -> np.ndarray:
    x = np.asarray(scores, dtype=float)
    if x.ndim != 2 or 0 in x.shape or np.isnan(x).any():
        raise ValueError(f"{name}: expected a complete (seeds, questions) matrix, got {x.shape}")
    return x


def _noise(x: np.ndarray) -> float:
    """Within-cell noise of ``x (S, Q)`` already counted by the seed stage: the two-way
    residual mean square over ``S Q`` (0 with one seed)."""
    s, q = x.shape
    if s < 2 or q < 2:
        return 0.0
    r = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    return float((r**2).sum() / ((s - 1) * (q - 1)) / (s * q))


@functools.lru_cache(maxsize=4)
def _cluster_draws(c: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap counts ``(B, C)``: row ``b`` counts how often each of ``C`` clusters is drawn
    in ``C`` draws with replacement (shared by the categories of one size, read-only)."""
    w = np.random.default_rng(seed).multinomial(c, np.full(c, 1.0 / c), size=n_boot)
    w = w.astype(np.float64)
    w.flags.writeable = False
    return w


def _question_variance(ybar: np.ndarray, codes: np.ndarray, n_boot: int, seed: int) -> float:
    """Cluster-bootstrap variance of the mean of ``ybar (Q,)``: each replicate draws ``C``
    clusters with replacement and takes the mean over their questions."""
    c = int(codes.max()) + 1
    if c < 2:
        return 0.0
    totals = np.bincount(codes, weights=ybar, minlength=c)  # (C,)
    sizes = np.bincount(codes, minlength=c).astype(float)  # (C,)
    w = _cluster_draws(c, n_boot, seed)  # (B, C)
    reps = (w @ totals) / (w @ sizes)  # (B,)
    return float(reps.var(ddof=1))


def _estimate(
    estimate: float,
    seed_parts: list[tuple[float, int]],
    ybar: np.ndarray,
    noise: float,
    codes: np.ndarray,
    confidence: float,
    n_boot: int,
    seed: int,
    n_seeds: tuple[int, ...],
    paired: bool,
    test: bool,
) -> SeedEstimate:
    """The estimate with its interval, clipped to what the quantity can be (an accuracy in
    [0, 1], a difference in [-1, 1]; clipping keeps the coverage)."""
    v_q = max(_question_variance(ybar, codes, n_boot, seed) - noise, 0.0)
    parts = [*seed_parts, (v_q, int(codes.max()))]  # (variance, degrees of freedom)
    var = sum(v for v, _ in parts)
    if var <= 0:
        p = (1.0 if estimate == 0 else 0.0) if test else math.nan
        return SeedEstimate(estimate, estimate, estimate, 0.0, math.inf, p, n_seeds, paired)
    df = var**2 / sum(v**2 / d for v, d in parts if d > 0 and v > 0)
    se = math.sqrt(var)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * stats.t.sf(abs(estimate) / se, df)) if test else math.nan
    low = -1.0 if test else 0.0
    lo, hi = max(estimate - half, low), min(estimate + half, 1.0)
    return SeedEstimate(estimate, lo, hi, se, df, p, n_seeds, paired)


def seed_interval(
    scores: Any,
    clusters: Sequence[Any] | np.ndarray | None = None,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> SeedEstimate:
    """Seed-level interval of one setting's accuracy from ``scores (S seeds, Q questions)``
    (see the module docstring); ``clusters``: a cluster key per question (``None``: each
    question its own cluster)."""
    x = _matrix(scores, "seed_interval")
    s, q = x.shape
    means = x.mean(1)
    seed_parts = [(float(means.var(ddof=1)) / s, s - 1)] if s > 1 else []
    codes = cluster_codes(clusters, q)
    return _estimate(
        float(means.mean()), seed_parts, x.mean(0), _noise(x), codes,
        confidence, n_boot, seed, (s,), False, test=False,
    )  # fmt: skip


def seed_difference(
    a: Any,
    b: Any,
    clusters: Sequence[Any] | np.ndarray | None = None,
    seeds_a: Sequence[Any] | None = None,
    seeds_b: Sequence[Any] | None = None,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> SeedEstimate:
    """Seed-level difference ``mean(a) - mean(b)`` of two settings on the same questions.

    Args:
        a, b: scores ``(S_a, Q)`` and ``(S_b, Q)``, questions in the same order.
        clusters: a cluster key per question (module docstring).
        seeds_a, seeds_b: the seed of each row; when both are given and name the same seeds
            (at least 2), the difference is paired within seed, else the seed parts are
            Welch's.
    """
    x, y = _matrix(a, "seed_difference (a)"), _matrix(b, "seed_difference (b)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"seed_difference: {x.shape[1]} vs {y.shape[1]} questions")
    codes = cluster_codes(clusters, x.shape[1])
    n_seeds = (x.shape[0], y.shape[0])
    common = seeds_a is not None and seeds_b is not None and len(set(seeds_a)) == len(seeds_a)
    if common and sorted(map(str, seeds_a)) == sorted(map(str, seeds_b)) and len(seeds_a) > 1:
        order = {str(s): i for i, s in enumerate(seeds_b)}
        d = x - y[[order[str(s)] for s in seeds_a]]  # (S, Q) paired within seed
        means = d.mean(1)
        seed_parts = [(float(means.var(ddof=1)) / len(means), len(means) - 1)]
        return _estimate(
            float(means.mean()), seed_parts, d.mean(0), _noise(d), codes,
            confidence, n_boot, seed, n_seeds, True, test=True,
        )  # fmt: skip
    seed_parts = [
        (float(m.var(ddof=1)) / len(m), len(m) - 1) for m in (x.mean(1), y.mean(1)) if len(m) > 1
    ]
    return _estimate(
        float(x.mean(1).mean() - y.mean(1).mean()), seed_parts, x.mean(0) - y.mean(0),
        _noise(x) + _noise(y), codes, confidence, n_boot, seed, n_seeds, False, test=True,
    )  # fmt: skip


def welch_seeds(a_means: Sequence[float], b_means: Sequence[float]) -> float:
    """:data:`TEST_WELCH` p-value over the per-seed accuracies of two settings
    (``scipy.stats.ttest_ind(equal_var=False)``); NaN with fewer than 2 seeds a side or no
    spread at all."""
    a, b = np.asarray(a_means, dtype=float), np.asarray(b_means, dtype=float)
    if len(a) < 2 or len(b) < 2 or (a.var() == 0 and b.var() == 0):
        return math.nan
    with warnings.catch_warnings():  # two identical runs: scipy's precision-loss note, not news
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def seeds_needed(
    effect: float,
    seed_sd: float,
    power: float = 0.8,
    alpha: float = 0.05,
    paired: bool = True,
    max_seeds: int = 1000,
) -> float:
    """Smallest number of seeds (per setting) at which a two-sided t test at level ``alpha``
    detects a true difference ``effect`` with probability ``power``, given the seed standard
    deviation ``seed_sd`` (of the per-seed differences when ``paired``, else of one setting's
    per-seed accuracy, both settings alike). Power from the noncentral t
    (``scipy.stats.nct``): paired ``df = n - 1``, ``ncp = effect sqrt(n) / sd``; unpaired
    ``df = 2n - 2``, ``ncp = effect sqrt(n / 2) / sd``. NaN when ``seed_sd`` is NaN;
    ``inf`` past ``max_seeds``."""
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"seeds_needed: power and alpha must be in (0, 1), got {power}, {alpha}")
    if seed_sd != seed_sd or effect != effect:
        return math.nan
    if effect == 0:
        return math.inf
    if seed_sd == 0:
        return 2.0
    for start, stop in ((2, 64), (65, max_seeds)):  # most answers are small: look there first
        n = np.arange(start, stop + 1)
        df = n - 1 if paired else 2 * n - 2
        ncp = abs(effect) / seed_sd * (np.sqrt(n) if paired else np.sqrt(n / 2))
        crit = stats.t.ppf(1 - alpha / 2, df)
        achieved = stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp)
        hit = np.flatnonzero(achieved >= power)
        if hit.size:
            return float(n[hit[0]])
    return math.inf
