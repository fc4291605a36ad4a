"""The expert zoo: vision experts behind one feature-map interface.

>>> import experts
>>> experts.list_experts("*-tiny")            # doctest: +SKIP
>>> clip = experts.create_expert("clip-tiny")
>>> fmap = clip(clip.preprocess(images))      # FeatureMap, features (B, C, H, W)

Each family lives in its own module and registers its presets on import.
"""

# Family modules register their presets on import.
from experts import families as _families  # noqa: E402,F401
from experts.align import ALIGN_METHODS, align_to_grid  # noqa: F401
from experts.base import Expert, StageState, collate_inputs
from experts.images import ImageError, load_image, resize_normalise
from experts.registry import create_expert, get_spec, list_experts, register_expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap
from experts.tiling import map_specs
from experts.tiling_policy import TilingPolicy

__all__ = [
    "ALIGN_METHODS",
    "Expert",
    "ExpertInputs",
    "ExpertSpec",
    "FeatureMap",
    "ImageError",
    "StageState",
    "TilingPolicy",
    "align_to_grid",
    "collate_inputs",
    "create_expert",
    "get_spec",
    "list_experts",
    "load_image",
    "map_specs",
    "register_expert",
    "resize_normalise",
]
