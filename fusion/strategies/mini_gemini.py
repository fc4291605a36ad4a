"""Mini-Gemini patch-info mining: low-res tokens query their co-located high-res window.

Mini-Gemini (Li et al., "Mini-Gemini: Mining the Potential of Multi-modality Vision Language
Models", arXiv 2403.18814), section 3.2. The low-resolution expert's tokens are the queries;
query ``(i, j)`` attends only to the ``wh x ww`` cells of the high-resolution map that cover
the same image region (``window = high-res grid / query grid``, e.g. 8x8 for a 192x192 map
under a 24x24 grid)::

    query expert  (B, Cq, h, w) --align to (h, w)--+ (+ other same-or-smaller experts, concat)
                                                   v
                                   X_L (B, h*w, C_L)
    high-res maps (B, C_k, H_k, W_k) --align to (h*wh, w*ww), cat channels-->
                                   X_H (B, C_H, h*wh, w*ww)
      --split into windows--> (B*h*w, wh*ww, C_H)

    Q = Linear(LN(X_L))          (B*h*w, heads, 1, d)
    K = Linear(LN(X_H window))   (B*h*w, heads, wh*ww, d)
    V = Linear(LN(X_H window))   (B*h*w, heads, wh*ww, d)
    out = X_L + attention(Q, K, V)                      (B, h*w, C_L)  [--Linear if dim--> D]

Choices: the query expert is ``query_index`` or the one with the smallest grid; the high-res
set is ``highres_indices`` or every expert whose grid is larger than the query grid in both
directions. Several high-res maps are resized to the finest one's window-aligned grid and
concatenated along channels. With ``highres_layers`` the single high-res expert is read at
those intermediate layers (``Expert.forward_layers``), as MGM concatenates several ConvNeXt
stages upsampled to the finest; the strategy then runs that expert itself
(:meth:`MiniGemini.run`, listed in ``staged_experts``) and the window follows the finest
stage's grid at run time (the spec does not give stage grids). Experts
that are neither (e.g. a second low-res expert) are aligned to the query grid and
concatenated to the query tokens. Key cells outside a ragged map's validity mask are never
attended; query cells outside the query map's mask give zero tokens. The windows are gathered
with one reshape/permute, and attention runs through :func:`fusion.attention.attention`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import align_to_grid
from experts.base import Expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap
from fusion.attention import attention
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import register_fusion
from fusion.strategies.channel_concat import (
    check_align_method,
    check_index,
    resolve_grid,
    zero_invalid,
)

RESAMPLE_METHODS = ("auto", "bilinear", "avgpool")


def _area(grid: Sequence[int]) -> int:
    return int(grid[0]) * int(grid[1])


def _larger(grid: Sequence[int], than: Sequence[int]) -> bool:
    return grid[0] >= than[0] and grid[1] >= than[1] and _area(grid) > _area(than)


def windows(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Split ``x`` ``(B, C, h*wh, w*ww)`` into ``(B*h*w, wh*ww, C)`` co-located windows.

    Row ``b*h*w + i*w + j`` holds the cells ``[i*wh:(i+1)*wh, j*ww:(j+1)*ww]`` of batch ``b``.
    """
    b, c = x.shape[:2]
    (h, w), (wh, ww) = grid, window
    x = x.reshape(b, c, h, wh, w, ww).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, wh, ww, C)
    return x.reshape(b * h * w, wh * ww, c)


@dataclass
class MiniGeminiConfig(FusionConfig):
    """Options of :class:`MiniGemini` (``grid``: the query grid, default the query expert's).

    Attributes:
        query_index: expert whose tokens are the queries (default: the smallest grid).
        highres_indices: experts mined for detail (default: every map larger than the query
            grid).
        heads: attention heads; must divide the query width ``C_L``.
        highres_layers: read the (single) high-res expert at these intermediate layers and
            concatenate them (MGM's multi-stage ConvNeXt map); needs ``highres_indices``.
    """

    query_index: int | None = None
    highres_indices: tuple[int, ...] | None = None
    heads: int = 1
    highres_layers: tuple[int, ...] | None = None


