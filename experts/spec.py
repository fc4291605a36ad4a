"""Typed descriptions shared by every expert: :class:`ExpertSpec` and :class:`FeatureMap`.

An :class:`ExpertSpec` is the expert's metadata, in the spirit of timm's ``pretrained_cfg`` +
``feature_info``: everything a fusion strategy, a data loader or a sweep table needs to know
about an expert without running it. Preprocessing, grid sizes and channel counts are *derived*
from the spec, never re-typed elsewhere.

A :class:`FeatureMap` is what every expert's forward returns: a ``(B, C, H, W)`` tensor plus
the stride it was read at, the expert it came from and, for ragged grids (Pix2Struct), a
``(B, H, W)`` validity mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from experts.tiling_policy import TilingPolicy

ExpertInputs = dict[str, torch.Tensor]
"""Batched inputs of one expert, e.g. ``{"pixel_values": (B, 3, H, W)}``."""

Architecture = Literal["vit", "convnet"]


@dataclass(frozen=True)
class ExpertSpec:
    """Static description of one vision expert.

    Attributes:
        name: preset name in the registry, e.g. ``"clip-vit-l-336"`` or ``"clip-tiny"``.
        family: expert family, e.g. ``"clip"``, ``"convnext"``, ``"sam"``.
        library: the maintained library that implements it (``"transformers"``, ``"timm"``,
            ``"open_clip"``).
        role: Eagle's taxonomy (``"alignment"``, ``"object"``, ``"ocr"``, ``"segmentation"``,
            ``"self-supervised"``, ``"high-resolution"``).
        architecture: ``"vit"`` (patch tokens + blocks) or ``"convnet"`` (hierarchical stages).
        checkpoint: hub id, local folder/file, or ``None`` for random initialisation.
        input_size: native ``(H, W)`` the expert's images are resized to.
        patch_size: patch size (ViT) or total stride (ConvNet) of the output map.
        channels: channels ``C`` of the output map.
        grid: ``(H, W)`` of the output map at ``input_size``.
        mean: per-channel normalisation mean (RGB, in ``[0, 1]`` units).
        std: per-channel normalisation std.
        layers: indices of the intermediate layers that can be read out as maps
            (ViT: block indices; ConvNet: stage indices).
        layer_channels: channels of each readable layer, aligned with ``layers``.
        num_stages: number of stage groups for staged execution (0: not supported).
        variable_resolution: True when the grid depends on the image's aspect ratio and the
            map carries a validity mask (Pix2Struct).
        max_patches: for variable-resolution experts, the patch budget per image.
        arch: library-specific architecture arguments (depth, width, ...). Tiny and real
            presets differ only here.
        tiling: an optional :class:`~experts.tiling_policy.TilingPolicy` (a dict is converted): the
            expert cuts images into tiles of ``input_size`` and stitches their maps. ``grid``
            and ``input_size`` stay those of one tile; :func:`experts.tiling.map_specs` gives
            the maps fusion sees.
    """

    name: str
    family: str
    library: str
    role: str
    architecture: Architecture
    checkpoint: str | None
    input_size: tuple[int, int]
    patch_size: int
    channels: int
    grid: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: tuple[int, ...] = ()
    layer_channels: tuple[int, ...] = ()
    num_stages: int = 0
    variable_resolution: bool = False
    max_patches: int | None = None
    arch: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    tiling: Any = None

    def __post_init__(self) -> None:
        if self.tiling is not None:
            object.__setattr__(self, "tiling", TilingPolicy.from_value(self.tiling))

    @property
    def num_tokens(self) -> int:
        """Tokens of the output map at the native size: ``H * W``."""
        return self.grid[0] * self.grid[1]

    def replace(self, **changes: Any) -> ExpertSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists); ``tiling`` only when set."""
        d = dataclasses.asdict(self)
        if d["tiling"] is None:
            del d["tiling"]
        return d

    def cache_key(self) -> dict[str, Any]:
        """What identifies this expert's output for a given image: used by the feature cache
        (the tiling policy included when set, so tiled and untiled maps never mix). The
        checkpoint's location is left out: the cache adds a hash of the weights themselves, so
        the same weights in two checkouts share their maps and new weights at the same path
        do not."""
        d = self.to_dict()
        d.pop("role", None)
        d.pop("checkpoint", None)
        return d


@dataclass
class FeatureMap:
    """One expert's output as a spatial map.

    Attributes:
        features: ``(B, C, H, W)`` float tensor.
        stride: input pixels per map cell (patch size or ConvNet stride).
        source: the expert (preset name) and layer it came from, e.g. ``"clip-tiny"`` or
            ``"convnext-tiny:stage2"``.
        mask: optional ``(B, H, W)`` bool tensor, True where a cell holds a real patch. ``None``
            means every cell is valid.
        thumbnail: a tiled expert's thumbnail map ``(B, C, h, w)`` (the whole image at the
            expert's native size), presented to fusion as one more map; ``None`` otherwise.
    """

    features: torch.Tensor
    stride: int
    source: str
    mask: torch.Tensor | None = None
    thumbnail: FeatureMap | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 4:
            raise ValueError(
                f"FeatureMap from {self.source!r}: features must be (B, C, H, W), "
                f"got shape {tuple(self.features.shape)}"
            )
        if self.mask is not None and self.mask.shape != (
            self.features.shape[0],
            *self.features.shape[2:],
        ):
            raise ValueError(
                f"FeatureMap from {self.source!r}: mask must be (B, H, W) = "
                f"{(self.features.shape[0], *self.features.shape[2:])}, "
                f"got {tuple(self.mask.shape)}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` of the map."""
        return int(self.features.shape[-2]), int(self.features.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    def tokens(self) -> torch.Tensor:
        """The map as a token sequence ``(B, H*W, C)`` in row-major order."""
        return self.features.flatten(2).transpose(1, 2)

    def valid(self) -> torch.Tensor:
        """``(B, H, W)`` bool validity mask (all True when ``mask`` is None)."""
        if self.mask is not None:
            return self.mask
        b, _, h, w = self.features.shape
        return torch.ones(b, h, w, dtype=torch.bool, device=self.features.device)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FeatureMap:
        """Move the map (and its mask) to ``device``; cast the features to ``dtype``."""
        mask = self.mask.to(device) if (self.mask is not None and device is not None) else self.mask
        thumb = None if self.thumbnail is None else self.thumbnail.to(device, dtype)
        return FeatureMap(
            self.features.to(device=device, dtype=dtype), self.stride, self.source, mask, thumb
        )
