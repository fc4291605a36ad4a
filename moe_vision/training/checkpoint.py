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

Every checkpoint also holds ``manifest.json``, written last (atomically, before the folder is
renamed into place): the size and sha256 of every other file in it (:func:`write_manifest`).

Resuming (:func:`find_resumable`) takes the newest checkpoint that validates completely
(:func:`validate`: the manifest lists exactly the files present and each one's size and sha256
match, so a missing file, a stray one or a single flipped byte anywhere is caught; the files a
resume needs are all there (a ``mid`` one: model weights, optimiser, scheduler, one RNG file
per process); ``trainer_state.json`` parses and its numbers are in range (:class:`TrainerState`;
the trainer checks them against the recipe too); every safetensors file's header parses and its
tensors load; every accelerate state file loads with ``weights_only=True``), and the ``base``
it needs as well. A damaged one is moved aside to
``ckpt-<seq>.damaged-<n>/`` (kept for inspection, never read again) and the reason is logged,
naming the file; new checkpoints are numbered past every folder ever written, damaged ones
included, so a write never collides with a damaged folder. Every error here names the file
(:class:`CheckpointError`).

Nothing here unpickles code: accelerate's optimiser, scheduler and RNG files are pickles, and
they are read only through :func:`accelerate.utils.load`, which uses ``torch.load(...,
weights_only=True)`` with numpy's RNG types allow-listed (accelerate >= 1.1 with torch >= 2.4;
the floors are in ``pyproject.toml``). A pickle that needs anything else is refused and its
checkpoint treated as damaged. Checkpoints belong to the run that wrote them; a trained model
is shared as ``model/`` (safetensors + JSON), which
:meth:`~moe_vision.model.mllm.MoEVisionModel.from_pretrained` reads without touching
``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ACCELERATE_DIR = "accelerate"
MANIFEST_FILE = "manifest.json"
_COUNTERS = ("epoch", "batches_done", "optimizer_steps", "global_step", "samples_seen")
_COUNTERS += ("nonfinite_skipped",)
_NAME = re.compile(r"^ckpt-(\d{6})$")
_ANY_NAME = re.compile(r"^ckpt-(\d{6})(?:\.damaged-\d+)?$")


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or inconsistent; the message names the file."""


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
        """Read ``folder/trainer_state.json``; :class:`CheckpointError` names the file."""
        path = folder / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not readable as JSON ({err})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not {"kind", "unit", "unit_name"} <= set(data):
            raise CheckpointError(
                f"{path}: expected an object with kind, unit and unit_name, got {str(data)[:80]!r}"
            )
        if set(data) - names or data["kind"] not in ("unit_end", "mid"):
            raise CheckpointError(
                f"{path}: unexpected fields {sorted(set(data) - names)} or kind {data['kind']!r}"
            )
        state = cls(**data)
        state.check_ranges(path)
        return state

    def check_ranges(self, path: Path) -> None:
        """Raise :class:`CheckpointError` (naming ``path``) unless every field has its type and
        a possible value: counters and ``unit`` non-negative integers, ``train_time_s`` finite
        and non-negative, ``base`` a checkpoint name or ``None``. Limits that depend on the
        recipe (unit count, epochs, batches per epoch) are checked by the trainer."""
        bad: list[str] = []
        for name in ("unit", *_COUNTERS):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                bad.append(f"{name}={value!r} (expected an integer >= 0)")
        t = self.train_time_s
        if type(t) not in (int, float) or not math.isfinite(t) or t < 0:
            bad.append(f"train_time_s={t!r} (expected a finite number >= 0)")
        if not isinstance(self.unit_name, str) or not self.unit_name:
            bad.append(f"unit_name={self.unit_name!r} (expected a unit's name)")
        if self.base is not None and not (isinstance(self.base, str) and _NAME.match(self.base)):
            bad.append(f"base={self.base!r} (expected a checkpoint name like 'ckpt-000001')")
        if not isinstance(self.unit_reports, list) or not all(
            isinstance(r, dict) for r in self.unit_reports
        ):
            bad.append("unit_reports (expected a list of objects)")
        if bad:
            raise CheckpointError(f"{path}: out of range: {'; '.join(bad)}")


# ------------------------------------------------------------------------------ reading files
def read_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of a safetensors file; :class:`CheckpointError` names the file.

    ``safe_open`` checks that the header parses and that the file holds exactly the bytes the
    header declares (a truncated file fails here); every tensor is then read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an ``accelerator.save_model`` folder (one file or shards)."""
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        return [folder / WEIGHTS_FILE]
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
    return [folder / name for name in sorted(set(shards))]


def load_pickled_state(path: Path) -> Any:
    """An accelerate state file (optimiser, scheduler, RNG) with ``weights_only=True``.

    Only tensors, containers and numpy's RNG types are rebuilt (accelerate's allow-list); a
    pickle that asks for anything else is refused. :class:`CheckpointError` names the file.
    """
    from accelerate.utils import load

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad pickle
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused or unreadable with weights_only=True ({first[:200]})"
        ) from None