@register_fusion("mini_gemini")
class MiniGemini(Fusion):
    """Patch-info mining: ``(B, h*w, C_L)`` queries over co-located high-res windows."""

    config_class = MiniGeminiConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: MiniGeminiConfig | None = None):
        super().__init__(specs, config)
        cfg: MiniGeminiConfig = self.config  # type: ignore[assignment]
        self.method = check_align_method(self.name, cfg.align, RESAMPLE_METHODS)
        grids = [s.grid for s in self.specs]
        if cfg.query_index is not None:
            self.query_index = check_index(self.name, "query_index", cfg.query_index, self.specs)
        else:
            self.query_index = min(range(len(grids)), key=lambda i: _area(grids[i]))
        self.grid = resolve_grid(self.name, cfg.grid, grids[self.query_index])
        self.highres_layers = self._check_layers(cfg)
        if self.highres_layers is not None:
            hr = [check_index(self.name, "highres_indices", cfg.highres_indices[0], self.specs)]
            if hr[0] == self.query_index:
                raise FusionConfigError(
                    f"fusion {self.name!r}: the high-res expert must not be the query expert "
                    f"{self.specs[self.query_index].name!r}"
                )
        elif cfg.highres_indices is not None:
            hr = [
                check_index(self.name, "highres_indices", i, self.specs)
                for i in cfg.highres_indices
            ]
            bad = [i for i in hr if i == self.query_index or not _larger(grids[i], self.grid)]
            if bad or not hr:
                raise FusionConfigError(
                    f"fusion {self.name!r}: highres_indices {list(cfg.highres_indices)} must name "
                    f"experts other than the query whose grid is larger than the query grid "
                    f"{self.grid}; offending: {[(self.specs[i].name, grids[i]) for i in bad]}"
                )
        else:
            hr = [
                i
                for i in range(len(grids))
                if i != self.query_index and _larger(grids[i], self.grid)
            ]
        if not hr:
            raise FusionConfigError(
                f"fusion {self.name!r} needs at least one expert whose map is larger than the "
                f"query grid {self.grid} (query expert {self.specs[self.query_index].name!r}); got "
                f"grids {[(s.name, s.grid) for s in self.specs]}. Add a high-resolution expert "
                f"or lower the query grid."
            )
        self.highres_indices = sorted(set(hr))
        self.low_indices = [self.query_index] + [
            i for i in range(len(grids)) if i != self.query_index and i not in self.highres_indices
        ]
        low_dim = sum(self.specs[i].channels for i in self.low_indices)
        if self.highres_layers is not None:
            spec = self.specs[self.highres_indices[0]]
            high_dim = sum(spec.layer_channels[spec.layers.index(i)] for i in self.highres_layers)
            self.window: tuple[int, int] | None = None  # from the finest stage at run time
        else:
            high_dim = sum(self.specs[i].channels for i in self.highres_indices)
            finest = max((grids[i] for i in self.highres_indices), key=_area)
            self.window = (finest[0] // self.grid[0], finest[1] // self.grid[1])
        if not isinstance(cfg.heads, int) or cfg.heads < 1 or low_dim % cfg.heads:
            raise FusionConfigError(
                f"fusion {self.name!r}: heads={cfg.heads!r} must be a positive divisor of the "
                f"query width {low_dim}"
            )
        self.heads = cfg.heads
        self.q_proj = nn.Sequential(nn.LayerNorm(low_dim), nn.Linear(low_dim, low_dim))
        self.k_proj = nn.Sequential(nn.LayerNorm(high_dim), nn.Linear(high_dim, low_dim))
        self.v_proj = nn.Sequential(nn.LayerNorm(high_dim), nn.Linear(high_dim, low_dim))
        self.out_proj: nn.Module = nn.Linear(low_dim, cfg.dim) if cfg.dim else nn.Identity()
        self.num_tokens = _area(self.grid)
        self.out_dim = cfg.dim or low_dim
        self.out_grid = self.grid

    def _check_layers(self, cfg: MiniGeminiConfig) -> tuple[int, ...] | None:
        if cfg.highres_layers is None:
            return None
        if len(self.specs) != len(self.expert_specs):
            raise FusionConfigError(
                f"fusion {self.name!r}: highres_layers runs experts one map each; an expert "
                f"tiles with a thumbnail (maps {[s.name for s in self.specs]}): tile it without "
                "thumbnail=True"
            )
        if cfg.highres_indices is None or len(cfg.highres_indices) != 1:
            raise FusionConfigError(
                f"fusion {self.name!r}: highres_layers={cfg.highres_layers!r} reads one expert's "
                f"stages; name that expert with highres_indices=(i,), got "
                f"{cfg.highres_indices!r}"
            )
        i = check_index(self.name, "highres_indices", cfg.highres_indices[0], self.specs)
        readable = self.specs[i].layers
        if not cfg.highres_layers or any(layer not in readable for layer in cfg.highres_layers):
            raise FusionConfigError(
                f"fusion {self.name!r}: highres_layers={cfg.highres_layers!r} must be readable "
                f"layers of {self.specs[i].name!r}: {list(readable)}"
            )
        return tuple(cfg.highres_layers)

    def staged_experts(self) -> set[int]:
        """The high-res expert when its stages are read (the cache holds final maps only),
        and tiled experts with a thumbnail (:meth:`Fusion.staged_experts`)."""
        own = set(self.highres_indices) if self.highres_layers is not None else set()
        return own | super().staged_experts()

    def _window(self, high_maps: Sequence[FeatureMap]) -> tuple[int, int]:
        if self.window is not None:
            return self.window
        finest = max((m.grid for m in high_maps), key=_area)
        if not _larger(finest, self.grid):
            raise ValueError(
                f"fusion {self.name!r}: the finest high-res layer map has grid {finest}, which "
                f"is not larger than the query grid {self.grid}; choose earlier highres_layers"
            )
        return (finest[0] // self.grid[0], finest[1] // self.grid[1])

    def _concat(
        self, maps: Sequence[FeatureMap], grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Align ``maps`` to ``grid`` and concatenate: ``(B, sum C, *grid)`` and ``(B, *grid)``
        validity (a cell is valid where any map has a real value; ``None``: all valid)."""
        aligned = [align_to_grid(m, grid, self.method) for m in maps]
        x = torch.cat([zero_invalid(a) for a in aligned], dim=1)
        masks = [a.mask for a in aligned if a.mask is not None]
        if len(masks) < len(aligned):
            return x, None
        return x, torch.stack(masks).any(0)

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``maps[i]`` ``(B, C_i, H_i, W_i)`` -> tokens ``(B, h*w, D)``."""
        if self.highres_layers is not None:
            raise RuntimeError(
                f"fusion {self.name!r} with highres_layers reads the high-res expert's stages "
                f"itself: call run(experts, inputs, precomputed) instead of forward(maps)"
            )
        self.check_maps(maps)
        return self.mine(
            [maps[i] for i in self.low_indices], [maps[i] for i in self.highres_indices]
        )

    def run(
        self,
        experts: Sequence[Expert],
        inputs: Sequence[ExpertInputs],
        precomputed: Mapping[int, FeatureMap] | None = None,
    ) -> torch.Tensor:
        """Like :meth:`Fusion.run`; with ``highres_layers`` the high-res expert's stages are
        read with ``forward_layers``."""
        if self.highres_layers is None:
            return super().run(experts, inputs, precomputed)
        low = [self.expert_map(i, experts, inputs, precomputed) for i in self.low_indices]
        h = self.highres_indices[0]
        return self.mine(low, experts[h](inputs[h], layers=list(self.highres_layers)))

    def mine(self, low_maps: Sequence[FeatureMap], high_maps: Sequence[FeatureMap]) -> torch.Tensor:
        """Query maps (query expert first) and high-res maps -> tokens ``(B, h*w, D)``."""
        window = self._window(high_maps)
        high_grid = (self.grid[0] * window[0], self.grid[1] * window[1])
        low, low_valid = self._concat(low_maps, self.grid)
        high, high_valid = self._concat(high_maps, high_grid)
        b, c = low.shape[:2]
        n, heads = self.num_tokens, self.heads
        low_tokens = low.flatten(2).transpose(1, 2)  # (B, h*w, C_L)
        win = windows(high, self.grid, window)  # (B*h*w, wh*ww, C_H)
        q = self.q_proj(low_tokens).reshape(b * n, 1, heads, c // heads).transpose(1, 2)
        k = self.k_proj(win).reshape(b * n, -1, heads, c // heads).transpose(1, 2)
        v = self.v_proj(win).reshape(b * n, -1, heads, c // heads).transpose(1, 2)
        mask = None
        if high_valid is not None:
            key_valid = windows(high_valid[:, None], self.grid, window)  # (B*h*w, win, 1)
            mask = key_valid[:, None, None, :, 0]  # (B*h*w, 1, 1, win)
        mined = attention(q, k, v, mask)  # (B*h*w, heads, 1, d)
        tokens = low_tokens + mined.transpose(1, 2).reshape(b, n, c)  # (B, h*w, C_L)
        if low_valid is not None:
            tokens = tokens * low_valid.flatten(1)[..., None].to(tokens.dtype)
        return self.out_proj(tokens)
