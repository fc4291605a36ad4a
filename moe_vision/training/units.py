"""What the training loop is made of and what it reports.

A recipe is expanded into *units* (:class:`TrainUnit`, :func:`expand_units`): one per stage, or
one per expert for a ``per_expert`` stage. Each unit draws its own seed (:func:`unit_seed`: data
order, temporary projector, LoRA init). While a unit trains, step hooks see a
:class:`StepEvent` after every optimiser step, :class:`StepTimings` adds up where the loop spent
its wall time, and a finished unit is summarised by a :class:`UnitReport`. Too many NaN/inf
losses raise :class:`NonFiniteLossError`. :class:`~moe_vision.training.trainer.Trainer` uses
them all (and re-exports them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.utils.data import Dataset

from moe_vision.training.recipe_stages import Recipe, Stage


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf more often than ``TrainOptions.max_nonfinite`` allows."""


@dataclass(frozen=True)
class TrainUnit:
    """One pass of the loop: a stage, or one expert of a ``per_expert`` stage."""

    index: int
    stage: Stage
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.stage.name if self.expert is None else f"{self.stage.name}[{self.expert}]"


def expand_units(recipe: Recipe, num_experts: int) -> list[TrainUnit]:
    """The recipe's stages as units (a ``per_expert`` stage becomes one unit per expert)."""
    units: list[TrainUnit] = []
    for stage in recipe.stages:
        for e in range(num_experts) if stage.per_expert else [None]:
            units.append(TrainUnit(len(units), stage, e))
    return units


def unit_seed(seed: int, unit: TrainUnit) -> int:
    """The seed of ``unit`` in a run seeded ``seed`` (data order, initialisation)."""
    return seed * 7919 + unit.index * 104_729 + 1


@dataclass
class StepEvent:
    """What a step hook sees after each optimiser step."""

    unit: TrainUnit
    epoch: int
    batches_done: int
    optimizer_steps: int
    global_step: int
    loss: float


@dataclass
class StepTimings:
    """Where this process's training loop spent its wall time (seconds, all units): storing the
    frozen experts' maps before each unit (:mod:`~.precompute`), waiting for batches, frozen
    experts' maps (cache reads or forwards), training steps (forward, backward, optimiser) and
    mid-unit checkpoints."""

    precompute_s: float = 0.0
    data_s: float = 0.0
    features_s: float = 0.0
    step_s: float = 0.0
    checkpoint_s: float = 0.0

    def add(self, name: str, since: float) -> float:
        """Add the time since ``since`` to ``name``; returns now."""
        now = time.perf_counter()
        setattr(self, name, getattr(self, name) + now - since)
        return now


StepHook = Callable[[StepEvent], None]
DatasetFactory = Callable[[str, nn.Module], Dataset]
"""``(stage.data, model) -> Dataset``: a stage's data for a model (its preprocessors/tokens)."""
UnitModelFactory = Callable[[nn.Module, TrainUnit], nn.Module]
"""``(mixture, unit) -> model`` for per-expert units (see :func:`moe_vision.model.mllm` helpers)."""


@dataclass
class UnitReport:
    """Summary of a finished unit."""

    unit: str
    params_trainable: int
    params_total: int
    optimizer_steps: int
    samples: int
    final_loss: float | None
    train: list[str]
    frozen: list[str]
    cached_experts: list[int]
