"""A training recipe as data: :class:`Recipe`, its :class:`Stage` s and their :class:`LoraConfig`.

Each class validates itself on construction and raises :class:`RecipeError` naming the bad
field and what was expected; ``from_dict`` lists the valid fields when given unknown ones.
``Recipe.to_yaml`` / ``Recipe.from_yaml`` round-trip exactly, and ``Recipe.with_overrides``
applies a run config's per-stage overrides. The presets are in
:mod:`moe_vision.training.recipe_presets`; applying a stage to a model is in
:mod:`moe_vision.training.recipes`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_vision.model.adapters import AdapterError, LoraConfig

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


class RecipeError(ValueError):
    """A recipe or stage that cannot be used: says which field and what was expected."""


@dataclass
class Stage:
    """One training stage.

    Attributes:
        name: stage name, unique within its recipe (used in logs, checkpoints, overrides).
        data: a split name of the run's data config (``"align"``, ``"instruct"``, ...) or a
            path to a LLaVA-format ``.json``/``.jsonl`` file or a mixture ``.yaml``
            (:mod:`moe_vision.data.mixture`).
        train: fnmatch patterns over parameter names; a parameter trains when any pattern
            matches it (``"projector"`` is shorthand for ``"projector.*"``).
        lr: base learning rate (peak, after warm-up).
        lr_scale: ``{pattern: multiplier}``; a trainable parameter matching a pattern trains at
            ``lr * multiplier`` (first matching pattern wins), e.g. ``{"fusion.*": 0.1}``.
        epochs: passes over the stage's data.
        batch_size: per-device micro-batch size; the effective batch is
            ``batch_size * grad_accum * num_processes``.
        grad_accum: micro-batches per optimiser step.
        weight_decay: AdamW weight decay (never applied to biases and norm weights).
        warmup_ratio: fraction of the stage's optimiser steps spent warming up linearly.
        scheduler: learning-rate schedule, one of :data:`SCHEDULERS`.
        max_grad_norm: gradient clipping norm (``None``: no clipping).
        max_steps: optional cap on the stage's optimiser steps (``None``: all epochs).
        per_expert: Eagle pre-alignment: the stage runs once per expert, on a single-expert
            model (that expert + its own fusion/projector + the shared LLM); ``train`` patterns
            refer to that model (its expert is ``experts.0``). Only the expert's weights are
            carried into the mixture.
        per_expert_fusion: fusion strategy of the single-expert models.
        per_expert_fusion_options: its options (``{}``: the strategy's defaults).
        lora: :class:`LoraConfig` entries (a single mapping is accepted): low-rank adapters
            added at the start of the stage, which train there while the adapted modules' base
            weights stay frozen; ``[]``: none. Adapters stay in the model for later stages,
            where ``train`` patterns decide whether they train.
    """

    name: str
    data: str
    train: list[str]
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    per_expert: bool = False
    per_expert_fusion: str = "channel_concat"
    per_expert_fusion_options: dict[str, Any] = field(default_factory=dict)
    lora: list[LoraConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RecipeError` naming the bad field and what was expected."""
        where = f"stage {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"stage name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.data, str) or not self.data:
            raise RecipeError(
                f"{where}: data must be a split name, a JSON/JSONL path or a mixture YAML, got "
                f"{self.data!r}"
            )
        if isinstance(self.train, str):
            self.train = [self.train]
        if not self.train or not all(isinstance(p, str) and p for p in self.train):
            raise RecipeError(
                f"{where}: train must be a non-empty list of name patterns such as "
                f"['projector.*'], got {self.train!r}"
            )
        self.train = list(self.train)
        for key, lo in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise RecipeError(f"{where}: {key} must be an integer >= {lo}, got {value!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise RecipeError(f"{where}: max_steps must be None or an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise RecipeError(f"{where}: lr must be a positive number, got {self.lr!r}")
        self.lr = float(self.lr)
        for pat, scale in self.lr_scale.items():
            if not isinstance(scale, (int, float)) or scale < 0:
                raise RecipeError(
                    f"{where}: lr_scale[{pat!r}] must be a number >= 0, got {scale!r}"
                )
        self.lr_scale = {str(k): float(v) for k, v in self.lr_scale.items()}
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RecipeError(f"{where}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.scheduler not in SCHEDULERS:
            raise RecipeError(
                f"{where}: unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}"
            )
        if self.weight_decay < 0:
            raise RecipeError(f"{where}: weight_decay must be >= 0, got {self.weight_decay}")
        lora = [self.lora] if isinstance(self.lora, (dict, LoraConfig)) else self.lora or []
        if not isinstance(lora, list):
            raise RecipeError(
                f"{where}: lora must be a mapping, a list of mappings or null, got {lora!r}"
            )
        try:
            self.lora = [LoraConfig.from_dict(x, f"{where} lora[{i}]") for i, x in enumerate(lora)]
        except AdapterError as err:  # a stage's bad lora entry is a bad recipe
            raise RecipeError(str(err)) from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        """Build from a plain dict; unknown keys raise with the valid ones listed."""
        if not isinstance(data, dict):
            raise RecipeError(f"a stage must be a mapping, got {type(data).__name__}: {data!r}")
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - valid)
        if bad:
            raise RecipeError(
                f"stage {data.get('name', '?')!r}: unknown fields {bad}; "
                f"valid fields: {sorted(valid)}"
            )
        missing = sorted(f for f in ("name", "data", "train") if f not in data)
        if missing:
            raise RecipeError(f"stage {data.get('name', '?')!r}: missing required fields {missing}")
        return cls(**data)

    def replace(self, **changes: Any) -> Stage:
        """A copy with some fields changed (validated); unknown fields raise."""
        return Stage.from_dict({**self.to_dict(), **changes})


@dataclass
class Recipe:
    """A named list of stages, run in order."""

    name: str
    stages: list[Stage]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.stages:
            raise RecipeError(f"recipe {self.name!r} has no stages")
        self.stages = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in self.stages]
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RecipeError(
                f"recipe {self.name!r}: stage names must be unique, repeated: {dupes}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict) or "stages" not in data:
            raise RecipeError(f"a recipe must be a mapping with 'name' and 'stages', got {data!r}")
        bad = sorted(set(data) - {"name", "description", "stages"})
        if bad:
            raise RecipeError(
                f"recipe: unknown fields {bad}; valid: ['description', 'name', 'stages']"
            )
        if not isinstance(data["stages"], list):
            raise RecipeError(
                f"recipe 'stages' must be a list, got {type(data['stages']).__name__}"
            )
        return cls(
            name=str(data.get("name", "custom")),
            stages=[Stage.from_dict(s) for s in data["stages"]],
            description=str(data.get("description", "")),
        )

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of the recipe; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Recipe:
        """Load a recipe from a YAML file (or YAML text)."""
        p = Path(path_or_text)
        try:
            is_file = p.is_file()
        except OSError:
            is_file = False
        text = p.read_text() if is_file else str(path_or_text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path_or_text}: invalid YAML: {err}") from err
        return cls.from_dict(data)

    def with_overrides(self, overrides: dict[str, dict[str, Any]] | None) -> Recipe:
        """Apply ``{stage_name | "*": {field: value}}``; ``"*"`` applies to every stage first."""
        if not overrides:
            return self
        names = {s.name for s in self.stages}
        bad = sorted(set(overrides) - names - {"*"})
        if bad:
            raise RecipeError(
                f"overrides name stages {bad} that recipe {self.name!r} does not have; "
                f"its stages are {[s.name for s in self.stages]} (or '*' for all)"
            )
        stages = []
        for s in self.stages:
            s = s.replace(**overrides.get("*", {}))
            stages.append(s.replace(**overrides.get(s.name, {})))
        return Recipe(self.name, stages, self.description)
