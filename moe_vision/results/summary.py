"""Seed aggregates of a sweep: one row per setting, with seed-level intervals, the difference
against a baseline setting with corrected p-values, and a "vs best" mark.

:func:`summarize` groups a sweep's rows by everything but the seed (experts, fusion, its options,
recipe) and reports, for every accuracy ``accuracy/<category>`` (and overall):

* the mean over seeds, their standard deviation (``/std``), ``n_seeds``, and a 95% interval
  (``/lo``, ``/hi``) over seeds *and* questions: :func:`moe_vision.results.seeds.seed_interval`
  (a t interval over seeds plus an answer-clustered bootstrap of the questions); with one seed,
  the cell's Wilson interval;
* against the **baseline** setting (the first of the table unless named): ``/diff`` with its
  seed-level interval ``/diff_lo``, ``/diff_hi`` and p-value ``/p_hier``
  (:data:`moe_vision.results.seeds.TEST_HIERARCHICAL`, paired within seed), the same corrected
  across every setting x category of the table (``/p_hier_holm`` or ``/p_hier_bh``), the Welch
  t test over seed means as a cross-check (``/p_welch``), and ``/seeds_for_<E>pt``: the seeds
  per setting a paired t test needs to detect a difference of ``E`` points with 80% power at
  5%, from the observed spread of the per-seed differences
  (:func:`moe_vision.results.seeds.seeds_needed`).

It then marks which settings are distinguishable from the best one (highest mean overall
accuracy): ``vs_best`` is ``"best"``, ``"worse"`` (the seed-level interval of the overall
difference excludes 0; with one seed a side, the paired bootstrap over questions) or ``"tie"``,
with ``diff_vs_best`` (points of overall accuracy, negative = worse) and ``p_vs_best`` (the
same test, uncorrected).

The per-question scores come from the sweep folder's cells or from a predictions table
(``results/<name>_predictions.parquet``, :func:`moe_vision.results.table.collect_predictions`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from moe_vision.results import seeds, stats
from moe_vision.results.table import (
    OVERALL,
    STATUS_OK,
    accuracy_columns,
    collect_predictions,
    format_accuracy,
    load,
)

logger = logging.getLogger(__name__)

GROUP_COLUMNS: tuple[str, ...] = ("experts", "fusion", "fusion_options", "recipe")
"""A setting: the cell's settings without the seed."""
MEAN_COLUMNS: tuple[str, ...] = (
    "visual_tokens",
    "params_total",
    "params_trainable",
    "train_time_s",
)
"""Other metrics averaged over seeds."""
VS_BEST_COLUMNS: tuple[str, ...] = ("vs_best", "diff_vs_best", "p_vs_best")
DROP_PREFIX = "drop/"
"""Attribution columns (:mod:`moe_vision.analysis.attribution`)."""
EFFECT = 0.10
"""Default difference (accuracy, 10 points) the ``/seeds_for_<E>pt`` columns plan for."""


