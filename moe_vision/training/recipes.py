"""Training recipes as data: a :class:`Recipe` is a list of :class:`Stage` s.

A stage names its dataset (a split of the run's data, e.g. ``"align"`` / ``"instruct"``, a
LLaVA-format JSON/JSONL path or a mixture YAML), which parameters train (fnmatch patterns over the
``named_parameters`` names of :class:`~moe_vision.model.mllm.MoEVisionModel`: ``experts.*``,
``experts.0.*``, ``fusion.*``, ``projector.*``, ``llm.*``), per-group learning-rate multipliers,
epochs, per-device batch size and gradient accumulation. Everything else stays frozen.

Presets (``get_recipe``) follow the papers' staging; their numbers are the papers' where the
paper gives them, and a run config may override any stage field (``RunConfig.overrides``):

* ``eagle`` -- Eagle (Shi et al., 2024, "Eagle: Exploring the Design Space for Multimodal
  LLMs with Mixture of Encoders"): (1) *pre-alignment*, each expert alone with its own
  projector and the frozen LLM (``per_expert=True``; the pre-aligned expert weights are carried
  into the mixture); (2) all experts + fusion + projector train, LLM frozen; (3) SFT, all train.
* ``cambrian`` -- Cambrian-1 (Tong et al., 2024): (1) the connector (SVA fusion + projector),
  SVA at a 10x lower LR, experts and LLM frozen; (2) instruction tuning of connector + LLM.
* ``llava`` -- LLaVA-1.5 (Liu et al., 2023): (1) projector only; (2) projector + LLM.

``Recipe.to_yaml`` / ``Recipe.from_yaml`` round-trip exactly; users write their own recipes in
YAML (see ``recipes/*.yaml``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

logger = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


class RecipeError(ValueError):
    """A recipe or stage that cannot be used: says which field and what was expected."""


LORA_QUANTIZE = ("nf4", "fp4")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al., 2021) for a stage, applied with ``peft``.

    The modules that get adapters are those under a ``targets`` pattern (fnmatch over module
    names, like ``train``: ``"llm.*"``, ``"experts.0.*"``) whose name ends with one of
    ``modules`` (peft's ``target_modules``: ``q_proj``, ``mlp.fc1``); they must be
    ``nn.Linear``, ``nn.Conv2d`` (not grouped) or ``nn.Embedding``. In the stage, their adapters
    train and their base weights stay frozen; see :mod:`moe_vision.training.lora`.

    Attributes:
        targets: module-name patterns (which parts of the model).
        modules: module-name suffixes inside them.
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the adapter's input.
        quantize: QLoRA (Dettmers et al., 2023): ``"nf4"`` or ``"fp4"`` stores the adapted
            modules' base weights in 4 bits through bitsandbytes (CUDA only); ``None``: as is.
    """

    targets: list[str]
    modules: list[str]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    quantize: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "lora") -> None:
        """Raise :class:`RecipeError` naming the bad field and what was expected."""
        for key, example in (("targets", "['llm.*']"), ("modules", "['q_proj', 'v_proj']")):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [value]
            if not value or not all(isinstance(v, str) and v for v in value):
                raise RecipeError(
                    f"{where}: {key} must be a non-empty list of names such as {example}, "
                    f"got {getattr(self, key)!r}"
                )
            setattr(self, key, list(value))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise RecipeError(f"{where}: r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise RecipeError(f"{where}: alpha must be a positive number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise RecipeError(f"{where}: alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise RecipeError(f"{where}: dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.quantize is not None and self.quantize not in LORA_QUANTIZE:
            raise RecipeError(
                f"{where}: quantize must be null or one of {list(LORA_QUANTIZE)}, "
                f"got {self.quantize!r}"
            )

    @classmethod
    def from_dict(cls, data: Any, where: str = "lora") -> LoraConfig:
        """Build from a plain dict; unknown or missing keys raise with the valid ones listed."""
        if isinstance(data, LoraConfig):
            data = dataclasses.asdict(data)
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}: {data!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(data) - set(valid))
        if bad:
            raise RecipeError(f"{where}: unknown fields {bad}; valid fields: {valid}")
        missing = [k for k in ("targets", "modules") if k not in data]
        if missing:
            raise RecipeError(f"{where}: missing required fields {missing}")
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            setattr(obj, f.name, data.get(f.name, default))
        obj.validate(where)
        return obj


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
        self.lora = [LoraConfig.from_dict(x, f"{where} lora[{i}]") for i, x in enumerate(lora)]

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


# --------------------------------------------------------------------------- presets
_RECIPES: dict[str, Callable[[], Recipe]] = {}


def register_recipe(name: str) -> Callable[[Callable[[], Recipe]], Callable[[], Recipe]]:
    """Decorator: register a builder ``() -> Recipe`` under ``name``."""

    def deco(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        _RECIPES[name] = fn
        return fn

    return deco


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str | Path) -> Recipe:
    """A preset by name, or a recipe YAML file by path."""
    if str(name) in _RECIPES:
        return _RECIPES[str(name)]()
    if str(name).endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise FileNotFoundError(f"recipe file not found: {name}")
        return Recipe.from_yaml(name)
    raise KeyError(f"unknown recipe {str(name)!r}; presets are {list_recipes()} (or a .yaml path)")


@register_recipe("eagle")
def eagle() -> Recipe:
    return Recipe(
        "eagle",
        [
            Stage(
                "prealign",
                "align",
                ["experts.*", "fusion.*", "projector.*"],
                lr=1e-3,
                lr_scale={"experts.*": 0.1},
                per_expert=True,
            ),
            Stage(
                "joint",
                "align",
                ["experts.*", "fusion.*", "projector.*"],
                lr=1e-3,
                lr_scale={"experts.*": 0.1},
            ),
            Stage("sft", "instruct", ["*"], lr=2e-5, lr_scale={"experts.*": 0.1}),
        ],
        "Eagle: per-expert pre-alignment (LLM frozen) -> experts+fusion+projector -> full SFT",
    )


@register_recipe("cambrian")
def cambrian() -> Recipe:
    return Recipe(
        "cambrian",
        [
            Stage(
                "connector",
                "align",
                ["fusion.*", "projector.*"],
                lr=1e-3,
                lr_scale={"fusion.*": 0.1},
            ),
            Stage("instruct", "instruct", ["fusion.*", "projector.*", "llm.*"], lr=2e-5),
        ],
        "Cambrian-1: connector (SVA at 0.1x LR), experts+LLM frozen -> connector + LLM",
    )


@register_recipe("llava")
def llava() -> Recipe:
    return Recipe(
        "llava",
        [
            Stage("pretrain", "align", ["projector.*"], lr=1e-3),
            Stage("finetune", "instruct", ["projector.*", "llm.*"], lr=2e-5),
        ],
        "LLaVA-1.5: projector -> projector + LLM",
    )


# --------------------------------------------------------------------------- applying a stage
def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def module_group(name: str, lists: set[str] | frozenset[str] = frozenset()) -> str:
    """The module a parameter is reported under: its top-level module, or the item of a
    top-level ``ModuleList`` (named in ``lists``): ``experts.0``, ``fusion``, ``llm``, ..."""
    parts = name.split(".")
    if parts[0] in lists and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def _list_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_children() if isinstance(m, nn.ModuleList)}


