"""The pretraining loop of the mini zoo: objectives registry, config, loop, weights and card.

An :class:`Objective` wraps one expert with what its family's pretraining adds around it (a text
tower, a decoder, a mask decoder, a teacher) and turns a batch of generated scenes
(:mod:`moe_vision.zoo.data`) into a scalar loss. Objectives register under a name with
:func:`register_objective`; a mini preset names its objective in :data:`MINI_RECIPES`.

:func:`pretrain` runs the loop (AdamW, linear warm-up then cosine decay, gradient clipping,
``torch.manual_seed(seed)`` before building anything, so a run is a pure function of its
arguments on one machine) and :func:`save_pretrained` writes the expert's library module as
safetensors (the format the family's ``load_checkpoint`` reads) and the JSON card.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import experts
from experts import Expert
from experts.registry import Registry
from moe_vision.io import save_safetensors, write_json
from moe_vision.zoo import resume
from moe_vision.zoo.data import KINDS, Scene, make_scenes

logger = logging.getLogger(__name__)

LOG_EVERY = 25
"""Steps between two progress log lines."""


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of one pretraining run.

    Attributes:
        steps: optimiser steps.
        batch_size: scenes per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps (then cosine decay to 0).
        seed: seeds torch and the scene stream.
        kinds: scene kinds of the data (:data:`moe_vision.zoo.data.KINDS`).
        options: objective-specific settings (e.g. the teacher preset of EVA-02).
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"PretrainConfig: steps must be >= 1 and batch_size >= 2 (contrastive "
                f"objectives need negatives), got steps={self.steps}, "
                f"batch_size={self.batch_size}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0) or self.seed < 0:
            raise ValueError(
                f"PretrainConfig: lr must be a finite number > 0 and seed >= 0, got "
                f"lr={self.lr}, seed={self.seed}"
            )


class Objective(nn.Module, ABC):
    """A family's pretraining objective around one expert (``self.expert``).

    Subclasses set :attr:`description` (the card's ``objective``) and implement :meth:`loss`.
    Every parameter of the module trains (the expert plus the objective's heads) unless
    :meth:`trainable` says otherwise.
    """

    description: str = ""

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__()
        self.expert = expert
        self.config = config

    @abstractmethod
    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        """Scalar loss of one batch of scenes."""

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (default: all that require grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def after_step(self, step: int) -> None:
        """Hook after each optimiser step (EMA teachers)."""


ObjectiveFactory = Callable[[Expert, PretrainConfig], Objective]
OBJECTIVES: Registry[ObjectiveFactory] = Registry("objective")
"""Objective name -> its :class:`Objective` class (``(expert, config) -> Objective``)."""


def register_objective(name: str) -> Callable[[ObjectiveFactory], ObjectiveFactory]:
    """Class decorator: register an :class:`Objective` under ``name``."""
    return OBJECTIVES.register(name)


@dataclass(frozen=True)
class MiniRecipe:
    """How a mini preset is pretrained: its objective and default config."""

    objective: str
    config: PretrainConfig


MINI_RECIPES: Registry[MiniRecipe] = Registry("pretraining recipe")
"""Mini preset name -> its pretraining recipe; filled by :mod:`moe_vision.zoo.recipes`."""


def register_pretrain_recipe(preset: str, objective: str, config: PretrainConfig) -> None:
    """Name the objective and defaults that ``moe-vision pretrain PRESET`` uses."""
    MINI_RECIPES.register(preset, MiniRecipe(objective, config))


def get_pretrain_recipe(preset: str) -> MiniRecipe:
    """The pretraining recipe of ``preset``, or a ``KeyError`` listing the valid names."""
    return MINI_RECIPES.get(preset)


@dataclass
class PretrainResult:
    """What a pretraining run produced.

    Attributes:
        name: the mini preset.
        expert: the trained expert (eval mode).
        losses: the loss of every step.
        wall_time_s: seconds of the loop (data generation included).
        cpu_time_s: CPU seconds of the process during the loop (all threads).
        config: the config the run used.
        objective: the objective's registry name.
    """

    name: str
    expert: Expert
    losses: list[float]
    wall_time_s: float
    config: PretrainConfig
    objective: str
    cpu_time_s: float = 0.0


def _lr_lambda(config: PretrainConfig) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def build_objective(name: str, config: PretrainConfig, objective: str | None = None) -> Objective:
    """Seed torch, build the random-init expert ``name`` and its objective."""
    objective = objective or get_pretrain_recipe(name).objective
    factory = OBJECTIVES.get(objective)
    torch.manual_seed(config.seed)
    return factory(experts.create_expert(name), config)


def pretrain(
    name: str,
    config: PretrainConfig | None = None,
    objective: str | None = None,
    progress: bool = True,
    resume_dir: str | os.PathLike[str] | None = None,
    checkpoint_every_s: float | None = None,
) -> PretrainResult:
    """Pretrain mini preset ``name`` from random init with its recipe (or ``config``).

    With ``resume_dir``, the loop's state is written to ``<resume_dir>/<name>.resume.pt`` every
    ``checkpoint_every_s`` seconds of training (default :data:`~.resume.CHECKPOINT_EVERY_S`), and
    a run that finds one written by the same run continues from it, to the same weights
    (:mod:`moe_vision.zoo.resume`).

    Returns:
        :class:`PretrainResult` with the trained expert and the loss curve (times and losses
        count the steps run before a resume too).
    """
    config = config or get_pretrain_recipe(name).config
    objective = objective or get_pretrain_recipe(name).objective
    model = build_objective(name, config, objective)
    model.train()
    opt = torch.optim.AdamW(model.trainable(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    ckpt = resume.checkpoint_path(resume_dir, name) if resume_dir is not None else None
    key = resume.run_key(name, objective, config)
    state = (resume.restore(ckpt, key, model, opt, sched) if ckpt else None) or resume.LoopState()
    if state.step:
        logger.info("pretrain %s: resuming at step %d of %d", name, state.step, config.steps)
    losses = state.losses
    start = time.perf_counter() - state.wall_s
    cpu_start = time.process_time() - state.cpu_s
    every_s = resume.CHECKPOINT_EVERY_S if checkpoint_every_s is None else checkpoint_every_s
    saved = time.perf_counter()
    steps = range(state.step, config.steps)
    bar = tqdm(
        steps, desc=f"pretrain {name}", disable=not progress, initial=state.step, total=config.steps
    )
    for step in bar:
        losses.append(_train_step(model, opt, sched, config, step, name))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % LOG_EVERY == 0:
            logger.info(
                "pretrain %s: step %d/%d loss %.4f (%.0f s, %.0f CPU-s)",
                name,
                step + 1,
                config.steps,
                losses[-1],
                time.perf_counter() - start,
                time.process_time() - cpu_start,
            )
        if ckpt and step + 1 < config.steps and time.perf_counter() - saved >= every_s:
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            resume.save(ckpt, key, model, opt, sched, resume.LoopState(step + 1, losses, wall, cpu))
            saved = time.perf_counter()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    logger.info(
        "pretrain %s: %d steps in %.1f s, final loss %.4f", name, config.steps, wall, losses[-1]
    )
    return PretrainResult(name, model.expert.eval(), losses, wall, config, objective, cpu)


def _train_step(
    model: Objective,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    config: PretrainConfig,
    step: int,
    name: str,
) -> float:
    """One optimiser step on step ``step``'s scenes (clipped at norm 1); returns its loss."""
    scenes = make_scenes(config.seed, step, config.batch_size, config.kinds)
    loss = model.loss(scenes, step)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain {name}: loss is {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.trainable(), 1.0)
    opt.step()
    sched.step()
    model.after_step(step)
    return float(loss.detach())


# ---------------------------------------------------------------------------- saving
def library_module(expert: Expert) -> nn.Module:
    """The library model an expert wraps (its only child): what its checkpoints hold."""
    children = list(expert.children())
    if len(children) != 1:
        raise ValueError(
            f"expert {expert.spec.name!r} has {len(children)} child modules; expected one "
            "library model whose state dict is the checkpoint"
        )
    return children[0]


FINGERPRINT_SEED = 20261130
"""Seed of the fixed scenes the card's output fingerprint is computed on."""


def fingerprint_inputs(n: int = 4) -> list[Scene]:
    """The fixed scenes (one per kind, cycling) a card's fingerprint is measured on."""
    return [make_scenes(FINGERPRINT_SEED, i, 2, (KINDS[i % len(KINDS)],))[0] for i in range(n)]


@torch.no_grad()
def fingerprint(expert: Expert) -> dict[str, float]:
    """Mean, std and mean |x| of the expert's map on :func:`fingerprint_inputs`."""
    expert.eval()
    feats = expert(expert.preprocess([s.image for s in fingerprint_inputs()])).features
    return {
        "mean": float(feats.mean()),
        "std": float(feats.std()),
        "abs_mean": float(feats.abs().mean()),
    }


def card(result: PretrainResult, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON card of a pretraining run."""
    cfg = asdict(result.config)
    k = max(1, len(result.losses) // 20)
    spec = result.expert.spec
    return {
        "name": result.name,
        "family": spec.family,
        "architecture": type(result.expert).__name__,
        "library": spec.library,
        "parameters": sum(p.numel() for p in result.expert.parameters()),
        "input_size": list(spec.input_size),
        "grid": list(spec.grid),
        "channels": spec.channels,
        "objective": {
            "name": result.objective,
            "description": OBJECTIVES.get(result.objective).description,
        },
        "data": {
            "generator": "moe_vision.zoo.data.make_scenes",
            "seed": result.config.seed,
            "kinds": list(result.config.kinds),
            "images_seen": result.config.steps * result.config.batch_size,
        },
        "config": cfg,
        "steps": result.config.steps,
        "wall_time_s": round(result.wall_time_s, 1),
        "cpu_time_s": round(result.cpu_time_s, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "initial_loss": round(sum(result.losses[:k]) / k, 5),
        "final_loss": round(sum(result.losses[-k:]) / k, 5),
        "fingerprint": fingerprint(result.expert),
        "probe": probe or {},
        "command": f"moe-vision pretrain {result.name} --steps {result.config.steps} "
        f"--seed {result.config.seed}",
    }


def save_pretrained(
    result: PretrainResult, out_dir: str | Path, probe: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.safetensors`` (the library module's state dict) and
    ``<name>.json`` (the card), each atomically. Returns both paths."""
    out = Path(out_dir)
    weights = out / f"{result.name}.safetensors"
    state = {
        k: v.detach().contiguous() for k, v in library_module(result.expert).state_dict().items()
    }
    meta = {"preset": result.name, "objective": result.objective}
    save_safetensors(state, weights, meta)
    return weights, write_card(result, out, probe)


def write_card(result: PretrainResult, out_dir: str | Path, probe: dict[str, Any] | None) -> Path:
    """(Re)write ``<out_dir>/<name>.json`` atomically, with ``probe`` scores if given."""
    return write_json(Path(out_dir) / f"{result.name}.json", card(result, probe))
