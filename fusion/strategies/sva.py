"""Cambrian-1's Spatial Vision Aggregator (SVA): a learnable query grid reads local windows.

Tong et al., *Cambrian-1: A Fully Open, Vision-Centric Exploration of Multimodal LLMs*,
NeurIPS 2024 (arXiv 2406.16860), section 3.3. A learnable ``(Gh, Gw)`` query grid (Cambrian:
24x24 = 576 tokens); query ``(y, x)`` cross-attends only to its own window of every expert's
map, with separate key/value projections per expert, and global context (each expert's mean
token) added to the queries. The spatial inductive bias keeps the token count fixed however
many experts and resolutions are mixed::

    expert i map (B, C_i, H_i, W_i) -> resized to (Gh*k_i, Gw*l_i), k_i = ceil(H_i / Gh),
                                       l_i = ceil(W_i / Gw)   (no-op when divisible)
        -> windows (B, Gh*Gw, k_i*l_i, C_i) + window position embedding_i
    context = Linear(LN(concat_i masked-mean(map_i)))                      (B, D)
    num_layers x:
        q = q + context                                                    (B, Gh*Gw, D)
        K, V = concat_i LN_i+Linear_i(window_i)          (B, Gh*Gw, sum_i k_i*l_i, D)
        q = q + O(attention(LN+Linear(q), K, V, mask))   one query per window, heads M
        q = q + MLP(LN(q))
    -> (B, Gh*Gw, D), out_grid = (Gh, Gw)

Grids that are not a multiple of the query grid (or are smaller than it) are bilinearly
*up*-sampled to the next multiple (``experts.align.interpolate``, masks carried), so no
token is dropped: a 5x5 map under a 2x2 query grid becomes 6x6 with 3x3 windows, a 1x1 map
becomes 2x2 with 1x1 windows. Ragged (Pix2Struct) cells are masked out of the attention and
of the global mean; a query whose windows are all padding outputs its residual stream only.
With a single key per window (one expert whose grid equals the query grid) the attention
weight is always 1, so the layer skips the query/key projections and passes the value on.
Cambrian also re-inserts the aggregator inside the LLM's layers (its "multi-layer
aggregation"); that needs LLM hooks and is out of scope here: this is the connector before
the LLM, stacked ``num_layers`` times. Attention goes through :func:`fusion.attention.attention`
and is vectorised over windows (every window is one attention row; no loop over tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import interpolate
from experts.spec import ExpertSpec, FeatureMap
from fusion.attention import attention
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import register_fusion


@dataclass
class SVAConfig(FusionConfig):
    """Options of :class:`SpatialVisionAggregator`.

    ``grid`` is the query grid (``None``: the first expert's grid; Cambrian uses 24x24) and
    ``dim`` the query width (``None``: the first expert's channels). SVA reads windows at each
    expert's own resolution; the only resizing it does is the bilinear up-sampling to a
    multiple of the query grid, so ``align`` must be ``"auto"`` or ``"bilinear"``.

    Attributes:
        num_layers: stacked aggregator layers (Cambrian-1 uses 3 before the LLM).
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        window_pos_embed: learnable position embedding inside each expert's window.
    """

    num_layers: int = 3
    num_heads: int = 8
    mlp_ratio: float = 4.0
    window_pos_embed: bool = True


def window_shape(grid: tuple[int, int], query_grid: tuple[int, int]) -> tuple[int, int]:
    """Window ``(k, l)`` of a map with ``grid`` under ``query_grid``: ``ceil`` of the ratio."""
    return max(1, math.ceil(grid[0] / query_grid[0])), max(1, math.ceil(grid[1] / query_grid[1]))


def to_windows(
    fmap: FeatureMap, query_grid: tuple[int, int], window: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``fmap`` to ``query_grid * window`` if needed and cut it into windows.

    Returns:
        tokens ``(B, Gh*Gw, k*l, C)`` (row-major inside each window) and the validity mask
        ``(B, Gh*Gw, k*l)``.
    """
    (gh, gw), (kh, kw) = query_grid, window
    fmap = interpolate(fmap, (gh * kh, gw * kw))
    b, c = fmap.features.shape[:2]
    x = fmap.features.reshape(b, c, gh, kh, gw, kw).permute(
        0, 2, 4, 3, 5, 1
    )  # (B, Gh, Gw, k, l, C)
    m = fmap.valid().reshape(b, gh, kh, gw, kw).permute(0, 1, 3, 2, 4)  # (B, Gh, Gw, k, l)
    return x.reshape(b, gh * gw, kh * kw, c), m.reshape(b, gh * gw, kh * kw)


def masked_mean(fmap: FeatureMap) -> torch.Tensor:
    """Mean over the valid cells: ``(B, C, H, W) -> (B, C)`` (zeros when none is valid)."""
    m = fmap.valid()[:, None].to(fmap.features.dtype)
    return (fmap.features * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)


class SVALayer(nn.Module):
    """One aggregator layer: context, windowed multi-expert cross-attention, MLP.

    Args:
        dim: query width ``D``.
        channels: ``C_i`` per expert.
        windows: window ``(k_i, l_i)`` per expert.
        cfg: the strategy's config.
    """

    def __init__(
        self, dim: int, channels: Sequence[int], windows: Sequence[tuple[int, int]], cfg: SVAConfig
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.context_proj = nn.Sequential(
            nn.LayerNorm(sum(channels)), nn.Linear(sum(channels), dim)
        )
        # One key per window (a single expert whose grid equals the query grid): softmax over
        # one key is 1, so queries and keys cannot change the output and are not built.
        self.single_key = sum(kh * kw for kh, kw in windows) == 1
        self.q_proj: nn.Module | None = None
        self.k_proj: nn.ModuleList | None = None
        if not self.single_key:
            self.q_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
            self.k_proj = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(c), nn.Linear(c, dim)) for c in channels
            )
        self.v_proj = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c), nn.Linear(c, dim)) for c in channels
        )
        self.window_pos = (
            nn.ParameterList(
                nn.Parameter(torch.randn(kh * kw, c) * 0.02)
                for (kh, kw), c in zip(windows, channels)
            )
            if cfg.window_pos_embed
            else None
        )
        self.o_proj = nn.Linear(dim, dim)
        hidden = max(1, round(dim * cfg.mlp_ratio))
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )

    def keys_values(
        self, windows: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per-expert K/V of the windows ``(B, N, k_i*l_i, C_i)`` -> two ``(B, N, K, D)``
        (keys None with a single key per window)."""
        keys, values = [], []
        for i, win in enumerate(windows):
            if self.window_pos is not None:
                win = win + self.window_pos[i]
            if self.k_proj is not None:
                keys.append(self.k_proj[i](win))
            values.append(self.v_proj[i](win))
        return (torch.cat(keys, 2) if keys else None), torch.cat(values, 2)

    def forward(
        self,
        query: torch.Tensor,
        windows: Sequence[torch.Tensor],
        mask: torch.Tensor | None,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """``query (B, N, D)``, ``windows[i] (B, N, k_i*l_i, C_i)``, ``mask (B, N, K)`` bool
        (or None), ``context (B, sum C_i)`` -> ``(B, N, D)``."""
        b, n, d = query.shape
        h = self.num_heads
        query = query + self.context_proj(context)[:, None]
        keys, values = self.keys_values(windows)  # (B, N, K, D)
        if keys is None or self.q_proj is None:  # one key: attention returns its value
            out = values[:, :, 0] if mask is None else values[:, :, 0] * mask[:, :, :1]
        else:
            k_len = keys.shape[2]
            # One attention row per window: (B*N, heads, 1 | K, D/heads).
            q = self.q_proj(query).reshape(b * n, 1, h, d // h).transpose(1, 2)
            k = keys.reshape(b * n, k_len, h, d // h).transpose(1, 2)
            v = values.reshape(b * n, k_len, h, d // h).transpose(1, 2)
            if mask is not None:
                mask = mask.reshape(b * n, 1, 1, k_len)
            out = attention(q, k, v, mask)  # (B*N, heads, 1, D/heads)
            out = out.transpose(1, 2).reshape(b, n, d)
        query = query + self.o_proj(out)
        return query + self.mlp(query)


@register_fusion("sva")
class SpatialVisionAggregator(Fusion):
    """Cambrian-1's SVA (see the module docstring)."""

    config_class = SVAConfig
    config: SVAConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: SVAConfig | None = None) -> None:
        super().__init__(specs, config)
        cfg = self.config
        first = self.specs[0]
        grid = tuple(int(g) for g in cfg.grid) if cfg.grid is not None else tuple(first.grid)
        dim = cfg.dim if cfg.dim is not None else first.channels
        problems = []
        if len(grid) != 2 or min(grid) < 1:
            problems.append(f"grid={grid} (expected two positive ints)")
        if dim < 1 or dim % max(cfg.num_heads, 1):
            problems.append(
                f"dim={dim} (expected a positive multiple of num_heads={cfg.num_heads}"
                + ("" if cfg.dim is not None else f"; dim defaults to {first.name!r}'s channels")
                + ")"
            )
        if cfg.align not in ("auto", "bilinear"):
            problems.append(
                f"align={cfg.align!r} (SVA attends to windows at each expert's own resolution "
                "and only up-samples bilinearly to a multiple of the query grid: expected "
                "'auto' or 'bilinear')"
            )
        if cfg.num_layers < 1 or cfg.num_heads < 1 or cfg.mlp_ratio <= 0:
            problems.append(
                f"num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, "
                f"mlp_ratio={cfg.mlp_ratio} (expected >= 1, >= 1, > 0)"
            )
        if problems:
            raise FusionConfigError("fusion 'sva': invalid options " + "; ".join(problems))
        self.grid: tuple[int, int] = grid  # type: ignore[assignment]
        self.windows = [window_shape(s.grid, self.grid) for s in self.specs]
        n = grid[0] * grid[1]
        self.num_tokens, self.out_dim, self.out_grid = n, dim, self.grid
        self.queries = nn.Parameter(torch.randn(n, dim) * 0.02)
        channels = [s.channels for s in self.specs]
        self.layers = nn.ModuleList(
            SVALayer(dim, channels, self.windows, cfg) for _ in range(cfg.num_layers)
        )

    def prepare(
        self, maps: Sequence[FeatureMap]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """Windows ``[(B, N, k_i*l_i, C_i)]``, their mask ``(B, N, K)`` (None: all valid) and
        the global context ``(B, sum C_i)`` of the experts' maps."""
        windows, masks = zip(*(to_windows(m, self.grid, w) for m, w in zip(maps, self.windows)))
        context = torch.cat([masked_mean(m) for m in maps], 1)
        mask = torch.cat(masks, 2) if any(m.mask is not None for m in maps) else None
        return list(windows), mask, context

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``maps[i]`` ``(B, C_i, H_i, W_i)`` -> ``(B, Gh*Gw, D)``."""
        self.check_maps(maps)
        windows, mask, context = self.prepare(maps)
        q = self.queries.unsqueeze(0).expand(maps[0].features.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, windows, mask, context)
        return q