def check_rng_restored(state_dir: Path, process_index: int) -> None:
    """Raise unless the CPU RNG now equals this process's saved RNG state.

    ``accelerator.load_state`` swallows any error while loading RNG states (it logs "Could not
    load random states" at INFO and goes on); this makes that failure loud.
    """
    import torch

    path = state_dir / f"random_states_{process_index}.pkl"
    saved = load_pickled_state(path)
    if not torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]):
        raise CheckpointError(f"{path}: the RNG state was not restored by accelerator.load_state")


# ------------------------------------------------------------------------------ manifest
def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the manifest, as sorted POSIX relative paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE
    )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file of ``folder`` in ``folder/manifest.json``.

    Called once every other file is written; the manifest goes to a temporary name first and
    is renamed, so a manifest that exists is complete.
    """
    files = {
        rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
        for rel in _files(folder)
    }
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_FILE)


def verify_manifest(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file that does not match the manifest:
    missing, not listed, of another size or another sha256 (the manifest missing or
    unreadable is an error too)."""
    path = folder / MANIFEST_FILE
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        listed = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing (every checkpoint lists its files' sha256 there)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a checkpoint manifest ({err!r})") from None
    present = set(_files(folder))
    for rel in sorted(set(listed) - present):
        raise CheckpointError(f"{folder / rel}: missing (listed in {MANIFEST_FILE})")
    for rel in sorted(present - set(listed)):
        raise CheckpointError(f"{folder / rel}: not listed in {MANIFEST_FILE} (not written here)")
    for rel, (size, digest) in sorted(listed.items()):
        actual = (folder / rel).stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{folder / rel}: {actual} bytes, {MANIFEST_FILE} recorded {size} (damaged)"
            )
        if _sha256(folder / rel) != digest:
            raise CheckpointError(
                f"{folder / rel}: sha256 differs from the one {MANIFEST_FILE} recorded (damaged)"
            )


# ------------------------------------------------------------------------------ validation
def _required_state_files(acc: Path, num_processes: int) -> None:
    """Raise unless ``acc`` (accelerate's state) holds what a resume loads: model weights, an
    optimiser and a scheduler (under DeepSpeed both are inside its ``pytorch_model*`` folder)
    and one RNG file per process."""
    names = [p.name for p in acc.iterdir()]
    for r in range(num_processes):
        if f"random_states_{r}.pkl" not in names:
            raise CheckpointError(f"{acc / f'random_states_{r}.pkl'}: missing")
    if not any(n.startswith(("model", "pytorch_model")) for n in names):
        raise CheckpointError(f"{acc}: no model weights (model*.safetensors) in it")
    if any(n.startswith("pytorch_model") and (acc / n).is_dir() for n in names):
        return  # DeepSpeed: optimiser and scheduler are saved in the engine's folder
    for what in ("optimizer", "scheduler"):
        if not any(n.startswith(what) for n in names):
            raise CheckpointError(f"{acc / (what + '.bin')}: missing (a resume loads it)")


def validate(folder: Path, num_processes: int = 1) -> TrainerState:
    """Check one checkpoint completely; its state, or :class:`CheckpointError` naming the file.

    Every file must match the manifest (:func:`verify_manifest`). ``unit_end``: the weights
    (one file or the shards of the index). ``mid``: every file of ``accelerate/`` (safetensors
    read, pickles loaded with ``weights_only=True``), with the model weights, optimiser,
    scheduler and one RNG file per process required. The ``base`` of a ``mid`` checkpoint is
    checked by :func:`find_resumable`.
    """
    verify_manifest(folder)
    state = TrainerState.load(folder)
    if state.kind == "unit_end":
        for path in weight_files(folder):
            read_safetensors(path)
        return state
    acc = folder / ACCELERATE_DIR
    if not acc.is_dir():
        raise CheckpointError(f"{acc}: missing (a 'mid' checkpoint needs accelerate's state)")
    _required_state_files(acc, num_processes)
    for path in sorted(acc.iterdir()):
        if path.suffix == ".safetensors":
            read_safetensors(path)
        elif path.suffix in (".bin", ".pkl") and path.is_file():
            load_pickled_state(path)
    return state


def quarantine(folder: Path, reason: str) -> Path:
    """Move a damaged checkpoint aside to ``<name>.damaged-<n>`` (never read again)."""
    n = 0
    while (target := folder.with_name(f"{folder.name}.damaged-{n}")).exists():
        n += 1
    os.replace(folder, target)
    logger.warning("skipping damaged checkpoint %s: %s; moved aside to %s", folder, reason, target)
    return target


