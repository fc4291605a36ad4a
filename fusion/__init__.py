"""Fusion strategies and projectors: several experts' maps to the LLM's visual tokens.

>>> import experts, fusion
>>> specs = [experts.get_spec("clip-tiny"), experts.get_spec("convnext-tiny")]
>>> fuse = fusion.create_fusion("channel_concat", specs, grid=(8, 8), dim=64)
>>> tokens = fuse(maps)                       # (B, N, D) = (B, 64, 64)

Strategy modules in :mod:`fusion.strategies` and projectors in :mod:`fusion.projectors`
register themselves on import.
"""

from fusion import projectors as _projectors  # noqa: E402,F401
from fusion import strategies as _strategies  # noqa: E402,F401
from fusion.attention import attention  # noqa: F401
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import (
    create_fusion,
    create_projector,
    get_fusion_class,
    list_fusions,
    list_projectors,
    make_fusion_config,
    register_fusion,
    register_projector,
)

__all__ = [
    "Fusion",
    "FusionConfig",
    "FusionConfigError",
    "attention",
    "create_fusion",
    "create_projector",
    "get_fusion_class",
    "list_fusions",
    "list_projectors",
    "make_fusion_config",
    "register_fusion",
    "register_projector",
]
