"""Plots of a sweep: accuracies with their 95% intervals as error bars (matplotlib, Agg).

* :func:`plot_overall`: overall accuracy of every setting against its visual tokens, error bars,
  one colour per fusion and one marker per expert combination (a legend, no point labels that
  could overlap);
* :func:`plot_categories`: the per-category panel: one group per category, one offset point with
  error bars per setting, since the categories pull on different experts;
* :func:`plot_heatmap`: overall accuracy for expert combinations x fusions, values in the cells;
* :func:`plot_sweep`: overall and per-category panels side by side, sharing one y-axis label.

Every function takes the per-cell table (:func:`moe_vision.results.load`) or the seed summary
(:func:`moe_vision.results.summary.summarize`); both hold ``accuracy/<category>`` with ``/lo``
and ``/hi``. Rows of several seeds of one setting are averaged when given the per-cell table.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_vision.io import atomic_write
from moe_vision.results.table import (
    OVERALL,
    STATUS_OK,
    accuracy_columns,
    pivot_accuracy,
)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
Y_LABEL = "accuracy (95% interval)"


def _settings(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (seeds averaged), only finished cells."""
    ok = df[df["status"] == STATUS_OK] if "status" in df.columns else df
    if "n_seeds" in ok.columns or "seed" not in ok.columns:
        return ok.reset_index(drop=True)
    keys = [c for c in ("experts", "fusion", "fusion_options", "recipe") if c in ok.columns]
    numeric = ok.select_dtypes("number").columns.drop("seed", errors="ignore")
    return ok.groupby(keys, sort=False)[list(numeric)].mean().reset_index()


def _yerr(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    lo, hi = f"{column}/lo", f"{column}/hi"
    if lo not in rows.columns or hi not in rows.columns:
        return None
    value = rows[column].to_numpy(dtype=float)
    err = np.stack([value - rows[lo].to_numpy(dtype=float), rows[hi].to_numpy(dtype=float) - value])
    return np.clip(np.nan_to_num(err), 0, None)


def _styles(rows: pd.DataFrame) -> tuple[dict[str, Any], dict[str, str]]:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = dict(zip(dict.fromkeys(rows["fusion"]), itertools.cycle(cycle)))
    markers = dict(zip(dict.fromkeys(rows["experts"]), itertools.cycle(MARKERS)))
    return colours, markers


def plot_overall(df: pd.DataFrame, ax: Any = None, value: str = OVERALL) -> Any:
    """``value`` against visual tokens with error bars; colour = fusion, marker = experts."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    rows = _settings(df).dropna(subset=["visual_tokens", value])
    colours, markers = _styles(rows)
    yerr = _yerr(rows, value)
    for i, (_, row) in enumerate(rows.iterrows()):
        ax.errorbar(
            row["visual_tokens"] * (1 + 0.04 * (i - (len(rows) - 1) / 2) / max(len(rows), 1)),
            row[value],
            yerr=None if yerr is None else yerr[:, i : i + 1],
            fmt=markers[row["experts"]],
            color=colours[row["fusion"]],
            capsize=3,
            markersize=6,
        )
    if not rows.empty and rows["visual_tokens"].max() > 4 * max(rows["visual_tokens"].min(), 1):
        ax.set_xscale("log", base=2)
    ax.margins(x=0.25)  # room around settings that share a token count
    ax.set_xlabel("visual tokens")
    ax.set_title(value.removeprefix("accuracy/"))
    ax.grid(alpha=0.3)
    _legend(ax, colours, markers)
    return ax


def _legend(ax: Any, colours: dict[str, Any], markers: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in colours.items()]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=e) for e, m in markers.items()]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)


def plot_categories(df: pd.DataFrame, ax: Any = None) -> Any:
    """Per-category panel: x = category, one offset point with error bars per setting."""
    import matplotlib.pyplot as plt

    rows = _settings(df)
    cats = [c for c in accuracy_columns(rows) if c != OVERALL]
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * max(len(cats), 3) + 2, 4))
    colours, markers = _styles(rows)
    width = 0.8 / max(len(rows), 1)
    for i, (_, row) in enumerate(rows.iterrows()):
        x = np.arange(len(cats)) - 0.4 + width * (i + 0.5)
        y = row[cats].to_numpy(dtype=float)
        errs = [_yerr(rows.iloc[[i]], c) for c in cats]
        yerr = None if any(e is None for e in errs) else np.concatenate(errs, axis=1)
        ax.errorbar(
            x,
            y,
            yerr=yerr,
            fmt=markers[row["experts"]],
            color=colours[row["fusion"]],
            capsize=2,
            markersize=5,
            ls="",
        )
    ax.set_xticks(range(len(cats)), [c.removeprefix("accuracy/") for c in cats])
    ax.set_xlim(-0.5, len(cats) - 0.5)
    ax.set_title("per category")
    ax.grid(alpha=0.3, axis="y")
    return ax


def plot_heatmap(df: pd.DataFrame, ax: Any = None, value: str = OVERALL) -> Any:
    """Heatmap of ``value`` for expert combinations x fusions (mean over seeds; blank and
    labelled ``n/a`` where a cell failed or did not run)."""
    import matplotlib.pyplot as plt

    table = pivot_accuracy(df, value=value)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.8 + 1.4 * table.shape[1], 1.2 + 0.5 * table.shape[0]))
    data = table.to_numpy(dtype=float)
    image = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    finite = data[data == data]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i, j in itertools.product(range(table.shape[0]), range(table.shape[1])):
        v = data[i, j]
        label = "n/a" if v != v else f"{100 * v:.1f}"
        colour = "white" if (v == v and v <= mid) else "black"
        ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=8)
    if finite.size:
        ax.figure.colorbar(image, ax=ax, label=value)
    ax.set_xlabel("fusion")
    ax.set_ylabel("experts")
    ax.set_title(f"{value} by expert combination and fusion")
    return ax


def plot_sweep(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Overall accuracy vs tokens and the per-category panel, one shared y-axis label, written
    atomically to ``path`` (PNG/PDF/SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cats = [c for c in accuracy_columns(df) if c != OVERALL]
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(6 + 1.1 * max(len(cats), 3), 4.5),
        sharey=True,
        gridspec_kw={"width_ratios": [4, max(len(cats), 3)]},
    )
    plot_overall(df, ax=left)
    plot_categories(df, ax=right)
    left.set_ylabel(Y_LABEL)
    left.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=120, format=fmt))
    finally:
        plt.close(fig)
    return path
