"""Is a fresh run of a sweep consistent with the committed reference, and do its findings hold?

A run of the same sweep on another CPU (or thread count) does not give the same answers bit for
bit (floating point reductions differ, training drifts), so :func:`check_reference` asks the
statistical question instead, per setting and category:

* **the paired seed-level test** of fresh minus reference on the same questions
  (:func:`moe_vision.results.seeds.seed_difference`, paired within seed, questions clustered by
  their answer), Holm-corrected over every setting x category checked;
* **the reference's mean in the fresh seed-level interval**, at the simultaneous level
  ``1 - alpha / m`` (Bonferroni over the ``m`` rows, so a consistent run passes all rows 95% of
  the time);

and reports how many answers differ per seed (exact McNemar on each seed's 0/1 answers, a
measure of drift, not part of the verdict: a few points of drift in one seed are within the
seed-to-seed spread). A row is consistent when the corrected p is at least ``alpha`` and the
reference's mean lies in the interval.

**Findings** are data, not code: ``<reference>/<name>_findings.yaml`` lists each stated finding
(a setting, a category, a direction against the baseline setting, or against the finding's own
``baseline``: a twin control), checked on both runs with the corrected seed-level p-value
(:func:`moe_vision.results.summary.summarize`), corrected over the summary's table or over the
findings listed (``family``). A
finding that does not hold in the reference itself is reported as such and does not fail the
fresh run.

Reference layout (what ``moe-vision sweep --results-dir results`` writes): ``<name>.csv`` (one
row per cell), ``<name>_predictions.parquet`` (every cell's answers), ``<name>_summary.csv``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from moe_vision.results import seeds, stats
from moe_vision.results.summary import GROUP_COLUMNS, summarize
from moe_vision.results.table import (
    MANIFEST,
    OVERALL,
    STATUS_OK,
    accuracy_columns,
    collect_predictions,
    load,
)

FINDINGS_SUFFIX = "_findings.yaml"
DIRECTIONS = ("higher", "lower")


@dataclass
class ReferenceCheck:
    """Outcome of :func:`check_reference`.

    Attributes:
        rows: one row per setting x category: the setting's :data:`GROUP_COLUMNS`,
            ``category``, ``fresh``, ``reference`` (means over seeds), ``difference``, ``lo``,
            ``hi`` (seed-level), ``p_hier``, ``p_hier_holm``, ``fresh_lo``, ``fresh_hi`` (the
            fresh interval at the simultaneous level), ``in_interval``, ``answers_differ``,
            ``min_p_mcnemar_per_seed``, ``consistent``.
        findings: one row per finding: ``name``, ``in_reference``, ``in_fresh`` (holds),
            ``reference``/``fresh`` (``diff p`` text).
        missing: settings of the reference the fresh run lacks.
        consistent: every row consistent, and every finding that holds in the reference
            holds in the fresh run.
    """

    rows: pd.DataFrame
    findings: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    consistent: bool = False


def read_sweep(path: str | os.PathLike[str], name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, predictions)`` of a sweep folder (``sweep.json``) or of a results folder
    holding ``<name>.csv`` and ``<name>_predictions.parquet``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return load(path), collect_predictions(path)
    table, preds = path / f"{name}.csv", path / f"{name}_predictions.parquet"
    for f in (table, preds):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} not found: expected a sweep folder ({MANIFEST}) or a results folder with "
                f"{name}.csv and {name}_predictions.parquet (moe-vision sweep --results-dir)"
            )
    return load(table), pd.read_parquet(preds)


def _label(key: tuple[Any, ...]) -> str:
    d = dict(zip(GROUP_COLUMNS, key))
    return f"{d['experts']}, {d['fusion']}, {d['recipe']}"


def _settings(table: pd.DataFrame) -> dict[tuple[Any, ...], tuple[list[str], list[str]]]:
    ok = table[table["status"] == STATUS_OK] if "status" in table.columns else table
    ok = ok.astype({c: str for c in GROUP_COLUMNS})
    return {
        key: ([str(c) for c in g["cell_id"]], [str(s) for s in g["seed"]])
        for key, g in ok.groupby(list(GROUP_COLUMNS), sort=False, dropna=False)
    }


def _answers(preds: pd.DataFrame) -> pd.DataFrame:
    return preds.astype({"cell_id": str, "id": str}).pivot(
        index="cell_id", columns="id", values="score"
    )


def _keys(preds: pd.DataFrame) -> pd.Series | None:
    if "answer" not in preds.columns:
        return None
    keys = preds.drop_duplicates("id").set_index("id")["answer"]
    return keys if keys.notna().all() and (keys.astype(str) != "").all() else None


def check_reference(
    fresh: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    name: str = "default",
    alpha: float = 0.05,
    n_boot: int = stats.N_BOOT,
) -> ReferenceCheck:
    """Check the sweep run in ``fresh`` against ``reference`` (see the module docstring)."""
    ref_table, ref_preds = read_sweep(reference, name)
    new_table, new_preds = read_sweep(fresh, name)
    ref_ans, new_ans = _answers(ref_preds), _answers(new_preds)
    if set(ref_ans.columns) != set(new_ans.columns):
        raise ValueError(
            f"{fresh} answered other questions than the reference {reference} "
            f"({len(new_ans.columns)} vs {len(ref_ans.columns)} ids): run the same sweep spec"
        )
    ids = ref_ans.columns
    new_ans = new_ans[ids]
    first = ref_preds.astype({"id": str}).drop_duplicates("id").set_index("id").reindex(ids)
    category = first["category"].astype(str).to_numpy()
    keys = _keys(new_preds) if _keys(new_preds) is not None else _keys(ref_preds)
    keys_arr = None if keys is None else keys.reindex(ids).astype(str).to_numpy(object)
    ref_sets, new_sets = _settings(ref_table), _settings(new_table)
    checked = [k for k in ref_sets if k in new_sets]
    cats = [c.split("/", 1)[1] for c in accuracy_columns(ref_table)]
    m = max(len(checked) * len(cats), 1)
    rows = []
    for key in checked:
        (ref_cells, ref_seeds), (new_cells, new_seeds) = ref_sets[key], new_sets[key]
        for cat in cats:
            mask = np.ones(len(ids), bool) if cat == stats.OVERALL_CATEGORY else category == cat
            xr = ref_ans.loc[ref_cells].to_numpy(float)[:, mask]
            xn = new_ans.loc[new_cells].to_numpy(float)[:, mask]
            k = None if keys_arr is None else keys_arr[mask]
            d = seeds.seed_difference(xn, xr, k, new_seeds, ref_seeds, n_boot=n_boot)
            band = seeds.seed_interval(xn, k, 1 - alpha / m, n_boot)
            ref_mean = float(xr.mean(1).mean())
            rows.append(
                {
                    **dict(zip(GROUP_COLUMNS, key)),
                    "category": cat,
                    "fresh": float(xn.mean(1).mean()),
                    "reference": ref_mean,
                    "difference": d.estimate,
                    "lo": d.lo,
                    "hi": d.hi,
                    "p_hier": d.p_value,
                    "fresh_lo": band.lo,
                    "fresh_hi": band.hi,
                    "in_interval": bool(band.lo - 1e-12 <= ref_mean <= band.hi + 1e-12),
                    **_drift(xn, xr, new_seeds, ref_seeds),
                }
            )
    out = pd.DataFrame(rows)
    if out.empty:
        raise ValueError(f"{fresh} shares no setting with the reference {reference}")
    _check_summary(Path(reference) / f"{name}_summary.csv", out)
    out.insert(out.columns.get_loc("p_hier") + 1, "p_hier_holm", stats.adjust_p(out["p_hier"]))
    out["consistent"] = (out["p_hier_holm"].fillna(1.0) >= alpha) & out["in_interval"]
    findings = _check_findings(Path(reference), name, ref_table, ref_preds, new_table, new_preds)
    held = findings["in_reference"] if len(findings) else pd.Series(dtype=bool)
    kept = bool((findings.loc[held, "in_fresh"]).all()) if len(findings) else True
    missing = [_label(k) for k in ref_sets if k not in new_sets]
    return ReferenceCheck(out, findings, missing, bool(out["consistent"].all()) and kept)


def _check_summary(path: Path, rows: pd.DataFrame) -> None:
    """The committed summary's means must be those of the committed answers (else the
    reference is stale: regenerate it with ``moe-vision sweep --results-dir``)."""
    if not path.is_file():
        return
    summary = pd.read_csv(path).astype({c: str for c in GROUP_COLUMNS})
    merged = rows.merge(summary, on=list(GROUP_COLUMNS), how="inner")
    for _, r in merged.iterrows():
        column = f"accuracy/{r['category']}"
        if column in r.index and abs(float(r[column]) - r["reference"]) > 1e-6:
            raise ValueError(
                f"{path}: {column} of {r['experts']}, {r['fusion']} is {r[column]:.6f}, but the "
                f"reference answers give {r['reference']:.6f}: the reference is stale"
            )


def _drift(
    xn: np.ndarray, xr: np.ndarray, new_seeds: list[str], ref_seeds: list[str]
) -> dict[str, Any]:
    """Answers that differ between the runs' same seeds, and the smallest per-seed exact
    McNemar p-value (0/1 answers; NaN where no seed is shared or scores are fractional)."""
    shared = [s for s in new_seeds if s in ref_seeds]
    differ, pmin = 0, math.nan
    for s in shared:
        a, b = xn[new_seeds.index(s)], xr[ref_seeds.index(s)]
        differ += int((a != b).sum())
        if stats.is_binary(a) and stats.is_binary(b):
            p = stats.mcnemar_exact(a, b)[0]
            pmin = p if pmin != pmin else min(pmin, p)
    return {"answers_differ": differ, "min_p_mcnemar_per_seed": pmin}


FAMILIES = ("table", "findings")
"""What a finding's p-value is corrected over: every setting x category of the summary, or the
findings listed in the file (the hypotheses stated before the run)."""


def read_findings(path: Path) -> dict[str, Any]:
    """The findings file (module docstring), validated: ``baseline`` and each finding's
    ``setting`` map settings columns to values, ``category`` is a category name,
    ``direction`` is ``higher`` or ``lower``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("findings", []), list):
        raise ValueError(f"{path}: expected a mapping with a 'findings' list")
    if data.get("correction", "holm") not in stats.CORRECTIONS:
        raise ValueError(f"{path}: correction must be one of {sorted(stats.CORRECTIONS)}")
    for i, f in enumerate(data.get("findings", [])):
        ok = isinstance(f, dict) and isinstance(f.get("setting"), dict) and "category" in f
        if not ok or f.get("direction", "higher") not in DIRECTIONS:
            raise ValueError(
                f"{path}: finding {i} needs name, setting (a mapping of {list(GROUP_COLUMNS)}), "
                f"category and direction ({' or '.join(DIRECTIONS)}); got {f!r}"
            )
    if not isinstance(data.get("baseline"), dict):
        raise ValueError(f"{path}: 'baseline' must map settings columns to values")
    if data.get("family", "table") not in FAMILIES:
        raise ValueError(f"{path}: family must be one of {list(FAMILIES)}, got {data['family']!r}")
    for i, f in enumerate(data.get("findings", [])):
        if not isinstance(f.get("baseline", {}), dict):
            raise ValueError(f"{path}: finding {i}: 'baseline' must map settings columns to values")
    return data


