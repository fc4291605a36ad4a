"""Whole-dataset validation (``moe-vision data check``): every record, in worker processes.

:func:`check_files` runs :meth:`~moe_vision.data.validation.RecordValidator.validate` (images
decoded) over every record of each file or mixture through a DataLoader with workers, and
returns a JSON-able report::

    {"files": [...], "records": N, "ok": n, "dropped": d,
     "layouts": {"text_only": a, "single_image": b, "multi_image": c},
     "problems": {kind: {"count": k, "examples": [{"where": ..., "id": ..., "problem": ...}]}},
     "refused_files": [{"file": ..., "problem": ...}],
     "duplicate_ids": {"count": k, "examples": [{"id": ..., "where": ..., "first": ...}]}}

``dropped`` counts the records training would skip (or stop on); text-only and multi-image
records are valid layouts and only counted. ``duplicate_ids`` counts records whose ``id`` an
earlier, different record already has (a mixture's repeats of one record are not counted):
evaluation refuses them, since questions are paired by id; training keeps them (LLaVA's own
mixtures repeat ids), so they are reported, not dropped. A file that cannot be read as a whole
(missing, not a list, broken JSON structure) is listed in ``refused_files`` and the other files
are still checked.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from moe_vision.data.llava import resolve_data
from moe_vision.data.records import DataError, RecordProblem, record_id
from moe_vision.data.validation import RecordValidator


class _Checks(Dataset):
    """Record ``i`` -> ``(layout, problem kind or None, where, id, message, has id)``."""

    def __init__(self, path: Path, image_root: Path | None, validator: RecordValidator, seed: int):
        self.index, self.roots, _ = resolve_data(path, image_root, seed)
        self.validator = validator

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[str | None, str | None, str, str, str, bool]:
        position = int(self.index.position[i])
        rid, layout, has_id = f"#{position}", None, False
        try:
            record = self.index.read(i)
            rid = record_id(record, position)
            has_id = isinstance(record, dict) and "id" in record
            root = self.roots[int(self.index.file_id[i])]
            sample = self.validator.validate(record, position, root, decode=True)
            n = len(sample.image_paths)
            layout = "text_only" if n == 0 else "single_image" if n == 1 else "multi_image"
            return layout, None, self.index.where(i), rid, "", has_id
        except RecordProblem as err:
            return layout, err.kind, self.index.where(i), rid, str(err), has_id


def check_files(
    files: Sequence[str | os.PathLike[str]],
    image_root: str | os.PathLike[str] | None,
    validator: RecordValidator,
    workers: int = 2,
    examples: int = 3,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The report of the module docstring for ``files`` (data files or mixture YAMLs)."""
    layouts: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    found: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    total = 0
    first_with_id: dict[str, str] = {}  # id -> where its first record is
    repeats: list[dict[str, str]] = []
    refused: list[dict[str, str]] = []
    for f in files:
        try:
            ds = _Checks(Path(f), Path(image_root) if image_root else None, validator, seed)
        except DataError as err:  # the file as a whole (missing, not a list, broken JSON)
            refused.append({"file": str(f), "problem": str(err)})
            continue
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=workers, collate_fn=list
        )
        for batch in loader:
            for layout, kind, where, rid, message, has_id in batch:
                total += 1
                seen = first_with_id.setdefault(rid, where) if has_id else where
                if seen != where:  # another record (a mixture's repeats are the same record)
                    repeats.append({"id": rid, "where": where, "first": seen})
                if layout is not None:
                    layouts[layout] += 1
                if kind is not None:
                    counts[kind] += 1
                    if len(found[kind]) < examples:
                        found[kind].append({"where": where, "id": rid, "problem": message})
    return {
        "files": [str(f) for f in files],
        "records": total,
        "ok": total - sum(counts.values()),
        "dropped": sum(counts.values()),
        "layouts": {k: layouts.get(k, 0) for k in ("text_only", "single_image", "multi_image")},
        "problems": {k: {"count": counts[k], "examples": found[k]} for k in sorted(counts)},
        "refused_files": refused,
        "duplicate_ids": {"count": len(repeats), "examples": repeats[:examples]},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (problem, count, first example)."""
    lines = [
        f"{report['records']} records in {len(report['files'])} file(s): {report['ok']} ok, "
        f"{report['dropped']} would be dropped",
        "layouts: " + ", ".join(f"{k} {v}" for k, v in report["layouts"].items()),
    ]
    dup = report["duplicate_ids"]
    if dup["count"]:
        ex = dup["examples"][0]
        lines.append(
            f"duplicate ids: {dup['count']} record(s) reuse an id, e.g. {ex['id']!r} at "
            f"{ex['where']}, first at {ex['first']} (evaluation refuses them; training keeps them)"
        )
    for r in report["refused_files"]:
        lines.append(f"refused file {r['file']}: {r['problem']}")
    if report["problems"]:
        width = max(len(k) for k in report["problems"])
        lines.append(f"{'problem':<{width}}  {'count':>8}  first examples")
        for kind, entry in report["problems"].items():
            for j, ex in enumerate(entry["examples"]):
                head = f"{kind:<{width}}  {entry['count']:>8}" if j == 0 else " " * (width + 10)
                lines.append(f"{head}  {ex['where']} (id {ex['id']!r}): {ex['problem']}")
    return "\n".join(lines)
