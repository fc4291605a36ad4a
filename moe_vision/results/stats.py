"""Statistics for accuracies on a finite question set: intervals, seed aggregates, paired tests.

Accuracy on ``n`` questions is a binomial proportion (DESIGN.md section 9), so:

* **one run, one category**: the 95% **Wilson score interval** (Wilson, 1927; recommended over
  the Wald interval by Brown, Cai & DasGupta, 2001), computed by
  ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. Fractional scores (VQA-style
  ``min(#matches / 3, 1)``) are not binomial: their interval is a percentile bootstrap over
  questions (``scipy.stats.bootstrap``).
* **several seeds of one cell**: seed-level inference lives in :mod:`moe_vision.results.seeds`
  (a t interval over seeds with an answer-clustered bootstrap for the questions). The older
  **crossed two-level bootstrap** (:func:`crossed_bootstrap`: each replicate draws seeds with
  replacement and one shared set of question indices) is kept for comparison only: with 3
  seeds its percentile interval is about the seeds' min-max and covers the truth about 3 times
  in 4 when seeds dominate (``tests/test_stats.py``).
* **two models on the same questions**: the difference of accuracies with a **paired
  bootstrap** interval over questions (:func:`paired_bootstrap`) and a p-value from the
  **exact McNemar test** (:func:`mcnemar_exact`: a two-sided binomial test on the discordant
  pairs, ``scipy.stats.binomtest(b, b + c, 0.5)``; McNemar, 1947). Seed-averaged or VQA
  scores use the **exact sign-flip permutation test** (:func:`sign_flip_exact`: the null
  distribution enumerated by convolution), and a Monte Carlo sign-flip test only when the
  differences lie on no small lattice; :func:`paired_test` returns the p-value with its test's
  name.
* **many tests in one table**: :func:`adjust_p` (Holm or Benjamini-Hochberg, by name).

Every random draw comes from ``numpy.random.default_rng(seed)``: the same call gives the same
interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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


TEST_MCNEMAR = "exact McNemar"
TEST_SIGN_FLIP_EXACT = "exact sign-flip permutation"
TEST_SIGN_FLIP_MC = "sign-flip permutation (Monte Carlo)"
LATTICE_MAX = 120
"""Largest denominator of per-question differences the exact sign-flip test enumerates
(seed-averaged 0/1 answers of S seeds are multiples of 1/S; VQA scores of 1/3 of that)."""


def _lattice(d: np.ndarray) -> int | None:
    """Smallest ``L <= LATTICE_MAX`` with every ``d * L`` an integer, or ``None``."""
    for scale in range(1, LATTICE_MAX + 1):
        if np.allclose(d * scale, np.round(d * scale), atol=1e-9, rtol=0):
            return scale
    return None


def sign_flip_exact(d: Sequence[float]) -> float | None:
    """Exact two-sided p-value of the paired sign-flip test of mean(d) == 0, or ``None`` when
    the differences ``d (Q,)`` lie on no lattice of step ``1/L``, ``L <= LATTICE_MAX``.

    Under the null each ``d_i`` keeps or flips its sign with probability 1/2; with ``k_i =
    |d_i| L`` integers the null distribution of ``sum(sign_i k_i)`` is the convolution of the
    two-point laws ``{-k_i, +k_i}``, computed exactly; ``p = P(|T| >= |t_obs|)``.
    """
    d = np.asarray(d, dtype=float)
    scale = _lattice(d)
    if scale is None:
        return None
    k = np.abs(np.round(d * scale)).astype(np.int64)
    k = k[k > 0]
    observed = abs(int(np.round(d * scale).sum()))
    if k.size == 0:
        return 1.0
    total = int(k.sum())
    pmf = np.zeros(2 * total + 1)  # index j holds P(T = j - total)
    pmf[total] = 1.0
    for value, count in zip(*np.unique(k, return_counts=True)):
        for _ in range(int(count)):
            pmf = 0.5 * (np.roll(pmf, int(value)) + np.roll(pmf, -int(value)))
    t = np.arange(-total, total + 1)
    return float(min(1.0, pmf[np.abs(t) >= observed].sum()))


def paired_test(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, str]:
    """``(p, test)``: two-sided p-value for "same mean score" on the same questions and the
    name of the test that gave it: :data:`TEST_MCNEMAR` for 0/1 scores, else
    :data:`TEST_SIGN_FLIP_EXACT` when the differences lie on a lattice (seed-averaged answers),
    else :data:`TEST_SIGN_FLIP_MC` (``scipy.stats.permutation_test``, :data:`N_BOOT`
    resamples, so its p-value floor is ``1 / (N_BOOT + 1)``)."""
    if is_binary(a) and is_binary(b):
        return mcnemar_exact(a, b)[0], TEST_MCNEMAR
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    exact = sign_flip_exact(d)
    if exact is not None:
        return exact, TEST_SIGN_FLIP_EXACT
    res = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        n_resamples=N_BOOT,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(res.pvalue), TEST_SIGN_FLIP_MC


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


# ---------------------------------------------------------------------------- many tests
CORRECTIONS: dict[str, str] = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
"""Multiple-comparison corrections by name: ``holm`` controls the family-wise error rate
(Holm, 1979), ``bh`` the false discovery rate (Benjamini & Hochberg, 1995)."""


def adjust_p(p_values: Sequence[float], method: str = "holm") -> np.ndarray:
    """Corrected p-values ``(m,)`` of a family of tests, in the input order; NaNs (tests not
    made) stay NaN and do not count in the family.

    ``holm``: the ``i``-th smallest of the ``m`` p-values becomes ``max_{j <= i} min(1, (m - j
    + 1) p_(j))``; ``bh``: ``scipy.stats.false_discovery_control(p, method="bh")``.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; expected one of {sorted(CORRECTIONS)}")
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    made = ~np.isnan(p)
    if not made.any():
        return out
    if np.any((p[made] < 0) | (p[made] > 1)):
        raise ValueError(f"adjust_p: p-values must lie in [0, 1], got {p[made].tolist()}")
    if method == "bh":
        out[made] = stats.false_discovery_control(p[made], method="bh")
        return out
    q = p[made]
    order = np.argsort(q, kind="stable")
    m = q.size
    stepped = np.maximum.accumulate((m - np.arange(m)) * q[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    out[made] = adjusted
    return out