def _index(summary: pd.DataFrame, setting: dict[str, Any], where: str) -> int:
    hit = np.ones(len(summary), bool)
    for col, value in setting.items():
        if col not in GROUP_COLUMNS:
            raise ValueError(f"{where}: unknown settings column {col!r}; use {GROUP_COLUMNS}")
        hit &= summary[col].astype(str).to_numpy() == str(value)
    if hit.sum() != 1:
        raise ValueError(f"{where}: {setting} matches {int(hit.sum())} settings, need exactly 1")
    return int(np.flatnonzero(hit)[0])


def _holds(
    table: pd.DataFrame, preds: pd.DataFrame, spec: dict[str, Any], where: str
) -> list[tuple[bool, str]]:
    """Whether each finding holds: its difference has the stated direction and its corrected
    p-value is below ``alpha``. ``family: table`` (default) takes the p-value corrected over
    every setting x category of the summary against the finding's baseline; ``family:
    findings`` corrects the raw seed-level p-values over the findings listed (the pre-stated
    hypotheses), the table's correction being reported beside it."""
    corr = spec["correction"]
    probe = summarize(table, predictions=preds, n_boot=500, correction=corr)
    summaries: dict[int, pd.DataFrame] = {}
    measured = []
    for f in spec["findings"]:
        label = f"{where} finding {f.get('name')!r}"
        base = _index(probe, f.get("baseline", spec["baseline"]), f"{label} baseline")
        if base not in summaries:
            summaries[base] = probe if base == 0 else summarize(
                table, predictions=preds, n_boot=500, baseline=base, correction=corr
            )  # fmt: skip
        summary = summaries[base]
        i = _index(summary, f["setting"], label)
        col = f"accuracy/{f['category']}" if f["category"] != "overall" else OVERALL
        measured.append(
            (
                float(summary.loc[i, f"{col}/diff"]),
                float(summary.loc[i, f"{col}/p_hier"]),
                float(summary.loc[i, f"{col}/p_hier_{corr}"]),
            )
        )
    family = spec.get("family", "table")
    within = stats.adjust_p([m[1] for m in measured], corr)
    out = []
    for f, (diff, raw, over_table), p_findings in zip(spec["findings"], measured, within):
        p = float(p_findings) if family == "findings" else over_table
        sign = diff > 0 if f.get("direction", "higher") == "higher" else diff < 0
        note = (
            f"{100 * diff:+.1f} pts, p={raw:.2g} (uncorrected), {corr} over the findings "
            f"{float(p_findings):.2g}, over the table {over_table:.2g}"
        )
        out.append((bool(sign and p < spec["alpha"]), note))
    return out


