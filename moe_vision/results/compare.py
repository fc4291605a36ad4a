"""Paired comparison of two models evaluated on the same questions.

:func:`compare` answers "is run A better than run B, per category, beyond seed and question
noise?": for every category (and ``overall``) the difference of accuracies ``A - B``, its
interval and a p-value whose test is named in the ``test`` column, and the p-values corrected
across the table's rows (``p_holm`` or ``p_bh``, :func:`moe_vision.results.stats.adjust_p`):

* both sides with 2 or more seeds: the **seed-level** interval and test
  (:func:`moe_vision.results.seeds.seed_difference`, paired within seed when both sides name
  the same seeds, questions clustered by their reference answer), with the Welch t test over
  seed means beside it (``p_welch_seeds``);
* otherwise (one seed a side): the paired bootstrap interval over questions and the exact
  question-level test (McNemar for 0/1 answers). Pairing matters: two models that share most
  of their right and wrong answers are far easier to tell apart on the same questions than two
  independent samples (lmms-eval reports paired tests for the same reason).

``p_questions`` always holds the question-level test on seed-averaged answers
(``questions_test``: exact McNemar, or the exact sign-flip test for averages): it asks whether
*these* trained models differ, not whether the settings do, and with seeds it is overconfident
about the settings.

A side is a run folder or a sweep cell folder (both hold ``predictions.json``, written by the
evaluation), a ``predictions.json`` path, a list of predictions (dicts with ``id``,
``category``, ``score``), or a sequence of folders: the seeds of one cell (their seed is read
from ``cell.json`` next to ``predictions.json`` when there is one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_vision.io import read_json
from moe_vision.results import seeds as seedstats
from moe_vision.results import stats
from moe_vision.results.table import CELL_FILE

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"

Side = str | os.PathLike | Sequence[Any] | pd.DataFrame
"""What :func:`compare` accepts for each model (see the module docstring)."""

COMPARE_COLUMNS: tuple[str, ...] = (
    "category",
    "n",
    "seeds_a",
    "seeds_b",
    "accuracy_a",
    "accuracy_b",
    "difference",
    "lo",
    "hi",
    "p_value",
    "test",
    "p_welch_seeds",
    "p_questions",
    "questions_test",
    "a_only",
    "b_only",
    "significant",
)
"""Columns of :func:`compare`'s table (the corrected ``p_<correction>`` follows ``test``);
``a_only`` / ``b_only`` count questions only that side got fully right in its seed-averaged
answers (the discordant pairs); ``significant``: the interval excludes 0 (uncorrected)."""
CLUSTER_BY = "answer"
"""Default cluster key of the seed-level tests (a prediction's first reference answer)."""


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
        answer = rec.get("answer", rec.get("answers"))
        if isinstance(answer, (list, tuple)):
            answer = answer[0] if answer else None
        row = {"id": str(rec["id"]), "category": str(rec["category"]), "score": rec["score"]}
        missing_answer = answer is None or answer != answer or answer == ""
        rows.append({**row, "answer": None if missing_answer else str(answer)})
    df = pd.DataFrame(rows, columns=["id", "category", "score", "answer"])
    dup = df["id"][df["id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{where}: question ids appear twice: {dup[:5]}")
    return df.astype({"score": float}).set_index("id")


def load_seeds(side: Side) -> tuple[list[pd.DataFrame], list[str] | None]:
    """Per-seed scores of one side: a list of DataFrames indexed by question ``id`` with
    ``category``, ``score`` and ``answer`` (one per seed, same questions), and the seeds'
    names (from each folder's ``cell.json``; ``None`` when any is unknown)."""
    if isinstance(side, pd.DataFrame):
        return [_frame(side.reset_index().to_dict("records"), "DataFrame")], None
    if isinstance(side, (str, os.PathLike)):
        path = _predictions_path(Path(side))
        data = read_json(path)
        if isinstance(data, Mapping):  # `moe-vision eval` output: {"predictions": [...]}
            data = data.get("predictions", [])
        cell = path.parent / CELL_FILE
        name = str(read_json(cell).get("seed")) if cell.is_file() else None
        return [_frame(data, str(path))], None if name is None else [name]
    side = list(side)
    if side and all(isinstance(s, Mapping) for s in side):
        return [_frame(side, "predictions")], None
    if not side:
        raise ValueError("compare: a side is an empty list")
    loaded = [load_seeds(s) for s in side]
    frames = [f for fs, _ in loaded for f in fs]
    first = frames[0]
    for s, f in zip(side[1:], frames[1:]):
        if set(f.index) != set(first.index):
            raise ValueError(f"compare: {s} answered other questions than {side[0]}")
    names = [n for _, ns in loaded for n in (ns or [None])]
    known = None not in names and len(set(names)) == len(names)
    return [f.reindex(first.index) for f in frames], names if known else None


def load_scores(side: Side) -> pd.DataFrame:
    """Per-question scores of one side: DataFrame indexed by question ``id`` with
    ``category``, ``score`` (averaged over seeds when ``side`` is a sequence of folders) and
    ``answer``."""
    frames, _ = load_seeds(side)
    scores = pd.concat([f["score"] for f in frames], axis=1).mean(axis=1)
    return frames[0].assign(score=scores)


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
    correction: str = "holm",
    cluster_by: str | None = CLUSTER_BY,
) -> pd.DataFrame:
    """Comparison of ``a`` and ``b`` per category and overall (rows in that order).

    Args:
        a, b: the two models' predictions (see the module docstring).
        confidence: level of the difference's interval.
        n_boot: bootstrap replicates.
        seed: seed of the bootstraps (and of a Monte Carlo permutation test, if one is needed).
        correction: ``holm`` or ``bh`` across the table's rows (column ``p_<correction>``).
        cluster_by: ``"answer"``: seed-level tests cluster questions by their reference answer
            (where both sides recorded it); ``None``: every question its own cluster.

    Returns:
        One row per category plus ``overall``, columns :data:`COMPARE_COLUMNS` and
        ``p_<correction>``; ``difference`` is ``accuracy_a - accuracy_b``.
    """
    frames_a, names_a = load_seeds(a)
    frames_b, names_b = load_seeds(b)
    scores = aligned_scores(frames_a[0], frames_b[0])
    ids = scores.index
    mat_a = np.stack([f["score"].reindex(ids).to_numpy(float) for f in frames_a])  # (S_a, Q)
    mat_b = np.stack([f["score"].reindex(ids).to_numpy(float) for f in frames_b])  # (S_b, Q)
    keys = _cluster_keys(frames_a[0], frames_b[0], ids, cluster_by)
    seeded = len(frames_a) > 1 and len(frames_b) > 1
    cats = scores["category"].to_numpy()
    groups = [(c, cats == c) for c in sorted(set(cats))]
    groups.append((stats.OVERALL_CATEGORY, np.ones(len(ids), dtype=bool)))
    rows = []
    for category, mask in groups:
        sa, sb = mat_a[:, mask].mean(0), mat_b[:, mask].mean(0)
        p_q, q_test = stats.paired_test(sa, sb, seed)
        row = {
            "category": category,
            "n": int(mask.sum()),
            "seeds_a": len(frames_a),
            "seeds_b": len(frames_b),
            "accuracy_a": float(sa.mean()),
            "accuracy_b": float(sb.mean()),
            "p_welch_seeds": seedstats.welch_seeds(mat_a[:, mask].mean(1), mat_b[:, mask].mean(1)),
            "p_questions": p_q,
            "questions_test": q_test,
            "a_only": int(((sa == 1) & (sb < 1)).sum()),
            "b_only": int(((sb == 1) & (sa < 1)).sum()),
        }
        if seeded:
            est = seedstats.seed_difference(
                mat_a[:, mask], mat_b[:, mask], None if keys is None else keys[mask],
                names_a, names_b, confidence, n_boot, seed,
            )  # fmt: skip
            diff, lo, hi, p = est.estimate, est.lo, est.hi, est.p_value
            test = seedstats.TEST_HIERARCHICAL
        else:
            diff, lo, hi = stats.paired_bootstrap(sa, sb, confidence, n_boot, seed)
            p, test = p_q, q_test
        row.update(difference=diff, lo=lo, hi=hi, p_value=p, test=test)
        row["significant"] = bool(lo > 0 or hi < 0)
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
    table.insert(
        COMPARE_COLUMNS.index("test") + 1,
        f"p_{correction}",
        stats.adjust_p(table["p_value"].to_numpy(float), correction),
    )
    return table


def _cluster_keys(
    fa: pd.DataFrame, fb: pd.DataFrame, ids: pd.Index, cluster_by: str | None
) -> np.ndarray | None:
    """Per-question cluster keys (``None``: one cluster per question)."""
    if cluster_by is None:
        return None
    if cluster_by != CLUSTER_BY:
        raise ValueError(f"cluster_by must be {CLUSTER_BY!r} or None, got {cluster_by!r}")
    for f in (fa, fb):
        keys = f[CLUSTER_BY].reindex(ids)
        if keys.notna().all():
            return keys.to_numpy(object)
    return None


def format_compare(table: pd.DataFrame, label_a: str = "A", label_b: str = "B") -> str:
    """Terminal rendering of :func:`compare`'s table (accuracies and differences in points),
    with a footnote naming each test and the correction."""
    view = table.drop(columns=["questions_test", "significant"]).copy()
    for col in ("accuracy_a", "accuracy_b", "difference", "lo", "hi"):
        view[col] = (100 * view[col]).round(1)
    p_cols = [c for c in view.columns if c.startswith("p_")]
    for col in p_cols:
        view[col] = view[col].map(lambda p: "-" if p != p else f"{p:.3g}")
    tests = list(dict.fromkeys(table["test"]))
    codes = {t: chr(ord("a") + i) for i, t in enumerate(tests)}
    view["test"] = table["test"].map(codes)
    view = view.rename(columns={"accuracy_a": f"acc {label_a}", "accuracy_b": f"acc {label_b}"})
    notes = [f"test {codes[t]}: {t}" for t in tests]
    corrected = next(c for c in p_cols if c not in ("p_value", "p_welch_seeds", "p_questions"))
    method = stats.CORRECTIONS[corrected.removeprefix("p_")]
    notes.append(f"{corrected}: p_value corrected by {method} over the {len(table)} rows")
    notes.append(f"p_welch_seeds: {seedstats.TEST_WELCH}")
    q_tests = ", ".join(dict.fromkeys(table["questions_test"]))
    notes.append(f"p_questions: {q_tests} on seed-averaged answers (these models, not settings)")
    return view.to_string(index=False) + "\n" + "\n".join(notes)
