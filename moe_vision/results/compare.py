"""Paired comparison of two models evaluated on the same questions.

:func:`compare` answers "is run A better than run B, per category, beyond question noise?":
for every category (and ``overall``) the difference of accuracies ``A - B``, its paired
bootstrap interval over questions, and a p-value (exact McNemar on the discordant pairs for
0/1 scores; see :mod:`moe_vision.results.stats`). Pairing matters: two models that share most
of their right and wrong answers are far easier to tell apart on the same questions than two
independent samples (lmms-eval reports paired tests for the same reason).

A side is a run folder or a sweep cell folder (both hold ``predictions.json``, written by the
evaluation), a ``predictions.json`` path, a list of predictions (dicts with ``id``,
``category``, ``score``), or a sequence of folders: the seeds of one cell, whose per-question
scores are averaged (the p-value is then the permutation test for fractional scores).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moe_vision.results import stats
from moe_vision.results.table import read_json

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"

Side = str | os.PathLike | Sequence[Any] | pd.DataFrame
"""What :func:`compare` accepts for each model (see the module docstring)."""

COMPARE_COLUMNS: tuple[str, ...] = (
    "category",
    "n",
    "accuracy_a",
    "accuracy_b",
    "difference",
    "lo",
    "hi",
    "p_value",
    "a_only",
    "b_only",
    "significant",
)
"""Columns of :func:`compare`'s table; ``a_only`` / ``b_only`` count questions only that side
got fully right (the discordant pairs)."""


def _predictions_path(path: Path) -> Path:
    if path.is_dir():
        path = path / PREDICTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: compare needs a run or cell folder holding {PREDICTIONS_FILE} "
            f"(written by the evaluation at the end of `moe-vision train` / a sweep cell)"
        )
    return path


def _frame(records: Sequence[Mapping[str, Any]], where: str) -> pd.DataFrame:
    rows = []
    for i, rec in enumerate(records):
        missing = [k for k in ("id", "category", "score") if k not in rec]
        if missing:
            raise ValueError(
                f"{where}: prediction {i} lacks {missing}; expected id, category, score"
            )
        rows.append({"id": str(rec["id"]), "category": str(rec["category"]), "score": rec["score"]})
    df = pd.DataFrame(rows, columns=["id", "category", "score"])
    dup = df["id"][df["id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{where}: question ids appear twice: {dup[:5]}")
    return df.astype({"score": float}).set_index("id")


def load_scores(side: Side) -> pd.DataFrame:
    """Per-question scores of one side: DataFrame indexed by question ``id`` with ``category``
    and ``score`` (averaged over seeds when ``side`` is a sequence of folders)."""
    if isinstance(side, pd.DataFrame):
        return _frame(side.reset_index().to_dict("records"), "DataFrame")
    if isinstance(side, (str, os.PathLike)):
        path = _predictions_path(Path(side))
        data = read_json(path)
        if isinstance(data, Mapping):  # `moe-vision eval` output: {"predictions": [...]}
            data = data.get("predictions", [])
        return _frame(data, str(path))
    side = list(side)
    if side and all(isinstance(s, Mapping) for s in side):
        return _frame(side, "predictions")
    if not side:
        raise ValueError("compare: a side is an empty list")
    frames = [load_scores(s) for s in side]
    first = frames[0]
    for s, f in zip(side[1:], frames[1:]):
        if set(f.index) != set(first.index):
            raise ValueError(f"compare: {s} answered other questions than {side[0]}")
    scores = pd.concat([f["score"].reindex(first.index) for f in frames], axis=1).mean(axis=1)
    return first.assign(score=scores)


def aligned_scores(a: Side, b: Side) -> pd.DataFrame:
    """Both sides' scores on their common questions: ``category``, ``score_a``, ``score_b``.

    Raises when the two sides did not answer the same questions (a paired comparison on
    different questions would be meaningless) or disagree on a question's category.
    """
    sa, sb = load_scores(a), load_scores(b)
    only_a = sorted(set(sa.index) - set(sb.index))
    only_b = sorted(set(sb.index) - set(sa.index))
    if only_a or only_b:
        raise ValueError(
            f"compare: the two sides answered different questions ({len(only_a)} only in A, "
            f"e.g. {only_a[:3]}; {len(only_b)} only in B, e.g. {only_b[:3]}); evaluate both "
            f"on the same split"
        )
    sb = sb.reindex(sa.index)
    bad = sa.index[sa["category"] != sb["category"]].tolist()
    if bad:
        raise ValueError(f"compare: questions {bad[:3]} have different categories in A and B")
    return pd.DataFrame(
        {"category": sa["category"], "score_a": sa["score"], "score_b": sb["score"]}
    )


def compare(
    a: Side,
    b: Side,
    confidence: float = stats.CONFIDENCE,
    n_boot: int = stats.N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired comparison of ``a`` and ``b`` per category and overall (rows in that order).

    Args:
        a, b: the two models' predictions (see the module docstring).
        confidence: level of the difference's interval.
        n_boot: paired bootstrap replicates.
        seed: seed of the bootstrap (and of the permutation test for fractional scores).

    Returns:
        One row per category plus ``overall``, columns :data:`COMPARE_COLUMNS`: ``difference`` is
        ``accuracy_a - accuracy_b``; ``significant`` is True when the interval excludes 0.
    """
    scores = aligned_scores(a, b)
    groups = [(c, g) for c, g in scores.groupby("category", sort=True)]
    groups.append((stats.OVERALL_CATEGORY, scores))
    rows = []
    for category, g in groups:
        sa, sb = g["score_a"].to_numpy(), g["score_b"].to_numpy()
        diff, lo, hi = stats.paired_bootstrap(sa, sb, confidence, n_boot, seed)
        rows.append(
            {
                "category": category,
                "n": len(g),
                "accuracy_a": float(sa.mean()),
                "accuracy_b": float(sb.mean()),
                "difference": diff,
                "lo": lo,
                "hi": hi,
                "p_value": stats.paired_test(sa, sb, seed)[0],
                "a_only": int(((sa == 1) & (sb < 1)).sum()),
                "b_only": int(((sb == 1) & (sa < 1)).sum()),
                "significant": bool(lo > 0 or hi < 0),
            }
        )
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


def format_compare(table: pd.DataFrame, label_a: str = "A", label_b: str = "B") -> str:
    """Terminal rendering of :func:`compare`'s table (accuracies and differences in points)."""
    view = table.copy()
    for col in ("accuracy_a", "accuracy_b", "difference", "lo", "hi"):
        view[col] = (100 * view[col]).round(1)
    view["p_value"] = view["p_value"].map(lambda p: f"{p:.3g}")
    view = view.rename(columns={"accuracy_a": f"acc {label_a}", "accuracy_b": f"acc {label_b}"})
    return view.to_string(index=False)
