"""Seed aggregates of a sweep: one row per cell setting, with intervals and a "vs best" mark.

:func:`summarize` groups a sweep's rows by everything but the seed (experts, fusion, its options,
recipe) and reports, for every accuracy: the mean over seeds, their standard deviation
(``/std``), ``n_seeds``, and a 95% interval (``/lo``, ``/hi``) that accounts for seeds *and*
questions (:func:`moe_vision.results.stats.crossed_bootstrap` on the per-question scores in the
cells' ``predictions.json``; with one seed, the cell's Wilson interval).

It then marks which settings are distinguishable from the best one (highest mean overall
accuracy): ``vs_best`` is ``"best"``, ``"worse"`` (the paired bootstrap interval of the overall
difference, :func:`moe_vision.results.compare.compare` on seed-averaged answers, excludes 0) or
``"tie"`` (it does not), with ``diff_vs_best`` (points of overall accuracy, negative = worse)
and ``p_vs_best``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_vision.results import stats
from moe_vision.results.compare import compare, load_scores
from moe_vision.results.table import (
    CELLS_DIR,
    OVERALL,
    PREDICTIONS_FILE,
    STATUS_OK,
    accuracy_columns,
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


def _cell_dirs(df: pd.DataFrame, sweep_dir: Path | None) -> list[Path] | None:
    if sweep_dir is None:
        return None
    dirs = [sweep_dir / CELLS_DIR / str(c) for c in df["cell_id"]]
    return dirs if all((d / PREDICTIONS_FILE).exists() for d in dirs) else None


def _seed_matrix(dirs: list[Path], category: str) -> np.ndarray:
    """Per-question scores ``(S seeds, Q questions)`` of one category (overall: all)."""
    frames = [load_scores(d) for d in dirs]
    ids = frames[0].index
    if category != stats.OVERALL_CATEGORY:
        ids = ids[frames[0]["category"] == category]
    return np.stack([f["score"].reindex(ids).to_numpy(dtype=float) for f in frames])


def _accuracy_stats(
    group: pd.DataFrame, column: str, dirs: list[Path] | None, confidence: float, n_boot: int
) -> dict[str, Any]:
    values = group[column].to_numpy(dtype=float)
    out: dict[str, Any] = {
        column: float(values.mean()),
        f"{column}/std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        f"{column}/lo": math.nan,
        f"{column}/hi": math.nan,
    }
    if len(group) == 1 and f"{column}/lo" in group.columns:
        out[f"{column}/lo"] = float(group[f"{column}/lo"].iloc[0])
        out[f"{column}/hi"] = float(group[f"{column}/hi"].iloc[0])
    elif dirs is not None:
        matrix = _seed_matrix(dirs, column.split("/", 1)[1])
        if matrix.size and not np.isnan(matrix).any():
            lo, hi = stats.crossed_bootstrap(matrix, confidence, n_boot)
            out[f"{column}/lo"], out[f"{column}/hi"] = lo, hi
    n_col = f"n/{column.split('/', 1)[1]}"
    if n_col in group.columns:
        out[n_col] = group[n_col].iloc[0]
    return out


def summarize(
    source: str | os.PathLike[str] | pd.DataFrame,
    sweep_dir: str | os.PathLike[str] | None = None,
    confidence: float = stats.CONFIDENCE,
    n_boot: int = stats.N_BOOT,
) -> pd.DataFrame:
    """Seed aggregates of a sweep (see the module docstring).

    Args:
        source: a sweep folder, or its table (then pass ``sweep_dir`` for the seed-and-question
            intervals and the "vs best" mark, which need the cells' per-question answers).
        sweep_dir: the sweep folder when ``source`` is a table.
        confidence: interval level.
        n_boot: bootstrap replicates.

    Returns:
        One row per setting, in the table's order: :data:`GROUP_COLUMNS`, ``n_seeds``,
        ``seeds``, per accuracy ``<col>``, ``<col>/std``, ``<col>/lo``, ``<col>/hi`` and
        ``n/<category>``, the means of :data:`MEAN_COLUMNS` and of attribution drops
        ``drop/<expert>/<category>`` (with ``/lo``, ``/hi`` for one seed), and
        :data:`VS_BEST_COLUMNS`.
    """
    if isinstance(source, pd.DataFrame):
        df = source
    else:
        sweep_dir = sweep_dir or source
        df = load(source)
    root = Path(sweep_dir) if sweep_dir is not None else None
    ok = df[df["status"] == STATUS_OK] if "status" in df.columns else df
    rows, sides = [], []
    for key, group in ok.groupby(list(GROUP_COLUMNS), sort=False, dropna=False):
        dirs = _cell_dirs(group, root)
        row: dict[str, Any] = dict(zip(GROUP_COLUMNS, key))
        row["n_seeds"] = len(group)
        row["seeds"] = ",".join(str(s) for s in group["seed"])
        for column in accuracy_columns(ok):
            row.update(_accuracy_stats(group, column, dirs, confidence, n_boot))
        for column in MEAN_COLUMNS:
            if column in group.columns:
                row[column] = pd.to_numeric(group[column], errors="coerce").mean()
        for column in _drop_columns(ok):  # attribution: mean over seeds, one seed's interval
            row[column] = pd.to_numeric(group[column], errors="coerce").mean()
            if len(group) == 1:
                for bound in ("lo", "hi"):
                    row[f"{column}/{bound}"] = group[f"{column}/{bound}"].iloc[0]
        rows.append(row)
        sides.append(dirs)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return _mark_vs_best(out, sides, confidence, n_boot)


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
    out: pd.DataFrame, sides: list[list[Path] | None], confidence: float, n_boot: int
) -> pd.DataFrame:
    best = int(out[OVERALL].to_numpy(dtype=float).argmax())
    marks, diffs, pvals = [], [], []
    for i, dirs in enumerate(sides):
        if i == best:
            marks.append("best")
            diffs.append(0.0)
            pvals.append(math.nan)
        elif dirs is None or sides[best] is None:
            marks.append("n/a")
            diffs.append(math.nan)
            pvals.append(math.nan)
        else:
            table = compare(dirs, sides[best], confidence=confidence, n_boot=n_boot)
            overall = table.set_index("category").loc[stats.OVERALL_CATEGORY]
            marks.append("worse" if overall["significant"] else "tie")
            diffs.append(float(overall["difference"]))
            pvals.append(float(overall["p_value"]))
    return out.assign(vs_best=marks, diff_vs_best=diffs, p_vs_best=pvals)


def format_summary(summary: pd.DataFrame) -> str:
    """Terminal rendering of :func:`summarize`: ``mean (lo-hi)`` in %, seed std of the overall
    accuracy in points, and the "vs best" mark with its p-value."""
    if summary.empty:
        return "(no finished cells)"
    view = summary[["experts", "fusion", "n_seeds"]].copy()
    for column in accuracy_columns(summary):
        view[column.removeprefix("accuracy/")] = format_accuracy(summary, column)
    view["overall_std"] = (100 * summary[f"{OVERALL}/std"]).round(1)
    view["vs_best"] = summary["vs_best"]
    view["p_vs_best"] = summary["p_vs_best"].map(lambda p: "-" if p != p else f"{p:.2g}")
    return view.to_string(index=False, na_rep="-")
