"""The mini zoo's pretraining: one module per objective, the generated data, the loop.

Importing the package registers every objective and every mini preset's recipe
(:data:`moe_vision.zoo.core.MINI_RECIPES`); ``moe-vision pretrain NAME`` runs one.
"""

from moe_vision.zoo import contrastive, dinov2, eva02, pix2struct, sam  # noqa: F401
from moe_vision.zoo.core import (
    MINI_RECIPES,
    OBJECTIVES,
    MiniRecipe,
    Objective,
    PretrainConfig,
    PretrainResult,
    build_objective,
    get_pretrain_recipe,
    pretrain,
    register_objective,
    register_pretrain_recipe,
    save_pretrained,
)
from moe_vision.zoo.recipes import register_default_recipes

register_default_recipes()

__all__ = [
    "MINI_RECIPES",
    "OBJECTIVES",
    "MiniRecipe",
    "Objective",
    "PretrainConfig",
    "PretrainResult",
    "build_objective",
    "get_pretrain_recipe",
    "pretrain",
    "register_objective",
    "register_pretrain_recipe",
    "save_pretrained",
]
