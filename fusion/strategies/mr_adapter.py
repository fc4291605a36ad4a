"""LLaVA-HR's mixture-of-resolution adapter: a high-res ConvNet steers a low-res ViT.

LLaVA-HR (Luo et al., "Feast Your Eyes: Mixture-of-Resolution Adaptation for Multimodal Large
Language Models", arXiv 2403.03003). The ViT runs in stage groups (``Expert.embed`` /
``run_stage``); after the chosen groups (default: every group but the last) an adapter injects
the high-resolution convolutional expert's map into the ViT's hidden map::

    ViT:  embed -> stage 0 -> [adapter] -> stage 1 -> [adapter] -> ... -> stage k-1 -> finish
                                 ^                        ^
    ConvNet map (B, C_h, H, W) --+------------------------+   (final stage, or per-stage maps)

    adapter(x (B, C, h, w), f (B, C_h, H, W)):
        high = align_to(h, w)(Conv1x1 -> GELU -> Conv1x1 (C_h -> C))(f)   avg-pool if larger,
                                                                          bilinear if smaller
        low  = x + Conv1x1(DWConv7x7(x))
        g    = MLP([mean(low), mean(high)])                               (B, C)
        out  = low + tanh(g) * high

The last 1x1 conv of both paths starts at zero, so at initialisation the adapter is the
identity and the fusion returns exactly the bare ViT's map. ``injection="final"`` feeds the
ConvNet's output map to every adapter (the released LLaVA-HR); ``injection="per_stage"``
feeds adapter ``t`` the ConvNet stage ``highres_layers[t]`` (read with ``forward_layers``;
default: the last stages, in order), so shallow ViT groups see shallow ConvNet stages.

Which expert is which comes from the specs: the ViT is ``vit_index`` or the first
``architecture == "vit"`` expert with ``num_stages >= 2``; the high-res expert is
``highres_index`` or the ``architecture == "convnet"`` expert with the largest input
resolution at least the ViT's. Output tokens are the ViT's final map, on ``grid`` (default
the ViT grid); any further experts are aligned to that grid and concatenated along channels
(Eagle-style), and ``dim`` adds a Linear. The ViT (and, per stage, the ConvNet) are listed in
:meth:`MRAdapterFusion.staged_experts`: the feature cache never serves them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import align_to_grid
from experts.base import Expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import register_fusion
from fusion.strategies.channel_concat import (
    check_align_method,
    check_index,
    checked_aligned_channels,
    resolve_grid,
    zero_invalid,
)

logger = logging.getLogger(__name__)

INJECTIONS = ("final", "per_stage")


class MRAdapter(nn.Module):
    """One mixture-of-resolution adapter: ViT map ``(B, C, h, w)`` + high-res map -> same shape."""

    def __init__(self, dim: int, highres_dim: int, gate_reduction: int = 4) -> None:
        super().__init__()
        self.high = nn.Sequential(nn.Conv2d(highres_dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.low_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.low_pw = nn.Conv2d(dim, dim, 1)
        hidden = max(1, dim // gate_reduction)
        self.gate = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for conv in (self.high[-1], self.low_pw):  # identity at initialisation
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, highres: FeatureMap) -> torch.Tensor:
        """``x`` ``(B, C, h, w)``, ``highres`` ``(B, C_h, H, W)`` -> ``(B, C, h, w)``."""
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        high = self.high(zero_invalid(highres))  # (B, C, H, W)
        high = align_to_grid(FeatureMap(high, highres.stride, highres.source, highres.mask), grid)
        valid = high.valid()[:, None].to(x.dtype)  # (B, 1, h, w)
        high_feat = high.features * valid
        high_mean = high_feat.sum((2, 3)) / valid.sum((2, 3)).clamp_min(1.0)  # (B, C)
        low = x + self.low_pw(self.low_dw(x))
        g = torch.tanh(self.gate(torch.cat([low.mean((2, 3)), high_mean], dim=1)))  # (B, C)
        return low + g[..., None, None] * high_feat


@dataclass
class MRAdapterConfig(FusionConfig):
    """Options of :class:`MRAdapterFusion`.

    Attributes:
        vit_index: the ViT driven stage by stage (default: first staged ViT).
        highres_index: the high-resolution ConvNet (default: the largest-input ConvNet).
        injection: ``"final"`` (ConvNet output map into every adapter, released LLaVA-HR) or
            ``"per_stage"`` (adapter ``t`` gets ConvNet stage ``highres_layers[t]``).
        inject_after: ViT stage groups after which an adapter runs (default: all but the last).
        highres_layers: ConvNet layers for ``per_stage`` (default: its last readable layers).
        gate_reduction: hidden width of the gate MLP is ``C // gate_reduction``.
    """

    vit_index: int | None = None
    highres_index: int | None = None
    injection: str = "final"
    inject_after: tuple[int, ...] | None = None
    highres_layers: tuple[int, ...] | None = None
    gate_reduction: int = 4


def _describe(specs: Sequence[ExpertSpec]) -> list[str]:
    return [
        f"{s.name} ({s.architecture}, num_stages={s.num_stages}, input_size={s.input_size}"
        + (", tiled: runs tiles, not stages)" if s.tiling is not None else ")")
        for s in specs
    ]


def _is_staged_vit(spec: ExpertSpec) -> bool:
    """A fixed-grid ViT with stage groups; a tiled ViT runs its tiles, not stages, so it is not."""
    return (
        spec.architecture == "vit"
        and spec.num_stages >= 2
        and not spec.variable_resolution
        and spec.tiling is None
    )


@register_fusion("mr_adapter")
class MRAdapterFusion(Fusion):
    """LLaVA-HR: ViT tokens ``(B, h*w, C)`` refined by a high-res ConvNet between stage groups."""

    config_class = MRAdapterConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: MRAdapterConfig | None = None):
        super().__init__(specs, config)
        cfg: MRAdapterConfig = self.config  # type: ignore[assignment]
        thumbs = [s.name for s in self.expert_specs if s.tiling is not None and s.tiling.thumbnail]
        if thumbs:
            raise FusionConfigError(
                f"fusion {self.name!r} indexes experts one map each; {thumbs} tile with a "
                "thumbnail (two maps per expert): tile them without thumbnail=True"
            )
        self.vit_index = self._pick_vit(cfg)
        vit = self.specs[self.vit_index]
        self.highres_index = self._pick_highres(cfg, vit)
        hr = self.specs[self.highres_index]
        if cfg.injection not in INJECTIONS:
            raise FusionConfigError(
                f"fusion {self.name!r}: injection={cfg.injection!r}; expected one of {INJECTIONS}"
            )
        self.injection = cfg.injection
        after = cfg.inject_after if cfg.inject_after is not None else range(vit.num_stages - 1)
        self.inject_after = sorted(set(after))
        if not self.inject_after or any(
            not isinstance(i, int) or not 0 <= i < vit.num_stages for i in self.inject_after
        ):
            raise FusionConfigError(
                f"fusion {self.name!r}: inject_after={cfg.inject_after!r} must name stage groups "
                f"0..{vit.num_stages - 1} of ViT {vit.name!r} (at least one)"
            )
        highres_dims = self._highres_dims(cfg, hr)
        if not isinstance(cfg.gate_reduction, int) or cfg.gate_reduction < 1:
            raise FusionConfigError(
                f"fusion {self.name!r}: gate_reduction must be a positive int, "
                f"got {cfg.gate_reduction!r}"
            )
        self.vit_dim = vit.layer_channels[0] if vit.layer_channels else vit.channels
        self.adapters = nn.ModuleList(
            MRAdapter(self.vit_dim, c, cfg.gate_reduction) for c in highres_dims
        )
        # Output: the ViT's final map plus the remaining experts, channel-concatenated.
        self.align = check_align_method(self.name, cfg.align)
        self.grid = resolve_grid(self.name, cfg.grid, vit.grid)
        self.other_indices = [
            i for i in range(len(self.specs)) if i not in (self.vit_index, self.highres_index)
        ]
        concat = checked_aligned_channels(self.name, vit, self.grid, self.align) + sum(
            checked_aligned_channels(self.name, self.specs[i], self.grid, self.align)
            for i in self.other_indices
        )
        self.proj: nn.Module = nn.Linear(concat, cfg.dim) if cfg.dim else nn.Identity()
        self.num_tokens = self.grid[0] * self.grid[1]
        self.out_dim = cfg.dim or concat
        self.out_grid = self.grid

    # ------------------------------------------------------------------ build-time choices
    def _pick_vit(self, cfg: MRAdapterConfig) -> int:
        if cfg.vit_index is not None:
            i = check_index(self.name, "vit_index", cfg.vit_index, self.specs)
            if not _is_staged_vit(self.specs[i]):
                raise FusionConfigError(
                    f"fusion {self.name!r}: vit_index={cfg.vit_index} names "
                    f"{_describe([self.specs[i]])[0]}; it needs a fixed-grid ViT with staged "
                    f"execution (architecture='vit', num_stages >= 2)"
                )
            return i
        for i, s in enumerate(self.specs):
            if _is_staged_vit(s):
                return i
        raise FusionConfigError(
            f"fusion {self.name!r} needs a ViT expert with staged execution (architecture='vit', "
            f"num_stages >= 2, fixed grid) to inject into; got {_describe(self.specs)}"
        )

    def _pick_highres(self, cfg: MRAdapterConfig, vit: ExpertSpec) -> int:
        if cfg.highres_index is not None:
            i = check_index(self.name, "highres_index", cfg.highres_index, self.specs)
            if i == self.vit_index or self.specs[i].architecture != "convnet":
                raise FusionConfigError(
                    f"fusion {self.name!r}: highres_index={cfg.highres_index} names "
                    f"{_describe([self.specs[i]])[0]}; it needs a convolutional expert "
                    f"(architecture='convnet') other than the ViT"
                )
            return i
        area = vit.input_size[0] * vit.input_size[1]
        fits = [
            i
            for i, s in enumerate(self.specs)
            if i != self.vit_index
            and s.architecture == "convnet"
            and s.input_size[0] >= vit.input_size[0]
            and s.input_size[1] >= vit.input_size[1]
        ]
        if not fits:
            raise FusionConfigError(
                f"fusion {self.name!r} needs a high-resolution convolutional expert "
                f"(architecture='convnet', input_size at least the ViT's {vit.input_size}) "
                f"besides ViT {vit.name!r}; got {_describe(self.specs)}"
            )
        best = max(fits, key=lambda i: self.specs[i].input_size[0] * self.specs[i].input_size[1])
        if self.specs[best].input_size[0] * self.specs[best].input_size[1] == area:
            logger.warning(
                "mr_adapter: high-res expert %s runs at the ViT's resolution %s; "
                "give it a larger input_size for LLaVA-HR's mixture of resolutions",
                self.specs[best].name,
                vit.input_size,
            )
        return best

    def _highres_dims(self, cfg: MRAdapterConfig, hr: ExpertSpec) -> list[int]:
        n = len(self.inject_after)
        if self.injection == "final":
            if cfg.highres_layers is not None:
                raise FusionConfigError(
                    f"fusion {self.name!r}: highres_layers only applies to injection='per_stage'"
                )
            self.highres_layers: list[int] = []
            return [hr.channels] * n
        layers = (
            list(cfg.highres_layers) if cfg.highres_layers is not None else list(hr.layers[-n:])
        )
        if len(layers) != n or any(layer not in hr.layers for layer in layers):
            raise FusionConfigError(
                f"fusion {self.name!r}: per-stage injection after ViT groups {self.inject_after} "
                f"needs {n} readable layers of {hr.name!r} (readable: {list(hr.layers)}), "
                f"got highres_layers={layers}"
            )
        self.highres_layers = layers
        return [hr.layer_channels[hr.layers.index(layer)] for layer in layers]

    # ------------------------------------------------------------------ running
    def staged_experts(self) -> set[int]:
        """The ViT; with per-stage injection also the ConvNet (its stages are read directly)."""
        staged = {self.vit_index}
        if self.injection == "per_stage":
            staged.add(self.highres_index)
        return staged

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        raise RuntimeError(
            f"fusion {self.name!r} drives the ViT stage by stage and cannot fuse finished maps: "
            f"call run(experts, inputs, precomputed) instead of forward(maps)"
        )

    def run(
        self,
        experts: Sequence[Expert],
        inputs: Sequence[ExpertInputs],
        precomputed: Mapping[int, FeatureMap] | None = None,
    ) -> torch.Tensor:
        """Drive the ViT with adapters between its stage groups; tokens ``(B, h*w, D)``."""
        if len(experts) != len(self.specs) or len(inputs) != len(self.specs):
            raise ValueError(
                f"fusion {self.name!r} was built for {len(self.specs)} experts "
                f"({[s.name for s in self.specs]}), got {len(experts)} experts and "
                f"{len(inputs)} inputs"
            )

        def full_map(i: int) -> FeatureMap:
            return self.expert_map(i, experts, inputs, precomputed)

        h = self.highres_index
        if self.injection == "per_stage":
            highres = experts[h](inputs[h], layers=self.highres_layers)
        else:
            highres = [full_map(h)] * len(self.inject_after)
        vit = experts[self.vit_index]
        state = vit.embed(inputs[self.vit_index])
        for stage in range(vit.num_stages):
            state = vit.run_stage(state, stage)
            if stage in self.inject_after:
                k = self.inject_after.index(stage)
                x = vit.to_map(state)  # (B, C, h, w)
                if x.shape[1] != self.vit_dim:
                    raise ValueError(
                        f"fusion {self.name!r}: ViT {vit.spec.name!r} stage {stage} has "
                        f"{x.shape[1]} channels, its spec declares {self.vit_dim}"
                    )
                state = vit.from_map(state, self.adapters[k](x, highres[k]))
        maps = [vit.finish(state)] + [full_map(i) for i in self.other_indices]
        aligned = [align_to_grid(m, self.grid, self.align) for m in maps]
        x = torch.cat([zero_invalid(a) for a in aligned], dim=1)  # (B, sum C', h, w)
        return self.proj(x.flatten(2).transpose(1, 2))  # (B, h*w, D)
