"""The recipe of every shipped mini preset: objective, steps, batch, learning rate, data.

These are the defaults of ``moe-vision pretrain NAME``; the shipped weights were written with
them (the card of each preset records the config it was made with). Step counts are sized so
that the whole mini zoo regenerates in under 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

from moe_vision.zoo.core import MINI_RECIPES, PretrainConfig, register_pretrain_recipe

CONTRASTIVE_KINDS = ("object", "objects", "pair", "text", "marker")
BASE_KINDS = ("object", "objects", "pair")
"""The CLIP-like bases learn objects: what they are, their colour, how many, where. Rendered
text and the small marker are left to the specialists (Pix2Struct, ConvNeXt): with captions
that name them, CLIP-mini read both itself and adding a specialist had nothing left to show."""

BASE = PretrainConfig(
    steps=1500, batch_size=32, lr=1e-3, kinds=BASE_KINDS, options={"region_weight": 1.0}
)

DEFAULTS: dict[str, tuple[str, PretrainConfig]] = {
    "clip-mini": ("clip", BASE),
    "siglip-mini": ("siglip", BASE),
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
        PretrainConfig(
            steps=1000, batch_size=32, lr=3e-3, kinds=("text",), options={"glyph_weight": 1.0}
        ),
    ),
}
"""Mini preset -> (objective, config)."""


def register_default_recipes() -> None:
    """Register :data:`DEFAULTS` (idempotent)."""
    for name, (objective, config) in DEFAULTS.items():
        if name not in MINI_RECIPES:
            register_pretrain_recipe(name, objective, config)
