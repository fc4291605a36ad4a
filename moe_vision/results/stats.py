"""Statistics for accuracies on a finite question set: intervals, seed aggregates, paired tests.

Accuracy on ``n`` questions is a binomial proportion (DESIGN.md section 9), so:

* **one run, one category**: the 95% **Wilson score interval** (Wilson, 1927; recommended over
  the Wald interval by Brown, Cai & DasGupta, 2001), computed by
  ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. Fractional scores (VQA-style
  ``min(#matches / 3, 1)``) are not binomial: their interval is a percentile bootstrap over
  questions (``scipy.stats.bootstrap``).
* **several seeds of one cell**: a **crossed two-level bootstrap** (:func:`crossed_bootstrap`).
  Every seed answered the *same* questions, so seeds and questions are two crossed random
  factors; each replicate draws seeds with replacement *and* one set of question indices with
  replacement (shared by every drawn seed), and takes the mean. The interval therefore covers
  both the seed-to-seed spread and the finite question sample. With one seed it reduces to the
  ordinary bootstrap over questions.
* **two models on the same questions**: the difference of accuracies with a **paired
  bootstrap** interval over questions (:func:`paired_bootstrap`) and a p-value from the
  **exact McNemar test** (:func:`mcnemar_exact`: a two-sided binomial test on the discordant
  pairs, ``scipy.stats.binomtest(b, b + c, 0.5)``; McNemar, 1947). Non-binary scores use a
  paired sign-flip permutation test (``scipy.stats.permutation_test``) instead.

Every random draw comes from ``numpy.random.default_rng(seed)``: the same call gives the same
interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
"""Default confidence level of every interval."""
N_BOOT = 2000
"""Default bootstrap replicates."""
OVERALL_CATEGORY = "overall"
"""The pseudo-category of all questions together."""


# ---------------------------------------------------------------------------- one proportion
def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``successes / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return float(ci.low), float(ci.high)


def is_binary(scores: Any) -> bool:
    """True when every score is 0 or 1 (exact-match scoring)."""
    arr = np.asarray(scores, dtype=float)
    return bool(np.all((arr == 0.0) | (arr == 1.0)))


def score_interval(
    scores: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float]:
    """Interval of the mean of per-question ``scores`` in [0, 1].

    Wilson for 0/1 scores; a seeded percentile bootstrap over questions otherwise.
    """
    arr = np.asarray(scores, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    if is_binary(arr):
        return wilson_interval(int(arr.sum()), int(arr.size), confidence)
    if np.all(arr == arr[0]):
        return float(arr[0]), float(arr[0])
    res = stats.bootstrap(
        (arr,),
        np.mean,
        confidence_level=confidence,
        n_resamples=N_BOOT,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def interval_metrics(
    predictions: Iterable[Mapping[str, Any]],
    prefix: str = "accuracy",
    confidence: float = CONFIDENCE,
) -> dict[str, float | int]:
    """Interval columns of a metrics row from per-question predictions.

    Args:
        predictions: dicts with ``category`` and ``score`` (``moe_vision.evaluation``'s output).

    Returns:
        ``{prefix}/<category>/lo``, ``{prefix}/<category>/hi`` and ``n/<category>`` for every
        category and for ``overall``.
    """
    by_cat: dict[str, list[float]] = {}
    for p in predictions:
        by_cat.setdefault(str(p["category"]), []).append(float(p["score"]))
    by_cat[OVERALL_CATEGORY] = [s for cat in list(by_cat) for s in by_cat[cat]]
    out: dict[str, float | int] = {}
    for cat in sorted(by_cat):
        lo, hi = score_interval(by_cat[cat], confidence)
        out[f"{prefix}/{cat}/lo"] = lo
        out[f"{prefix}/{cat}/hi"] = hi
        out[f"n/{cat}"] = len(by_cat[cat])
    return out


# ---------------------------------------------------------------------------- seeds
def crossed_bootstrap(
    scores: np.ndarray,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the mean of ``scores (S seeds, Q questions)`` (see module doc).

    Replicate ``b``: seed weights ``v_b`` (multinomial counts of ``S`` draws over seeds, / S) and
    question weights ``w_b`` (multinomial counts of ``Q`` draws over questions, / Q, the same for
    every seed); the statistic is ``v_b @ scores @ w_b``.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(
            f"crossed_bootstrap: scores must be (seeds, questions), got {scores.shape}"
        )
    s, q = scores.shape
    rng = np.random.default_rng(seed)
    v = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot) / s  # (B, S)
    w = rng.multinomial(q, np.full(q, 1.0 / q), size=n_boot) / q  # (B, Q)
    reps = np.einsum("bs,sq,bq->b", v, scores, w)  # (B,)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass
class SeedSummary:
    """Accuracy of one cell over its seeds.

    Attributes:
        mean: mean over seeds of each seed's accuracy.
        std: sample standard deviation over seeds (``nan`` with one seed).
        n_seeds: number of seeds.
        lo, hi: crossed bootstrap interval over seeds and questions.
        n: questions per seed.
    """

    mean: float
    std: float
    n_seeds: int
    lo: float
    hi: float
    n: int


def summarize_seeds(
    scores: np.ndarray, confidence: float = CONFIDENCE, n_boot: int = N_BOOT, seed: int = 0
) -> SeedSummary:
    """:class:`SeedSummary` of ``scores (S seeds, Q questions)``."""
    scores = np.asarray(scores, dtype=float)
    per_seed = scores.mean(axis=1)
    lo, hi = crossed_bootstrap(scores, confidence, n_boot, seed)
    std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else math.nan
    return SeedSummary(float(per_seed.mean()), std, len(per_seed), lo, hi, scores.shape[1])


# ---------------------------------------------------------------------------- paired
def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), lo, hi)``: percentile interval from resampling question *pairs*.

    ``a`` and ``b`` are per-question scores of two models on the same questions, in the same
    order. Replicate ``k`` draws ``Q`` question indices with replacement and takes the mean
    difference over them.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired_bootstrap: need two equal-length 1-d arrays, got {a.shape} and {b.shape}"
        )
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))  # (B, Q)
    reps = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> tuple[float, int, int]:
    """Exact McNemar test of two models' 0/1 correctness on the same questions.

    Returns ``(p_value, a_only, b_only)``: ``a_only`` questions only ``a`` got right, ``b_only``
    only ``b``; the two-sided p-value is ``binomtest(a_only, a_only + b_only, 0.5)`` (1.0 when
    there are no discordant pairs).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: shapes differ, {a.shape} vs {b.shape}")
    if not (is_binary(a) and is_binary(b)):
        raise ValueError("mcnemar_exact needs 0/1 scores; use paired_p_value for fractional ones")
    a_only = int(((a == 1) & (b == 0)).sum())
    b_only = int(((a == 0) & (b == 1)).sum())
    if a_only + b_only == 0:
        return 1.0, 0, 0
    return float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue), a_only, b_only


