"""Sweep results as a table: one row per cell, a pandas API, CSV/Parquet export and plots.

A sweep folder (written by :mod:`moe_vision.sweeps.sweep`) looks like::

    <sweep>/sweep.json                 manifest: the spec and every cell's settings, in order
    <sweep>/cells/<cell_id>/cell.json  the cell's settings and resolved run config
    <sweep>/cells/<cell_id>/metrics.json   present once the cell finished (its metrics row)
    <sweep>/cells/<cell_id>/error.json     present when the cell failed (error + traceback)
    <sweep>/results.csv, results.parquet   the table, rewritten atomically after every cell

The cell folders are the source of truth: the table is *derived* from them, keyed by cell id,
so a killed and resumed sweep can never lose or double a row. :func:`load` rebuilds it.

The row schema follows the results tables of Eagle (Shi et al., 2024, "Eagle: Exploring the
Design Space for Multimodal LLMs with Mixture of Encoders") and Cambrian-1 (Tong et al.,
2024): the cell's settings (experts, fusion, recipe, seed), per-category and overall accuracy,
total and trainable parameters, visual tokens, training time, throughput and peak memory.
Every accuracy ``accuracy/<category>`` comes with its 95% interval ``accuracy/<category>/lo``
and ``/hi`` and its question count ``n/<category>`` (:mod:`moe_vision.results.stats`; computed
from the cell's ``predictions.json`` when its metrics lack them). Seed aggregates live in
:mod:`moe_vision.results.summary`, plots in :mod:`moe_vision.results.plots`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from moe_vision.io import atomic_write, read_json

logger = logging.getLogger(__name__)

MANIFEST = "sweep.json"
CELLS_DIR = "cells"
CELL_FILE = "cell.json"
METRICS_FILE = "metrics.json"
ERROR_FILE = "error.json"
TABLE_CSV = "results.csv"
TABLE_PARQUET = "results.parquet"

SETTINGS_COLUMNS: tuple[str, ...] = (
    "cell_id",
    "name",
    "experts",
    "num_experts",
    "fusion",
    "fusion_options",
    "recipe",
    "seed",
    "control",
)
"""The cell's settings, first in every row (``control``: the control a cell is,
``random_init`` or ``equal_tokens`` (:mod:`moe_vision.sweeps.controls`), ``none`` otherwise)."""

METRIC_COLUMNS: tuple[str, ...] = (
    "accuracy/overall",
    "params_total",
    "params_trainable",
    "visual_tokens",
    "train_time_s",
    "throughput_samples_s",
    "peak_memory_mb",
    "flops_per_sample",
)
"""Metrics every row carries (NaN where a cell failed or a metric is unavailable).
Per-category ``accuracy/<category>`` columns come from the cells and sit before these."""

STATUS_COLUMNS: tuple[str, ...] = ("status", "error", "wall_time_s")
"""``status`` is ``"ok"`` or ``"failed"``; ``error`` the failure's one-line message."""

STATUS_OK = "ok"
STATUS_FAILED = "failed"
ACCURACY_PREFIX = "accuracy/"
OVERALL = "accuracy/overall"
INTERVAL_SUFFIXES: tuple[str, ...] = ("/lo", "/hi")
"""``<metric>/lo`` and ``<metric>/hi``: the bounds of ``<metric>``'s 95% interval."""
PREDICTIONS_FILE = "predictions.json"
ATTRIBUTION_FILE = "attribution.json"


