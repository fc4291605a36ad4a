"""The preset training recipes, registered by name: ``eagle``, ``cambrian`` and ``llava``.

Each preset follows its paper's staging, with the paper's numbers where the paper gives them
(see :mod:`moe_vision.training.recipes`). A preset's one copy is its YAML file in
``moe_vision/training/recipe_configs/`` (package data, as open_clip's ``model_configs``;
``recipes/<name>.yaml`` links to it); importing this module registers every file there under
its stem. :func:`get_recipe` returns a preset by name or loads a recipe YAML file by path;
:func:`register_recipe` adds a preset built in Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from experts.registry import Registry
from moe_vision.training.recipe_stages import Recipe

CONFIG_DIR = Path(__file__).with_name("recipe_configs")
"""The shipped preset YAML files, one per preset, named ``<preset>.yaml``."""

RECIPES: Registry[Callable[[], Recipe]] = Registry("recipe")
"""Preset name -> a builder ``() -> Recipe`` (a fresh Recipe each call)."""


def register_recipe(name: str) -> Callable[[Callable[[], Recipe]], Callable[[], Recipe]]:
    """Decorator: register a builder ``() -> Recipe`` under ``name``."""
    return RECIPES.register(name)


def list_recipes() -> list[str]:
    """Registered preset names, sorted."""
    return RECIPES.list()


def get_recipe(name: str | Path) -> Recipe:
    """A preset by name, or a recipe YAML file by path."""
    if str(name) in RECIPES:
        return RECIPES.get(str(name))()
    if str(name).endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise FileNotFoundError(f"recipe file not found: {name}")
        return Recipe.from_yaml(name)
    raise KeyError(f"unknown recipe {str(name)!r}; presets are {list_recipes()} (or a .yaml path)")


def _register_shipped() -> None:
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        RECIPES.register(path.stem, functools.partial(Recipe.from_yaml, path))


_register_shipped()
