"""Sequence append: every expert becomes its own run of visual tokens.

The baseline of Eagle's fusion study (Shi et al., arXiv 2408.15998, "sequence append") and of
Prismatic/DINO-SigLIP-style token concatenation::

    expert i  (B, C_i, H_i, W_i) --align--> (B, C_i', h_i, w_i) --tokens--> (B, h_i*w_i, C_i')
                                                     --Linear_i--> (B, h_i*w_i, D)
    cat over experts along tokens --> (B, N, D),   N = sum_i h_i * w_i

Every expert is aligned to ``config.grid`` (default: the first expert's grid), or, with
``per_expert_grid=True``, to its own native grid (so N is the sum of the experts' native token
counts). ``D`` is ``config.dim`` or, by default, the widest aligned expert. Tokens at cells
outside a ragged map's validity mask (Pix2Struct) are set to zero after the projection, so the
sequence length is fixed and padding carries no signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import align_to_grid
from experts.spec import ExpertSpec, FeatureMap
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import register_fusion
from fusion.strategies.channel_concat import (
    check_align_method,
    checked_aligned_channels,
    resolve_grid,
)


@dataclass
class SequenceAppendConfig(FusionConfig):
    """Options of :class:`SequenceAppend`.

    Attributes:
        per_expert_grid: align each expert to its own native grid instead of ``grid``.
    """

    per_expert_grid: bool = False


@register_fusion("sequence_append")
class SequenceAppend(Fusion):
    """Project each expert to ``D`` and concatenate the token sequences: ``(B, sum h_i w_i, D)``."""

    config_class = SequenceAppendConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: SequenceAppendConfig | None = None):
        super().__init__(specs, config)
        cfg: SequenceAppendConfig = self.config  # type: ignore[assignment]
        self.method = check_align_method(self.name, cfg.align)
        if cfg.per_expert_grid:
            if cfg.grid is not None:
                raise FusionConfigError(
                    f"fusion {self.name!r}: per_expert_grid=True keeps each expert's own grid; "
                    f"do not also set grid={cfg.grid!r}"
                )
            self.grids = [resolve_grid(self.name, None, s.grid) for s in self.specs]
        else:
            grid = resolve_grid(self.name, cfg.grid, self.specs[0].grid)
            self.grids = [grid] * len(self.specs)
        channels = [
            checked_aligned_channels(self.name, s, g, self.method)
            for s, g in zip(self.specs, self.grids)
        ]
        dim = cfg.dim or max(channels)
        self.projs = nn.ModuleList(nn.Linear(c, dim) for c in channels)
        self.num_tokens = sum(h * w for h, w in self.grids)
        self.out_dim = dim
        self.out_grid = self.grids[0] if len(self.specs) == 1 else None

    @property
    def token_grids(self) -> list[tuple[int, int]]:
        """One run of tokens per map, on its aligned grid (token compressors use them)."""
        return list(self.grids)

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``maps[i]`` ``(B, C_i, H_i, W_i)`` -> tokens ``(B, sum_i h_i*w_i, D)``."""
        self.check_maps(maps)
        runs = []
        for fmap, grid, proj in zip(maps, self.grids, self.projs):
            aligned = align_to_grid(fmap, grid, self.method)
            tokens = proj(aligned.tokens())  # (B, h*w, D)
            if aligned.mask is not None:
                tokens = tokens * aligned.mask.flatten(1)[..., None].to(tokens.dtype)
            runs.append(tokens)
        return torch.cat(runs, dim=1)
