"""Channel concatenation (Eagle's winner), plus the alignment helpers the simple strategies share.

Eagle (Shi et al., "Eagle: Exploring the Design Space for Multimodal LLMs with Mixture of
Encoders", arXiv 2408.15998) finds that the simplest fusion works best: bring every expert's
map to one token grid and stack the maps along channels::

    expert 1  (B, C1, H1, W1) --align--> (B, C1', h, w) --+
    expert 2  (B, C2, H2, W2) --align--> (B, C2', h, w) --+--cat(dim=1)--> (B, sum C', h, w)
    ...                                                   |
                                                          +--> tokens (B, h*w, sum C')
                                                               --[Linear, if dim]--> (B, h*w, D)

``C' = C`` for bilinear/avgpool alignment and ``C' = C * r * r`` for pixel-unshuffle with factor
``r`` (Eagle's choice for SAM's 64x64 map under a 32x32 grid). The grid is ``config.grid`` or,
by default, the first expert's grid. Cells outside a ragged map's validity mask (Pix2Struct)
are zeroed before the concatenation so that padding never reaches the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import ALIGN_METHODS, align_to_grid, aligned_channels
from experts.spec import ExpertSpec, FeatureMap
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import register_fusion


def resolve_grid(
    fusion_name: str, grid: Sequence[int] | None, default: tuple[int, int]
) -> tuple[int, int]:
    """``grid`` as a validated ``(H, W)`` of positive ints, or ``default`` when it is ``None``."""
    if grid is None:
        return (int(default[0]), int(default[1]))
    if len(grid) != 2 or any(int(g) != g or int(g) < 1 for g in grid):
        raise FusionConfigError(
            f"fusion {fusion_name!r}: grid must be two positive integers (H, W), got {grid!r}"
        )
    return (int(grid[0]), int(grid[1]))


def check_align_method(
    fusion_name: str, method: str, allowed: Sequence[str] = ALIGN_METHODS
) -> str:
    """Raise :class:`FusionConfigError` unless ``method`` is one of ``allowed``."""
    if method not in allowed:
        raise FusionConfigError(
            f"fusion {fusion_name!r}: unknown alignment method {method!r}; "
            f"expected one of {tuple(allowed)}"
        )
    return method


def checked_aligned_channels(
    fusion_name: str, spec: ExpertSpec, grid: tuple[int, int], method: str
) -> int:
    """Channels of ``spec``'s map after alignment to ``grid``; build-time error if impossible."""
    try:
        return aligned_channels(spec.channels, spec.grid, grid, method)  # type: ignore[arg-type]
    except ValueError as err:
        raise FusionConfigError(
            f"fusion {fusion_name!r}: cannot align expert {spec.name!r} (grid {spec.grid}) to "
            f"grid {grid} with {method!r}: {err}"
        ) from err


def check_index(fusion_name: str, option: str, index: int, specs: Sequence[ExpertSpec]) -> int:
    """Validate an expert index given in a config option."""
    if not isinstance(index, int) or not -len(specs) <= index < len(specs):
        raise FusionConfigError(
            f"fusion {fusion_name!r}: {option}={index!r} is not an expert index; "
            f"there are {len(specs)} experts {[s.name for s in specs]}"
        )
    return index % len(specs)


def zero_invalid(fmap: FeatureMap) -> torch.Tensor:
    """``fmap.features`` ``(B, C, H, W)`` with cells outside the validity mask set to zero."""
    if fmap.mask is None:
        return fmap.features
    return fmap.features * fmap.mask[:, None].to(fmap.features.dtype)


@dataclass
class ChannelConcatConfig(FusionConfig):
    """Options of :class:`ChannelConcat`.

    Attributes:
        expert_align: optional alignment method per expert (overrides ``align`` for that
            expert), e.g. ``("bilinear", "unshuffle")`` as Eagle does for CLIP + SAM.
    """

    expert_align: tuple[str, ...] | None = None


@register_fusion("channel_concat")
class ChannelConcat(Fusion):
    """Align all maps to one grid, concat channels: ``(B, h*w, sum C')`` or ``(B, h*w, D)``."""

    config_class = ChannelConcatConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: ChannelConcatConfig | None = None):
        super().__init__(specs, config)
        cfg: ChannelConcatConfig = self.config  # type: ignore[assignment]
        self.grid = resolve_grid(self.name, cfg.grid, self.specs[0].grid)
        methods = (
            cfg.expert_align if cfg.expert_align is not None else (cfg.align,) * len(self.specs)
        )
        if len(methods) != len(self.specs):
            raise FusionConfigError(
                f"fusion {self.name!r}: expert_align has {len(methods)} entries, "
                f"expected one per expert ({len(self.specs)})"
            )
        self.methods = [check_align_method(self.name, m) for m in methods]
        self.expert_channels = [
            checked_aligned_channels(self.name, s, self.grid, m)
            for s, m in zip(self.specs, self.methods)
        ]
        concat_dim = sum(self.expert_channels)
        self.proj: nn.Module = nn.Linear(concat_dim, cfg.dim) if cfg.dim else nn.Identity()
        self.num_tokens = self.grid[0] * self.grid[1]
        self.out_dim = cfg.dim or concat_dim
        self.out_grid = self.grid

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``maps[i]`` ``(B, C_i, H_i, W_i)`` -> tokens ``(B, h*w, D)``."""
        self.check_maps(maps)
        aligned = [align_to_grid(m, self.grid, meth) for m, meth in zip(maps, self.methods)]
        x = torch.cat([zero_invalid(a) for a in aligned], dim=1)  # (B, sum C', h, w)
        return self.proj(x.flatten(2).transpose(1, 2))  # (B, h*w, D)