# ---------------------------------------------------------------------------- rows
def cell_row(
    settings: Mapping[str, Any], cell_dir: str | os.PathLike[str]
) -> dict[str, Any] | None:
    """The table row of one cell from its folder, or ``None`` when it has not run yet.

    Args:
        settings: the cell's manifest entry (``cell_id``, ``name``, ``experts`` list, ``fusion``,
            ``fusion_options``, ``recipe``, ``seed``).
        cell_dir: ``<sweep>/cells/<cell_id>``.
    """
    cell_dir = Path(cell_dir)
    metrics_path, error_path = cell_dir / METRICS_FILE, cell_dir / ERROR_FILE
    if metrics_path.exists():
        result, status, error = read_json(metrics_path), STATUS_OK, None
    elif error_path.exists():
        result, status = read_json(error_path), STATUS_FAILED
        error = result.get("error")
        result = {"wall_time_s": result.get("wall_time_s")}
    else:
        return None
    experts = list(settings.get("experts", []))
    row: dict[str, Any] = {
        "cell_id": settings["cell_id"],
        "name": settings.get("name", settings["cell_id"]),
        "experts": "+".join(experts),
        "num_experts": len(experts),
        "fusion": settings.get("fusion"),
        "fusion_options": json.dumps(settings.get("fusion_options") or {}, sort_keys=True),
        "recipe": settings.get("recipe"),
        "seed": settings.get("seed"),
        "control": settings.get("control") or "none",
        "status": status,
        "error": error,
    }
    for key, value in result.items():
        if key not in row and _is_scalar(value):
            row[key] = value
    if status == STATUS_OK and f"{OVERALL}/lo" not in row:
        row.update(_intervals_from_predictions(cell_dir))
    if status == STATUS_OK and (cell_dir / ATTRIBUTION_FILE).exists():
        attribution = read_json(cell_dir / ATTRIBUTION_FILE)
        row.update({k: v for k, v in attribution.get("metrics", {}).items() if _is_scalar(v)})
        if attribution.get("error"):
            row["attribution_error"] = attribution["error"]
    return row