class Scores:
    """Per-question scores of a sweep's cells: ``matrix(cells, category)`` is ``(S, Q)``."""

    def __init__(self, predictions: pd.DataFrame) -> None:
        preds = predictions.astype({"id": str, "cell_id": str})
        self.table = preds.pivot(index="cell_id", columns="id", values="score")  # (cells, Q)
        first = preds.drop_duplicates("id").set_index("id").reindex(self.table.columns)
        self.category = first["category"].astype(str).to_numpy()
        answers = first["answer"] if "answer" in first.columns else pd.Series(dtype=object)
        ok = answers.notna().all() and (answers.astype(str) != "").all() and len(answers)
        self.answer = answers.astype(str).to_numpy(object) if ok else None

    def has(self, cells: list[str]) -> bool:
        return all(c in self.table.index for c in cells)

    def matrix(self, cells: list[str], category: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(scores (S, Q_cat), cluster keys (Q_cat,) or None)``."""
        mask = np.ones(len(self.category), bool)
        if category != stats.OVERALL_CATEGORY:
            mask = self.category == category
        x = self.table.loc[cells].to_numpy(float)[:, mask]
        return x, None if self.answer is None else self.answer[mask]


def _accuracy_stats(
    group: pd.DataFrame, column: str, scores: Scores | None, confidence: float, n_boot: int
) -> dict[str, Any]:
    values = group[column].to_numpy(dtype=float)
    out: dict[str, Any] = {
        column: float(values.mean()),
        f"{column}/std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        f"{column}/lo": math.nan,
        f"{column}/hi": math.nan,
    }
    cells = [str(c) for c in group["cell_id"]]
    if len(group) == 1 and f"{column}/lo" in group.columns:
        out[f"{column}/lo"] = float(group[f"{column}/lo"].iloc[0])
        out[f"{column}/hi"] = float(group[f"{column}/hi"].iloc[0])
    elif scores is not None and scores.has(cells):
        x, keys = scores.matrix(cells, column.split("/", 1)[1])
        if x.size and not np.isnan(x).any():
            est = seeds.seed_interval(x, keys, confidence, n_boot)
            out[f"{column}/lo"], out[f"{column}/hi"] = est.lo, est.hi
    n_col = f"n/{column.split('/', 1)[1]}"
    if n_col in group.columns:
        out[n_col] = group[n_col].iloc[0]
    return out


def summarize(
    source: str | os.PathLike[str] | pd.DataFrame,
    sweep_dir: str | os.PathLike[str] | None = None,
    confidence: float = stats.CONFIDENCE,
    n_boot: int = stats.N_BOOT,
    predictions: pd.DataFrame | None = None,
    baseline: int = 0,
    correction: str = "holm",
    effect: float = EFFECT,
) -> pd.DataFrame:
    """Seed aggregates of a sweep (see the module docstring).

    Args:
        source: a sweep folder, or its table (then pass ``sweep_dir`` or ``predictions`` for
            the seed-level intervals and tests, which need the cells' per-question answers).
        sweep_dir: the sweep folder when ``source`` is a table.
        confidence: interval level.
        n_boot: bootstrap replicates.
        predictions: per-question scores (``cell_id``, ``id``, ``category``, ``score``, and
            ``answer`` for clustering), instead of reading them from ``sweep_dir``.
        baseline: position of the baseline setting among the summary's rows.
        correction: ``holm`` or ``bh`` (:func:`moe_vision.results.stats.adjust_p`).
        effect: the difference the ``/seeds_for_<E>pt`` columns plan for.

    Returns:
        One row per setting, in the table's order: :data:`GROUP_COLUMNS`, ``n_seeds``,
        ``seeds``, per accuracy ``<col>``, ``<col>/std``, ``<col>/lo``, ``<col>/hi``,
        ``n/<category>`` and the baseline columns of the module docstring, the means of
        :data:`MEAN_COLUMNS` and of attribution drops ``drop/<expert>/<category>`` (with
        ``/lo``, ``/hi`` for one seed), and :data:`VS_BEST_COLUMNS`.
    """
    if isinstance(source, pd.DataFrame):
        df = source
    else:
        sweep_dir = sweep_dir or source
        df = load(source)
    if predictions is None and sweep_dir is not None:
        predictions = collect_predictions(sweep_dir)
    scores = Scores(predictions) if predictions is not None and len(predictions) else None
    ok = df[df["status"] == STATUS_OK] if "status" in df.columns else df
    rows, sides = [], []
    for key, group in ok.groupby(list(GROUP_COLUMNS), sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(GROUP_COLUMNS, key))
        row["n_seeds"] = len(group)
        row["seeds"] = ",".join(str(s) for s in group["seed"])
        for column in accuracy_columns(ok):
            row.update(_accuracy_stats(group, column, scores, confidence, n_boot))
        for column in MEAN_COLUMNS:
            if column in group.columns:
                row[column] = pd.to_numeric(group[column], errors="coerce").mean()
        for column in _drop_columns(ok):  # attribution: mean over seeds, one seed's interval
            row[column] = pd.to_numeric(group[column], errors="coerce").mean()
            if len(group) == 1:
                for bound in ("lo", "hi"):
                    row[f"{column}/{bound}"] = group[f"{column}/{bound}"].iloc[0]
        rows.append(row)
        sides.append(([str(c) for c in group["cell_id"]], [str(s) for s in group["seed"]]))
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    if scores is not None and all(scores.has(cells) for cells, _ in sides):
        out = _vs_baseline(out, sides, scores, baseline, correction, effect, confidence, n_boot)
    return _mark_vs_best(out, sides, scores, confidence, n_boot)


def _difference(
    scores: Scores, a: tuple[list[str], list[str]], b: tuple[list[str], list[str]],
    category: str, confidence: float, n_boot: int,
) -> tuple[float, float, float, float, float, float]:  # fmt: skip
    """``(diff, lo, hi, p, p_welch, sd of per-seed differences)`` of setting ``a`` minus ``b``."""
    xa, keys = scores.matrix(a[0], category)
    xb, _ = scores.matrix(b[0], category)
    if len(a[0]) > 1 and len(b[0]) > 1:
        est = seeds.seed_difference(xa, xb, keys, a[1], b[1], confidence, n_boot)
        diff, lo, hi, p = est.estimate, est.lo, est.hi, est.p_value
    else:  # one seed a side: question level
        diff, lo, hi = stats.paired_bootstrap(xa.mean(0), xb.mean(0), confidence, n_boot)
        p = stats.paired_test(xa.mean(0), xb.mean(0))[0]
    welch = seeds.welch_seeds(xa.mean(1), xb.mean(1))
    order = {s: i for i, s in enumerate(b[1])}
    if sorted(a[1]) == sorted(b[1]) and len(a[1]) > 1:
        per_seed = xa.mean(1) - xb.mean(1)[[order[s] for s in a[1]]]
        sd = float(per_seed.std(ddof=1))
    else:
        sd = math.nan
    return diff, lo, hi, p, welch, sd


def _vs_baseline(
    out: pd.DataFrame, sides: list[tuple[list[str], list[str]]], scores: Scores, baseline: int,
    correction: str, effect: float, confidence: float, n_boot: int,
) -> pd.DataFrame:  # fmt: skip
    if not 0 <= baseline < len(out):
        raise ValueError(f"summarize: baseline {baseline} is not one of the {len(out)} settings")
    columns = accuracy_columns(out)
    new: dict[str, np.ndarray] = {}
    tag = f"{100 * effect:g}pt"
    for column in columns:
        cat = column.split("/", 1)[1]
        vals = np.full((len(out), 6), math.nan)
        for i, side in enumerate(sides):
            if i != baseline:
                vals[i] = _difference(scores, side, sides[baseline], cat, confidence, n_boot)
        for j, name in enumerate(("diff", "diff_lo", "diff_hi", "p_hier", "p_welch")):
            new[f"{column}/{name}"] = vals[:, j]
        new[f"{column}/seeds_for_{tag}"] = np.array(
            [seeds.seeds_needed(effect, sd) for sd in vals[:, 5]]
        )
    family = np.concatenate([new[f"{c}/p_hier"] for c in columns])  # settings x categories
    adjusted = stats.adjust_p(family, correction).reshape(len(columns), len(out))
    for k, column in enumerate(columns):
        new[f"{column}/p_hier_{correction}"] = adjusted[k]
    extra = pd.DataFrame(new, index=out.index)
    out = pd.concat([out, extra], axis=1)
    out["baseline"] = [i == baseline for i in range(len(out))]
    return out


def _drop_columns(df: pd.DataFrame) -> list[str]:
    """Attribution columns ``drop/<expert>/<category>`` (not their bounds)."""
    return [c for c in df.columns if c.startswith(DROP_PREFIX) and not c.endswith(("/lo", "/hi"))]


def attribution_long(df: pd.DataFrame) -> pd.DataFrame:
    """Attribution columns of a table (per cell or per setting) as one row per row x expert x
    category: the row's ``experts``/``fusion`` (and ``seed`` or ``n_seeds``), ``expert``,
    ``category``, ``drop`` and, where present, ``lo`` and ``hi`` (accuracy points lost when that
    expert is mean-ablated, :mod:`moe_vision.analysis.attribution`)."""
    keys = [c for c in ("experts", "fusion", "seed", "n_seeds") if c in df.columns]
    out = []
    for _, row in df.iterrows():
        for column in _drop_columns(df):
            if row[column] != row[column]:  # this row's combination lacks that expert
                continue
            expert, category = column.removeprefix(DROP_PREFIX).rsplit("/", 1)
            item = {k: row[k] for k in keys}
            item.update(expert=expert, category=category, drop=row[column])
            item["lo"] = row.get(f"{column}/lo", math.nan)
            item["hi"] = row.get(f"{column}/hi", math.nan)
            out.append(item)
    return pd.DataFrame(out, columns=[*keys, "expert", "category", "drop", "lo", "hi"])


def _mark_vs_best(
    out: pd.DataFrame,
    sides: list[tuple[list[str], list[str]]],
    scores: Scores | None,
    confidence: float,
    n_boot: int,
) -> pd.DataFrame:
    best = int(out[OVERALL].to_numpy(dtype=float).argmax())
    marks, diffs, pvals = [], [], []
    for i, side in enumerate(sides):
        if i == best:
            marks.append("best")
            diffs.append(0.0)
            pvals.append(math.nan)
        elif scores is None or not (scores.has(side[0]) and scores.has(sides[best][0])):
            marks.append("n/a")
            diffs.append(math.nan)
            pvals.append(math.nan)
        else:
            diff, lo, hi, p, _, _ = _difference(
                scores, side, sides[best], stats.OVERALL_CATEGORY, confidence, n_boot
            )
            marks.append("worse" if lo > 0 or hi < 0 else "tie")
            diffs.append(diff)
            pvals.append(p)
    return out.assign(vs_best=marks, diff_vs_best=diffs, p_vs_best=pvals)


def format_summary(summary: pd.DataFrame) -> str:
    """Terminal rendering of :func:`summarize`: ``mean (lo-hi)`` in %, seed std of the overall
    accuracy in points, the "vs best" mark with its p-value, then (when present) each setting's
    difference from the baseline per category, ``diff [lo, hi] p`` in points with the corrected
    p-value, and a footnote naming the tests and the correction."""
    if summary.empty:
        return "(no finished cells)"
    view = summary[["experts", "fusion", "n_seeds"]].copy()
    for column in accuracy_columns(summary):
        view[column.removeprefix("accuracy/")] = format_accuracy(summary, column)
    view["overall_std"] = (100 * summary[f"{OVERALL}/std"]).round(1)
    view["vs_best"] = summary["vs_best"]
    view["p_vs_best"] = summary["p_vs_best"].map(lambda p: "-" if p != p else f"{p:.2g}")
    text = view.to_string(index=False, na_rep="-")
    if "baseline" not in summary.columns:
        return text
    corrected = [c for c in summary.columns if c.startswith(f"{OVERALL}/p_hier_")]
    correction = corrected[0].removeprefix(f"{OVERALL}/p_hier_")
    base = summary[summary["baseline"]].iloc[0]
    diff = summary[~summary["baseline"]][["experts", "fusion"]].copy()
    rows = summary[~summary["baseline"]]
    for column in accuracy_columns(summary):
        cells = []
        for _, r in rows.iterrows():
            d, lo, hi = (100 * r[f"{column}/{k}"] for k in ("diff", "diff_lo", "diff_hi"))
            p = r[f"{column}/p_hier_{correction}"]
            cells.append("-" if d != d else f"{d:+.1f} [{lo:+.0f}, {hi:+.0f}] p={p:.2g}")
        diff[column.removeprefix("accuracy/")] = cells
    text += (
        f"\n\ndifference from the baseline ({base['experts']}, {base['fusion']}) in points "
        f"[{100 * stats.CONFIDENCE:g}% seed-level interval], p: {seeds.TEST_HIERARCHICAL}, "
        f"{stats.CORRECTIONS[correction]}-corrected over {rows.shape[0]} settings x "
        f"{len(accuracy_columns(summary))} categories (Welch over seed means and the seeds "
        f"needed per effect are in the summary CSV)\n"
    )
    return text + diff.to_string(index=False)
