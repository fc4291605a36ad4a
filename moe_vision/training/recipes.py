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

The recipe classes are in :mod:`moe_vision.training.recipe_stages` and the presets in
:mod:`moe_vision.training.recipe_presets`; this module applies a stage to a model (which
parameters train, at which learning rate) and re-exports the other two's names.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from moe_vision.model.adapters import (
    AdapterError,
    add_adapters,
    is_4bit,
    is_adapter_key,
    lora_layers,
    name_matches,
    select_modules,
)
from moe_vision.training.recipe_stages import (
    RecipeError,
    Stage,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- applying a stage
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
        if any(name_matches(n, pat) for n in param_names):
            continue
        bare = pat.rstrip(".*")
        if any(name_matches(n, pat) or fnmatch.fnmatchcase(n, bare) for n in module_names):
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


# ------------------------------------------------------------------------------ LoRA per stage
def add_stage_adapters(model: nn.Module, stage: Stage, seed: int) -> dict[str, list[str]]:
    """Add the adapters of every ``stage.lora`` entry; ``{entry: selected module names}``.

    Two entries may not select the same module. Deterministic given ``seed``.
    """
    seen: dict[str, int] = {}
    out: dict[str, list[str]] = {}
    for i, cfg in enumerate(stage.lora):
        where = f"stage {stage.name!r} lora[{i}]"
        try:
            names = select_modules(model, cfg, where)
        except AdapterError as err:
            raise RecipeError(str(err)) from err
        twice = sorted(n for n in names if n in seen)
        if twice:
            raise RecipeError(
                f"{where}: modules {twice[:5]} are already selected by lora[{seen[twice[0]]}]; "
                "each module takes one entry"
            )
        seen.update(dict.fromkeys(names, i))
        try:
            out[where] = add_adapters(model, cfg, seed * 31 + i, where)
        except AdapterError as err:  # a stage's lora entry that cannot be applied
            raise RecipeError(str(err)) from err
    return out


def stage_trainability(model: nn.Module, stage: Stage) -> dict[str, bool]:
    """``{parameter name: requires_grad}`` that the stage's LoRA entries impose.

    The adapters of the modules the stage's entries select train; those modules' base weights
    and biases are frozen; every 4-bit weight is frozen. Other parameters are not listed (the
    stage's ``train`` patterns decide). Raises :class:`RecipeError` when a selected module has
    no adapter (:func:`add_stage_adapters` was not called).
    """
    forced: dict[str, bool] = {}
    layers = lora_layers(model) if stage.lora else {}
    for i, cfg in enumerate(stage.lora):
        where = f"stage {stage.name!r} lora[{i}]"
        try:
            names = select_modules(model, cfg, where)
        except AdapterError as err:
            raise RecipeError(str(err)) from err
        for name in names:
            if name not in layers:
                raise RecipeError(f"{where}: {name!r} has no adapter yet (add_stage_adapters)")
            for pname, _ in layers[name].named_parameters():
                forced[f"{name}.{pname}"] = is_adapter_key(f".{pname}")
    for name, p in model.named_parameters():
        if is_4bit(p):
            forced[name] = False
    return forced


def apply_stage(model: nn.Module, stage: Stage) -> dict[str, list[str]]:
    """Set ``requires_grad`` so that exactly the parameters ``stage.train`` names train.

    The stage's LoRA adapters (added beforehand by
    :func:`add_stage_adapters`) train and the base weights of the
    modules they adapt stay frozen, whatever the patterns say; 4-bit weights never train.

    Returns ``{"train": [...], "frozen": [...]}`` module groups, which are also logged.
    Raises :class:`RecipeError` when a pattern matches nothing.
    """
    check_patterns(model, stage.train, f"stage {stage.name!r} train")
    check_patterns(model, stage.lr_scale, f"stage {stage.name!r} lr_scale")
    forced = stage_trainability(model, stage)
    counts: dict[str, list[int]] = {}
    lists = _list_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad_(forced.get(name, any(name_matches(name, pat) for pat in stage.train)))
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
        scale = next((s for pat, s in stage.lr_scale.items() if name_matches(name, pat)), 1.0)
        wd = 0.0 if p.ndim < 2 else stage.weight_decay
        g = groups.setdefault(
            (scale, wd), {"params": [], "names": [], "lr": stage.lr * scale, "weight_decay": wd}
        )
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise RecipeError(f"stage {stage.name!r}: no trainable parameters (train={stage.train})")
    return list(groups.values())