_SAID_EMPTY: set[str] = set()
"""Patterns already reported as naming no parameters in this process."""


def check_patterns(model: nn.Module, patterns: Iterable[str], where: str) -> None:
    """Raise when a pattern names nothing in ``model``; listing its top-level modules.

    A pattern that names a module without parameters (e.g. a parameter-free fusion) is
    accepted with a warning: there is simply nothing to train there.
    """
    param_names = [n for n, _ in model.named_parameters()]
    module_names = [n for n, _ in model.named_modules() if n]
    top = sorted({n.split(".")[0] for n in module_names})
    for pat in patterns:
        if any(_matches(n, pat) for n in param_names):
            continue
        if any(_matches(n, pat) or fnmatch.fnmatchcase(n, pat.rstrip(".*")) for n in module_names):
            # Said once per pattern and process (every stage of every cell would repeat it).
            say = logger.info if pat in _SAID_EMPTY else logger.warning
            _SAID_EMPTY.add(pat)
            say(
                "recipe pattern %r names only modules without parameters (%s), so it trains "
                "nothing there; expected with a parameter-free fusion such as channel "
                "concatenation. Drop the pattern from the stage to silence this note.",
                pat,
                where,
            )
            continue
        lists = _list_modules(model)
        groups = sorted({module_group(n, lists) for n in param_names})
        raise RecipeError(
            f"{where}: pattern {pat!r} matches no parameter of the model; top-level modules are "
            f"{top} (parameter groups: {groups})"
        )


def apply_stage(model: nn.Module, stage: Stage) -> dict[str, list[str]]:
    """Set ``requires_grad`` so that exactly the parameters ``stage.train`` names train.

    The stage's LoRA adapters (added beforehand by
    :func:`moe_vision.training.lora.add_stage_adapters`) train and the base weights of the
    modules they adapt stay frozen, whatever the patterns say; 4-bit weights never train.

    Returns ``{"train": [...], "frozen": [...]}`` module groups, which are also logged.
    Raises :class:`RecipeError` when a pattern matches nothing.
    """
    from moe_vision.training.lora import stage_trainability  # lora imports this module

    check_patterns(model, stage.train, f"stage {stage.name!r} train")
    check_patterns(model, stage.lr_scale, f"stage {stage.name!r} lr_scale")
    forced = stage_trainability(model, stage)
    counts: dict[str, list[int]] = {}
    lists = _list_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad_(forced.get(name, any(_matches(name, pat) for pat in stage.train)))
        c = counts.setdefault(module_group(name, lists), [0, 0])
        c[0 if p.requires_grad else 1] += p.numel()
    trained = [g for g, (t, _) in counts.items() if t]
    frozen = [g for g, (t, f) in counts.items() if f and not t]
    partial = [g for g, (t, f) in counts.items() if t and f]

    def fmt(groups: list[str]) -> str:
        return ", ".join(f"{g} ({sum(counts[g]) / 1e6:.2f}M)" for g in groups) or "none"

    logger.info("stage %r trains: %s", stage.name, fmt(trained))
    if partial:
        logger.info("stage %r trains part of: %s", stage.name, fmt(partial))
    logger.info("stage %r frozen: %s", stage.name, fmt(frozen))
    return {"train": trained, "frozen": frozen, "partial": partial}


def param_groups(model: nn.Module, stage: Stage) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: per-pattern LR, no decay on 1-D.

    Each group carries ``lr`` (``stage.lr`` times the first matching ``lr_scale``),
    ``weight_decay`` and ``names`` (for logs and tests).
    """
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for pat, s in stage.lr_scale.items() if _matches(name, pat)), 1.0)
        wd = 0.0 if p.ndim < 2 else stage.weight_decay
        g = groups.setdefault(
            (scale, wd), {"params": [], "names": [], "lr": stage.lr * scale, "weight_decay": wd}
        )
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise RecipeError(f"stage {stage.name!r}: no trainable parameters (train={stage.train})")
    return list(groups.values())
