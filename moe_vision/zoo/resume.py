"""Resuming a killed pretraining run (:func:`moe_vision.zoo.pretrain` with ``resume_dir``).

The loop's whole state (the objective's modules and buffers, AdamW, the schedule, torch's RNG,
the losses so far and the time spent) goes into one file, ``<resume_dir>/<name>.resume.pt``,
written atomically every ``checkpoint_every_s`` seconds of training. Scenes are a function of
``(seed, step)``, so a run restarted from it ends with the same weights and losses as one that
was never stopped (tested for every objective). A checkpoint of another run (another config or
objective) or a damaged one is set aside with a warning, and the run starts from step 0. The
file is removed once the weights are written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".resume.pt"
CHECKPOINT_EVERY_S = 60.0
"""Seconds of training between two checkpoints (the default of ``pretrain``)."""


def checkpoint_path(folder: str | os.PathLike[str], name: str) -> Path:
    """Where pretraining ``name`` into ``folder`` keeps its resume state."""
    return Path(folder) / f"{name}{CHECKPOINT_SUFFIX}"


@dataclass
class LoopState:
    """Where the loop stands: ``step`` is the next step to run."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0


def run_key(name: str, objective: str, config: Any) -> str:
    """What a checkpoint must have been written by to be resumed (JSON of the run's inputs)."""
    return json.dumps({"name": name, "objective": objective, "config": asdict(config)}, default=str)


def save(
    path: Path, key: str, model: nn.Module, optimizer: Any, schedule: Any, state: LoopState
) -> None:
    """Write the loop's state to ``path`` (a temporary file, then an atomic rename)."""
    payload = {
        "run": key,
        "step": state.step,
        "losses": list(state.losses),
        "wall_s": state.wall_s,
        "cpu_s": state.cpu_s,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)  # the run's output folder, made early
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def restore(
    path: Path, key: str, model: nn.Module, optimizer: Any, schedule: Any
) -> LoopState | None:
    """Load ``path`` into the loop if it was written by the same run; ``None`` to start anew."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file only costs the steps it held
        return _set_aside(path, f"cannot be read ({type(err).__name__}: {err})")
    if payload.get("run") != key:
        return _set_aside(path, "was written by another run (another config or objective)")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    torch.set_rng_state(payload["rng"])
    return LoopState(
        int(payload["step"]), list(payload["losses"]), payload["wall_s"], payload["cpu_s"]
    )


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(path.name + ".old")
    os.replace(path, aside)
    logger.warning("checkpoint %s %s; moved to %s, starting at step 0", path, why, aside)
    return None
