"""Saving a training run and finding where to resume it, across all processes.

:func:`checkpoint_due` says when a mid-unit checkpoint is due, :func:`save_checkpoint` writes
one collectively (every process calls it: accelerate gathers FSDP/DeepSpeed shards and every
rank writes its RNG state), :func:`find_restore_point` lets the main process pick the newest
usable checkpoint (one that also fits the run's units: :func:`check_fits_units`) and tells the
others, :func:`last_unit_end` names the checkpoint a mid-unit
one builds on, and :func:`load_weights` loads saved weights into a model. The files themselves
(atomic folders, validation, pruning) are :mod:`moe_vision.training.checkpoint`'s;
:class:`~moe_vision.training.trainer.Trainer` uses these helpers and re-exports
:func:`load_weights`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from moe_vision.training import checkpoint as ckpt
from moe_vision.training.options import TrainOptions
from moe_vision.training.units import TrainUnit


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load ``accelerator.save_model`` output (one file or sharded) into ``model`` in place.

    Tied parameters (saved once) are allowed to be missing; anything else missing or
    unexpected raises, naming the keys.
    """
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for path in ckpt.weight_files(folder):
        state.update(ckpt.read_safetensors(path))  # CheckpointError names a missing/bad file
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    loaded = set(state)
    really_missing = [
        k
        for k in missing
        if not any(a in loaded for names in aliases.values() if k in names for a in names)
    ]
    if really_missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not fit the model: missing {really_missing[:10]}, "
            f"unexpected {list(unexpected)[:10]}"
        )


def save_checkpoint(
    acc: Accelerator,
    root: Path,
    state: ckpt.TrainerState,
    kind: str,
    base: str | None,
    model: nn.Module,
    keep: int,
) -> str:
    """Write a checkpoint under ``root`` on every process (collective); returns its folder name.

    ``kind == "mid"`` saves accelerate's state (model, optimiser, scheduler, RNG);
    ``kind == "unit_end"`` saves ``model`` (the mixture, prepared or not) with
    ``accelerator.save_model`` (gathers FSDP/DeepSpeed shards, safetensors). The main process
    records ``kind`` and ``base`` in ``state``, writes it, commits the folder and keeps the
    newest ``keep`` checkpoints.
    """
    final, tmp = ckpt.next_checkpoint_dir(root) if acc.is_main_process else (None, None)
    names = [str(final), str(tmp)]
    if acc.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(names, src=0)
    final, tmp = Path(names[0]), Path(names[1])
    tmp.mkdir(parents=True, exist_ok=True)  # every rank writes into it (RNG states)
    acc.wait_for_everyone()
    if kind == "mid":
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
    else:
        acc.save_model(model, str(tmp), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        state.kind = kind  # type: ignore[assignment]
        state.base = base
        ckpt.write_state(tmp, state)
        ckpt.commit(tmp, final)
        ckpt.prune(root, keep)
    acc.wait_for_everyone()
    return final.name


def checkpoint_due(
    acc: Accelerator, options: TrainOptions, optimizer_steps: int, last_checkpoint: float
) -> bool:
    """Whether a mid-unit checkpoint is due after optimiser step ``optimizer_steps`` of the unit:
    every ``options.checkpoint_every`` steps, or ``options.checkpoint_interval_s`` after the last
    one (``last_checkpoint``, a ``time.monotonic()`` reading). A checkpoint is collective, so
    when any process's clock has passed the interval, all write it."""
    every, interval = options.checkpoint_every, options.checkpoint_interval_s
    if every and optimizer_steps % every == 0:
        return True
    if not interval:
        return False
    due = time.monotonic() - last_checkpoint >= interval
    if acc.num_processes > 1:
        flag = torch.tensor([float(due)], device=acc.device)
        due = bool(acc.reduce(flag, reduction="sum").item() > 0)
    return due


def check_fits_units(units: Sequence[TrainUnit], state: ckpt.TrainerState, path: Path) -> None:
    """Refuse (:class:`~.checkpoint.CheckpointError` naming ``path``) a checkpoint whose unit,
    unit name or epoch does not exist among ``units`` (the run's expanded recipe)."""
    if state.unit >= len(units) or units[state.unit].name != state.unit_name:
        raise ckpt.CheckpointError(
            f"{path}: unit {state.unit} {state.unit_name!r} is not one of this run's units "
            f"{[u.name for u in units]}"
        )
    epochs = units[state.unit].stage.epochs
    if state.kind == "mid" and state.epoch >= epochs:
        raise ckpt.CheckpointError(
            f"{path}: epoch {state.epoch} out of range (unit {state.unit_name!r} has {epochs} "
            "epochs)"
        )
    if state.optimizer_steps > state.global_step:
        raise ckpt.CheckpointError(
            f"{path}: optimizer_steps {state.optimizer_steps} exceeds global_step "
            f"{state.global_step}"
        )


def find_restore_point(
    acc: Accelerator,
    root: Path,
    check: Callable[[ckpt.TrainerState, Path], None] | None = None,
) -> tuple[ckpt.TrainerState, Path, Path | None] | None:
    """The newest usable checkpoint under ``root``: ``(its state, its folder, the unit_end
    folder whose weights to load)``, or ``None`` when there is none.

    The main process picks it (:func:`~.checkpoint.find_resumable`: damaged newer ones, and
    ones that ``check`` refuses, are logged and moved aside) and tells the others. The weights
    to load are the checkpoint's own for a ``unit_end`` one, else those of the ``unit_end``
    checkpoint it builds on (``None`` when it builds on none: a mid-unit checkpoint of the
    first unit).
    """
    names = [None]
    if acc.is_main_process:
        found = ckpt.find_resumable(root, acc.num_processes, check)
        names = [found[0].name if found else None]
    if acc.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(names, src=0)
    if names[0] is None:
        return None
    latest = root / names[0]
    state = ckpt.TrainerState.load(latest)
    end = latest if state.kind == "unit_end" else (root / state.base if state.base else None)
    return state, latest, end


def last_unit_end(root: Path) -> str | None:
    """The folder name of the newest ``unit_end`` checkpoint under ``root`` (the one the newest
    checkpoint is or builds on); ``None`` when there is none."""
    latest = ckpt.latest_checkpoint(root)
    while latest is not None:
        st = ckpt.TrainerState.load(latest)
        return latest.name if st.kind == "unit_end" else st.base
    return None
