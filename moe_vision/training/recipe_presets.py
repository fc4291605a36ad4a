"""The preset training recipes, registered by name: ``eagle``, ``cambrian`` and ``llava``.

Each preset follows its paper's staging, with the paper's numbers where the paper gives them
(see :mod:`moe_vision.training.recipes`). :func:`get_recipe` returns a preset by name or loads
a recipe YAML file by path; :func:`register_recipe` adds a preset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moe_vision.training.recipe_stages import Recipe, Stage

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