def _check_findings(
    reference: Path,
    name: str,
    ref_table: pd.DataFrame,
    ref_preds: pd.DataFrame,
    new_table: pd.DataFrame,
    new_preds: pd.DataFrame,
) -> pd.DataFrame:
    path = reference / f"{name}{FINDINGS_SUFFIX}"
    columns = ["name", "in_reference", "reference", "in_fresh", "fresh"]
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    spec = read_findings(path)
    spec.setdefault("correction", "holm")
    spec.setdefault("alpha", 0.05)
    if not spec["findings"]:
        return pd.DataFrame(columns=columns)
    ref = _holds(ref_table, ref_preds, spec, str(path))
    new = _holds(new_table, new_preds, spec, str(path))
    rows = [
        [f.get("name", f"finding {i}"), r[0], r[1], n[0], n[1]]
        for i, (f, r, n) in enumerate(zip(spec["findings"], ref, new))
    ]
    return pd.DataFrame(rows, columns=columns)


def format_check(check: ReferenceCheck) -> str:
    """One line per setting, the findings, and the verdict."""
    lines = []
    for _, g in check.rows.groupby(list(GROUP_COLUMNS), sort=False, dropna=False):
        r0 = g.iloc[0]
        label = f"{r0['experts']}, {r0['fusion']}"
        worst = g.loc[g["difference"].abs().idxmax()]
        differ = int(g.loc[g["category"] == stats.OVERALL_CATEGORY, "answers_differ"].sum())
        bad = g[~g["consistent"]]
        state = "consistent" if bad.empty else "INCONSISTENT"
        detail = ", ".join(
            f"{b['category']} {100 * b['difference']:+.1f} pts (p_holm {b['p_hier_holm']:.2g}"
            f"{'' if b['in_interval'] else ', reference outside the fresh interval'})"
            for _, b in bad.iterrows()
        )
        lines.append(
            f"{label}: {state}; largest |difference| {100 * worst['difference']:+.1f} pts "
            f"({worst['category']}); {differ} answers differ over shared seeds"
            + (f"; {detail}" if detail else "")
        )
    for name in check.missing:
        lines.append(f"{name}: not in the fresh run (not checked)")
    for _, f in check.findings.iterrows():
        if not f["in_reference"]:
            state = f"does not hold in the reference either ({f['reference']})"
        else:
            state = "holds" if f["in_fresh"] else "NO LONGER HOLDS"
        lines.append(f"finding '{f['name']}': {state}; fresh {f['fresh']}")
    verdict = "CONSISTENT with the reference" if check.consistent else "NOT CONSISTENT"
    lines.append(
        f"verdict: {verdict} ({len(check.rows)} setting x category rows; test: fresh - "
        f"reference, {seeds.TEST_HIERARCHICAL}, Holm-corrected; and the reference mean in the "
        f"fresh seed-level interval, Bonferroni-simultaneous)"
    )
    return "\n".join(lines)