def _intervals_from_predictions(cell_dir: Path) -> dict[str, Any]:
    """Interval columns of a cell whose metrics predate them (from its ``predictions.json``)."""
    from moe_vision.results.stats import interval_metrics

    path = cell_dir / PREDICTIONS_FILE
    if not path.exists():
        return {}
    return dict(interval_metrics(read_json(path)))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def collect_rows(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of every cell of the sweep in ``sweep_dir`` that finished or failed, in spec order."""
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{sweep_dir} is not a sweep folder: {manifest_path} is missing "
            f"(run `moe-vision sweep --out {sweep_dir}` first)"
        )
    manifest = read_json(manifest_path)
    rows = []
    for settings in manifest["cells"]:
        row = cell_row(settings, sweep_dir / CELLS_DIR / settings["cell_id"])
        if row is not None:
            rows.append(row)
    return rows


PREDICTION_COLUMNS: tuple[str, ...] = ("cell_id", "id", "category", "answer", "score")
"""Columns of :func:`collect_predictions`; ``answer`` (the question's first reference answer)
is the cluster key of the seed-level tests (:mod:`moe_vision.results.stats`)."""


def collect_predictions(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-question scores of every finished cell: :data:`PREDICTION_COLUMNS` (from the cells'
    ``predictions.json``; ``answer`` is empty where a cell did not record its answers), in spec
    order; what paired comparisons of cells need once the sweep folder is gone (``moe-vision
    sweep`` saves it next to the table)."""
    sweep_dir = Path(sweep_dir)
    frames = []
    for row in collect_rows(sweep_dir):
        path = sweep_dir / CELLS_DIR / row["cell_id"] / PREDICTIONS_FILE
        if row["status"] == STATUS_OK and path.exists():
            records = read_json(path)
            preds = pd.DataFrame(records, columns=["id", "category", "score"])
            preds["answer"] = [_first_answer(r) for r in records]
            frames.append(preds.assign(cell_id=row["cell_id"]))
    if not frames:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    out = pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]
    return out.astype({"id": str, "category": str, "answer": str, "score": float})


def _first_answer(record: Mapping[str, Any]) -> str:
    answers = record.get("answers")
    if isinstance(answers, (list, tuple)) and answers:
        return str(answers[0])
    return str(answers) if isinstance(answers, str) else ""


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows to a DataFrame with a stable column order: settings, status, accuracies, metrics,
    then anything else the cells reported (sorted)."""
    df = pd.DataFrame(list(rows))
    for col in (*SETTINGS_COLUMNS, *STATUS_COLUMNS, OVERALL, *METRIC_COLUMNS):
        if col not in df.columns:
            df[col] = None
    acc = [
        col
        for point in accuracy_columns(df)
        for col in (point, *(point + s for s in INTERVAL_SUFFIXES))
        if col in df.columns
    ]
    metrics = [c for c in METRIC_COLUMNS if c != OVERALL]
    known = [*SETTINGS_COLUMNS, "status", "error", *acc, *metrics, "wall_time_s"]
    rest = sorted(c for c in df.columns if c not in known)
    df = df[known + rest]
    for col in [*acc, *metrics, "wall_time_s"]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def load(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The results table as a DataFrame, one row per finished or failed cell.

    Args:
        path: a sweep folder (rows rebuilt from its cell folders), or a results table written
            by :func:`save` (``.csv`` or ``.parquet``), or a folder holding ``results.csv``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).exists():
            return to_frame(collect_rows(path))
        for name in (TABLE_PARQUET, TABLE_CSV):
            if (path / name).exists():
                return load(path / name)
        raise FileNotFoundError(
            f"{path} holds neither a sweep ({MANIFEST}) nor a results table "
            f"({TABLE_CSV} / {TABLE_PARQUET})"
        )
    if not path.exists():
        raise FileNotFoundError(f"results table {path} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=True)
    raise ValueError(f"unsupported results file {path}; expected a .csv or .parquet file")


def save(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` atomically as CSV or Parquet, chosen by the suffix of ``path``."""
    path = Path(path)
    if path.suffix == ".csv":
        return atomic_write(path, lambda p: df.to_csv(p, index=False))
    if path.suffix == ".parquet":
        return atomic_write(path, lambda p: df.to_parquet(p, index=False))
    raise ValueError(f"unsupported results file {path}; expected a .csv or .parquet suffix")


def write_tables(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Rebuild the sweep's table from its cell folders and write ``results.csv`` and
    ``results.parquet`` atomically; returns the table."""
    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    save(df, sweep_dir / TABLE_CSV)
    save(df, sweep_dir / TABLE_PARQUET)
    return df


# ---------------------------------------------------------------------------- views
def accuracy_columns(df: pd.DataFrame) -> list[str]:
    """The ``accuracy/<category>`` columns, per-category first, ``accuracy/overall`` last."""
    acc = sorted(c for c in df.columns if is_accuracy_column(c) and c != OVERALL)
    return acc + ([OVERALL] if OVERALL in df.columns else [])


def is_accuracy_column(column: str) -> bool:
    """``accuracy/<category>`` (a point estimate, not ``accuracy/<category>/lo`` and the like)."""
    return column.startswith(ACCURACY_PREFIX) and "/" not in column[len(ACCURACY_PREFIX) :]


def pivot_accuracy(
    df: pd.DataFrame, value: str = OVERALL, index: str = "experts", columns: str = "fusion"
) -> pd.DataFrame:
    """Mean of ``value`` (over seeds and anything else not pivoted) per ``index`` x ``columns``.

    Failed cells count as missing (NaN), never as zero.
    """
    for col in (value, index, columns):
        if col not in df.columns:
            raise KeyError(f"column {col!r} is not in the table; columns are {list(df.columns)}")
    ok = df[df["status"] == STATUS_OK] if "status" in df.columns else df
    table = ok.pivot_table(index=index, columns=columns, values=value, aggfunc="mean")
    rows = list(dict.fromkeys(df[index]))
    cols = list(dict.fromkeys(df[columns]))
    return table.reindex(index=rows, columns=cols)


def format_table(df: pd.DataFrame) -> str:
    """A compact text rendering of the table for the terminal: accuracies in %, the overall one
    as ``point (lo-hi)`` when the table holds its 95% interval (the per-category intervals are in
    the table and in :func:`moe_vision.results.summary.format_summary`)."""
    if df.empty:
        return "(no finished cells)"
    cols = ["experts", "fusion", "recipe", "seed", "status"]
    cols += [c for c in ("visual_tokens", "params_trainable", "train_time_s") if c in df.columns]
    view = df[cols].copy()
    for c in accuracy_columns(df):
        short = c.removeprefix(ACCURACY_PREFIX)
        view[short] = format_accuracy(df, c) if c == OVERALL else (100 * df[c]).round(1)
    if "train_time_s" in view.columns:
        view["train_time_s"] = view["train_time_s"].round(1)
    text = view.to_string(index=False, na_rep="-")
    failed = df[df["status"] == STATUS_FAILED]
    for _, row in failed.iterrows():
        text += f"\nFAILED {row['name']}: {row['error']}"
    return text


def format_accuracy(df: pd.DataFrame, column: str) -> pd.Series:
    """``column`` in % as text, ``"31.7 (29.9-33.6)"`` when ``column/lo`` and ``/hi`` exist."""
    lo, hi = f"{column}/lo", f"{column}/hi"

    def cell(row: pd.Series) -> str:
        v = row[column]
        if v != v or v is None:
            return "-"
        if lo in row.index and row[lo] == row[lo] and row[lo] is not None:
            return f"{100 * v:.1f} ({100 * row[lo]:.0f}-{100 * row[hi]:.0f})"
        return f"{100 * v:.1f}"

    return df.apply(cell, axis=1) if len(df) else pd.Series([], dtype=str)
