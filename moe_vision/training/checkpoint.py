"""Atomic, resumable training checkpoints.

A run folder holds ``checkpoints/ckpt-<seq>/`` folders, ``seq`` increasing. Each is written to
a hidden temporary folder first and renamed into place when complete, so a folder with the
final name is always whole; a run killed while writing leaves only a temporary folder, which
the next writer removes. Every checkpoint holds ``trainer_state.json`` (:class:`TrainerState`:
unit, epoch, batch position, counters) and either

* ``kind == "unit_end"``: ``model.safetensors``, the whole mixture model after a training unit
  (a stage, or one expert's pass of a per-expert stage), or
* ``kind == "mid"``: ``accelerate/``, :meth:`accelerate.Accelerator.save_state` of the unit
  being trained (model weights as safetensors, optimiser, scheduler, RNG states of every
  process), plus ``base``, the ``unit_end`` checkpoint the unit started from.

Resuming (:func:`latest_checkpoint`) reloads the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^ckpt-(\d{6})$")


@dataclass
class TrainerState:
    """Where training stands; everything needed to continue exactly.

    Attributes:
        kind: ``"unit_end"`` (a unit finished) or ``"mid"`` (inside a unit).
        unit: index of the unit (finished one for ``unit_end``, running one for ``mid``).
        unit_name: e.g. ``"prealign[0]"`` or ``"sft"``.
        epoch: epoch inside the unit (``mid`` only).
        batches_done: micro-batches of ``epoch`` already consumed by each process.
        optimizer_steps: optimiser steps taken in the unit.
        global_step: optimiser steps taken in the run.
        samples_seen: training samples consumed so far, all processes together.
        train_time_s: training wall time so far.
        nonfinite_skipped: NaN/inf losses skipped so far.
        base: the ``unit_end`` checkpoint the unit started from (``None``: fresh model).
        unit_reports: per-unit summaries of finished units.
    """

    kind: Literal["unit_end", "mid"]
    unit: int
    unit_name: str
    epoch: int = 0
    batches_done: int = 0
    optimizer_steps: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_time_s: float = 0.0
    nonfinite_skipped: int = 0
    base: str | None = None
    unit_reports: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``None``: none)."""
    found = _checkpoints(Path(root))
    return found[-1][1] if found else None


def next_checkpoint_dir(root: str | Path) -> tuple[Path, Path]:
    """``(final, tmp)`` folders of the next checkpoint; stale temporary folders are removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if p.name.startswith(".tmp-ckpt-"):
            shutil.rmtree(p, ignore_errors=True)
    found = _checkpoints(root)
    seq = found[-1][0] + 1 if found else 0
    final = root / f"ckpt-{seq:06d}"
    return final, root / f".tmp-{final.name}"


def write_state(folder: Path, state: TrainerState) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=1))


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written temporary checkpoint folder visible (atomic rename)."""
    os.replace(tmp, final)
    logger.info("checkpoint written: %s", final)


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and every ``unit_end`` one still referenced."""
    found = _checkpoints(Path(root))
    if keep < 1 or len(found) <= keep:
        return
    kept = [p for _, p in found[-keep:]]
    needed = {p.name for p in kept}
    for p in kept:
        st = TrainerState.load(p)
        if st.base:
            needed.add(st.base)
    # The newest unit_end checkpoint is always kept: it is what a fresh unit starts from.
    ends = [p for _, p in found if TrainerState.load(p).kind == "unit_end"]
    if ends:
        needed.add(ends[-1].name)
    for _, p in found:
        if p.name not in needed:
            shutil.rmtree(p, ignore_errors=True)
