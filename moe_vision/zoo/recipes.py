"""The recipe of every shipped mini preset: objective, steps, batch, learning rate, data.

These are the defaults of ``moe-vision pretrain NAME``; the shipped weights were written with
them (the card of each preset records the config it was made with). Step counts are sized so
that the whole mini zoo regenerates in under 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

from moe_vision.zoo.core import MINI_RECIPES, PretrainConfig, register_recipe

CONTRASTIVE_KINDS = ("object", "objects", "pair", "text", "marker")

DEFAULTS: dict[str, tuple[str, PretrainConfig]] = {
    "clip-mini": ("clip", PretrainConfig(steps=400, batch_size=32, lr=1e-3)),
    "siglip-mini": ("siglip", PretrainConfig(steps=700, batch_size=32, lr=1e-3)),
    "convnext-mini": (
        "convnext-clip",
        PretrainConfig(steps=400, batch_size=32, lr=2e-3, options={"region_weight": 1.0}),
    ),
    "sam-mini": (
        "sam",
        PretrainConfig(
            steps=150, batch_size=16, lr=1e-3, kinds=("object", "objects", "pair", "marker")
        ),
    ),
    "eva02-mini": ("eva02-mim", PretrainConfig(steps=100, batch_size=32, lr=1e-3)),
    "dinov2-mini": (
        "dino",
        PretrainConfig(steps=250, batch_size=32, lr=5e-4, options={"local_views": 2}),
    ),
    "pix2struct-mini": (
        "pix2struct",
        PretrainConfig(steps=350, batch_size=32, lr=3e-3, kinds=("text",)),
    ),
}
"""Mini preset -> (objective, config)."""


def register_default_recipes() -> None:
    """Register :data:`DEFAULTS` (idempotent)."""
    for name, (objective, config) in DEFAULTS.items():
        if name not in MINI_RECIPES:
            register_recipe(name, objective, config)