def paired_p_value(a: Sequence[float], b: Sequence[float], seed: int = 0) -> float:
    """Two-sided p-value for "same mean score": exact McNemar for 0/1 scores, otherwise a
    sign-flip permutation test of the per-question differences (``scipy.stats``)."""
    if is_binary(a) and is_binary(b):
        return mcnemar_exact(a, b)[0]
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if not np.any(d):
        return 1.0
    res = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        n_resamples=N_BOOT,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(res.pvalue)


# ---------------------------------------------------------------------------- planning
def detectable_difference(
    n: int,
    discordance: float | None = None,
    power: float = 0.8,
    alpha: float = 0.05,
    p: float = 0.5,
) -> float:
    """Smallest accuracy difference a two-sided test at level ``alpha`` detects with ``power``
    on ``n`` questions (normal approximation; the sizing rule behind the default test split).

    Args:
        n: questions per model (per category, for a per-category comparison).
        discordance: for a *paired* comparison (McNemar, same questions), the fraction of
            questions the two models answer differently; ``None``: two independent samples.
        p: accuracy level of the unpaired case (0.5 is the worst case).

    Unpaired: ``d = (z_a + z_b) * sqrt(2 p (1 - p) / n)``. Paired: the root of
    ``(z_a sqrt(pd) + z_b sqrt(pd - d^2)) / d = sqrt(n)`` (Connor, 1987).
    """
    if n < 1:
        raise ValueError(f"detectable_difference: n must be >= 1, got {n}")
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    if discordance is None:
        return float((z_a + z_b) * np.sqrt(2 * p * (1 - p) / n))
    if not 0 < discordance <= 1:
        raise ValueError(f"discordance must be in (0, 1], got {discordance}")
    pd = discordance

    def gap(d: float) -> float:
        return (z_a * np.sqrt(pd) + z_b * np.sqrt(pd - d * d)) / d - np.sqrt(n)

    high = np.sqrt(pd) - 1e-12
    if gap(high) > 0:  # not even the largest possible difference is detectable
        return float(high)
    return float(optimize.brentq(gap, 1e-9, high))