def find_resumable(
    root: str | Path,
    num_processes: int = 1,
    check: Callable[[TrainerState, Path], None] | None = None,
) -> tuple[Path, TrainerState] | None:
    """The newest checkpoint under ``root`` that validates, with its ``base``; ``None``: none.

    ``check(state, state_file)`` may refuse a checkpoint that validates but does not fit the
    run (the trainer checks the unit, its name and the epoch against the recipe) by raising
    :class:`CheckpointError`. Newer damaged or refused ones (and ``mid`` ones whose ``base`` is
    damaged or gone) are moved aside with :func:`quarantine`, each logged with the reason.
    Call on the main process only.
    """
    root = Path(root)
    bad: dict[str, str] = {}
    for _, folder in reversed(_checkpoints(root)):
        try:
            state = validate(folder, num_processes)
            if check is not None:
                check(state, folder / STATE_FILE)
        except CheckpointError as err:
            bad[folder.name] = str(err)
            continue
        if state.base is not None:
            base = root / state.base
            if state.base in bad or not base.is_dir():
                why = bad.get(state.base, f"{base}: missing")
                bad[folder.name] = f"its base checkpoint is unusable ({why})"
                continue
            try:
                base_state = validate(base, num_processes)
                if base_state.kind != "unit_end" or base_state.unit >= state.unit:
                    raise CheckpointError(
                        f"{base / STATE_FILE}: not a 'unit_end' checkpoint of an earlier unit"
                    )
                if check is not None:
                    check(base_state, base / STATE_FILE)
            except CheckpointError as err:
                bad[state.base] = str(err)
                bad[folder.name] = f"its base checkpoint is unusable ({err})"
                continue
        for name, reason in bad.items():
            quarantine(root / name, reason)
        return folder, state
    for name, reason in bad.items():
        quarantine(root / name, reason)
    if bad:
        logger.warning("no usable checkpoint under %s: training starts from the beginning", root)
    return None


# ------------------------------------------------------------------------------ writing
def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint folder under ``root`` (``None``: none); not validated."""
    found = _checkpoints(Path(root))
    return found[-1][1] if found else None


def next_checkpoint_dir(root: str | Path) -> tuple[Path, Path]:
    """``(final, tmp)`` folders of the next checkpoint; stale temporary folders are removed.

    The number follows every ``ckpt-<seq>`` name present, damaged ones included.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seqs = [-1]
    for p in root.iterdir():
        if p.name.startswith(".tmp-ckpt-"):
            shutil.rmtree(p, ignore_errors=True)
        elif m := _ANY_NAME.match(p.name):
            seqs.append(int(m.group(1)))
    final = root / f"ckpt-{max(seqs) + 1:06d}"
    return final, root / f".tmp-{final.name}"


def write_state(folder: Path, state: TrainerState) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=1), encoding="utf-8")


def commit(tmp: Path, final: Path) -> None:
    """Record every file's checksum (:func:`write_manifest`), then make the fully written
    temporary checkpoint folder visible (atomic rename)."""
    write_manifest(tmp)
    os.replace(tmp, final)
    files = sorted(p.name for p in final.iterdir())
    logger.info("checkpoint written: %s (%s)", final, ", ".join(files))


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and every ``unit_end`` one still referenced."""
    found = _checkpoints(Path(root))
    if keep < 1 or len(found) <= keep:
        return
    states: dict[str, TrainerState | None] = {}
    for _, p in found:
        try:
            states[p.name] = TrainerState.load(p)
        except CheckpointError as err:  # not ours to delete: find_resumable moves it aside
            logger.warning("not pruning %s: %s", p, err)
            states[p.name] = None
    kept = [p for _, p in found[-keep:]]
    needed = {p.name for p in kept} | {n for n, st in states.items() if st is None}
    for p in kept:
        st = states[p.name]
        if st is not None and st.base:
            needed.add(st.base)
    # The newest unit_end checkpoint is always kept: it is what a fresh unit starts from.
    ends = [p for _, p in found if (st := states[p.name]) is not None and st.kind == "unit_end"]
    if ends:
        needed.add(ends[-1].name)
    for _, p in found:
        if p.name not in needed:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------ accelerate logs
class _NamesMissingFile(logging.Filter):
    """Drops accelerate's "... saved in <path>" lines whose file does not exist.

    ``accelerator.save_model`` logs ``pytorch_model.bin`` while it writes ``model.safetensors``,
    and ``save_state`` logs ``sampler.bin`` for a sampler it does not save; :func:`commit` logs
    the files a checkpoint really holds.
    """

    _SAVED_IN = re.compile(r" saved in (.+?)\s*$")

    def filter(self, record: logging.LogRecord) -> bool:
        m = self._SAVED_IN.search(record.getMessage())
        return m is None or Path(m.group(1)).exists()


def quiet_accelerate_file_logs() -> None:
    """Install :class:`_NamesMissingFile` on accelerate's checkpoint loggers (idempotent)."""
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _NamesMissingFile) for f in lg.filters):
            lg.addFilter(_NamesMissingFile())
