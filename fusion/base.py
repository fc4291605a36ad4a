"""The fusion interface: :class:`Fusion` turns several experts' maps into one token sequence.

A strategy is built from the experts' :class:`~experts.spec.ExpertSpec` list plus its own
config dataclass, and checks at build time that the combination makes sense (raising
:class:`FusionConfigError` with what it needs). Its output is ``(B, N, D)`` with
``N = self.num_tokens`` and ``D = self.out_dim``; when the tokens form a grid,
``self.out_grid = (H, W)`` with ``H * W == N`` (token-reducing projectors use it).

Two entry points:

* :meth:`Fusion.forward` ``(maps) -> (B, N, D)``: ``maps[i]`` is expert ``i``'s
  :class:`~experts.spec.FeatureMap`. Every map-level strategy implements only this. A tiled
  expert (:mod:`experts.tiling`) presents its stitched map and, with a thumbnail, one more
  map: ``self.specs`` has one spec per map (``self.expert_specs`` one per expert), and
  strategy options that index experts (``query_index``, ...) index these maps.
* :meth:`Fusion.run` ``(experts, inputs, precomputed) -> (B, N, D)``: what the multimodal
  model calls. The default runs each expert (or takes its map from ``precomputed``, the
  feature cache) and calls ``forward``. Strategies that must drive an expert themselves
  (LLaVA-HR's adapter runs a ViT stage by stage) override it and list those experts in
  :meth:`Fusion.staged_experts`, which the feature cache then never serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.base import Expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap
from experts.tiling import map_specs, map_views


class FusionConfigError(ValueError):
    """A fusion strategy cannot be built for the given experts; says what it needs."""


@dataclass
class FusionConfig:
    """Options shared by every strategy; each strategy subclasses it with its own fields.

    Attributes:
        grid: target token grid ``(H, W)``; ``None`` lets the strategy pick (usually the
            first expert's grid).
        dim: width ``D`` of the fused tokens, where the strategy projects (``None``: its own
            natural width, e.g. the sum of channels for channel concatenation).
        align: grid alignment method (see :mod:`experts.align`).
    """

    grid: tuple[int, int] | None = None
    dim: int | None = None
    align: str = "auto"


class Fusion(nn.Module):
    """Base class of every fusion strategy (see the module docstring)."""

    config_class: type[FusionConfig] = FusionConfig
    name: str = "fusion"

    def __init__(self, specs: Sequence[ExpertSpec], config: FusionConfig | None = None) -> None:
        super().__init__()
        if not specs:
            raise FusionConfigError(f"fusion {self.name!r} needs at least one expert, got none")
        self.expert_specs = list(specs)
        # One spec per map fusion sees: a tiled expert's stitched map (+ its thumbnail).
        self.specs = [m for s in specs for m in map_specs(s)]
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise FusionConfigError(
                f"fusion {self.name!r} takes a {self.config_class.__name__}, "
                f"got {type(self.config).__name__}"
            )
        self.num_tokens: int = 0
        self.out_dim: int = 0
        self.out_grid: tuple[int, int] | None = None

    def staged_experts(self) -> set[int]:
        """Indices of experts this strategy runs itself (never served from the cache): by
        default the tiled experts with a thumbnail (the cache holds one map per image)."""
        return {i for i, s in enumerate(self.expert_specs) if len(map_specs(s)) > 1}

    @property
    def token_grids(self) -> list[tuple[int, int]] | None:
        """Grids of the consecutive runs of output tokens (``None``: not grids); token
        compressors (:mod:`fusion.projectors.compressors`) work run by run."""
        return [self.out_grid] if self.out_grid is not None else None

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """Fuse the experts' maps: ``maps[i]`` from expert ``i``; returns ``(B, N, D)``."""
        raise NotImplementedError

    def run(
        self,
        experts: Sequence[Expert],
        inputs: Sequence[ExpertInputs],
        precomputed: Mapping[int, FeatureMap] | None = None,
    ) -> torch.Tensor:
        """Run the experts (or read their maps from ``precomputed``) and fuse: ``(B, N, D)``.

        A tiled expert with a thumbnail gives two maps (:func:`experts.tiling.map_views`)."""
        maps = [
            view
            for i in range(len(experts))
            for view in map_views(
                self.expert_specs[i], self.expert_map(i, experts, inputs, precomputed)
            )
        ]
        return self(maps)

    @staticmethod
    def expert_map(
        index: int,
        experts: Sequence[Expert],
        inputs: Sequence[ExpertInputs],
        precomputed: Mapping[int, FeatureMap] | None = None,
    ) -> FeatureMap:
        """Expert ``index``'s map: from ``precomputed`` (the feature cache) when there, else run."""
        if precomputed and index in precomputed:
            return precomputed[index]
        return experts[index](inputs[index])

    def check_maps(self, maps: Sequence[FeatureMap]) -> None:
        """Raise a clear error when ``maps`` do not match the specs this module was built for."""
        if len(maps) != len(self.specs):
            raise ValueError(
                f"fusion {self.name!r} was built for {len(self.specs)} experts "
                f"({[s.name for s in self.specs]}), got {len(maps)} maps"
            )
        batch = {f"{i}:{m.source}": m.features.shape[0] for i, m in enumerate(maps)}
        if len(set(batch.values())) > 1:
            raise ValueError(
                f"fusion {self.name!r}: every map needs the same batch size, got {batch}"
            )
        for m, s in zip(maps, self.specs):
            if m.channels != s.channels:
                raise ValueError(
                    f"fusion {self.name!r}: map from {m.source!r} has {m.channels} channels, "
                    f"expert {s.name!r} was declared with {s.channels}"
                )

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
