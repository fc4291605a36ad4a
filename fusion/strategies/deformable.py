"""Deformable-attention fusion: each expert is one level of multi-scale deformable attention.

Zhu et al., *Deformable DETR: Deformable Transformers for End-to-End Object Detection*,
ICLR 2021 (arXiv 2010.04159), section 4.1. Used as a vision-expert fusion as in the
deformable variants of Eagle's / Cambrian's ablations: the queries live on one token grid,
every expert's map stays at its own resolution, and each query reads a few learned points
per head in every expert's map::

    expert i map (B, C_i, H_i, W_i) --Linear_i--> (B, H_i*W_i, D) + level_embed[i]  (level i)
                                          \\ concatenated levels: memory (B, sum H_i*W_i, D)
    queries (B, Gh*Gw, D): base expert aligned to (Gh, Gw), Linear, + pos; or learned (then
    pos = 0: learned queries are per cell already);
    reference point of query (y, x) = cell centre ((x+.5)/Gw, (y+.5)/Gh), scaled per level by
    the level's valid ratio (ragged Pix2Struct maps: the image fills the top-left part).

    num_layers x [ q = LN(q + MSDeformAttn(q + pos, ref, memory)); q = LN(q + FFN(q)) ]
      (norm="pre": q = q + MSDeformAttn(LN(q) + pos, ...); q = q + FFN(LN(q)), identity at init)
    MSDeformAttn: per head h, level l, point p an offset Linear(q) (in cells of level l) and a
    weight softmax_{l,p} Linear(q); values bilinearly sampled (grid_sample) and summed.
        -> (B, Gh*Gw, D), out_grid = (Gh, Gw)

The sampling core is :func:`fusion.ops.multi_scale_deformable_attention` (pure PyTorch, the
reference). Offsets start from Deformable-DETR's radial grid (``offset_init="grid"``) or at
zero (``"zero"``: every point starts at its reference point). Invalid cells of masked levels
are zeroed before sampling, so padding never leaks. Layers are post-norm, as in the paper
(``norm="pre"``: pre-norm and zero-initialised residual branches); the queries have no
self-attention (the paper's decoder has; the query grid here is dense and already spatial).

At the laptop budget of the old tiny default sweep (random-init experts, Cambrian recipe at LR
2e-3, 790 steps) this fusion stayed at chance on colour while channel concatenation learned it.
The colour is in its output at init (linear probe of the mean token 0.90, as channel concat);
during the instruction stage the image-dependent part of its post-LayerNorm tokens shrinks
(across-image std 0.42 -> 0.085 per feature) and the probe falls to 0.26, while the sampling
points drift off the maps (56% outside at init with the radial grid on 4x4/8x8 maps, 70% at the
end). Zero-offset init or 0.1x offset LR (Deformable DETR's recipe) alone do not stop the
collapse; ``norm="pre"`` does (probe 0.94 at the end), but the LLM still does not learn colour
from its tokens in that budget (0.02). The README's deformable notes give the learning curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import ALIGN_METHODS, align_to_grid, aligned_channels
from experts.spec import ExpertSpec, FeatureMap
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.ops import multi_scale_deformable_attention
from fusion.registry import register_fusion

QUERY_MODES = ("base", "learned")
OFFSET_INITS = ("grid", "zero")
NORMS = ("pre", "post")


@dataclass
class DeformableConfig(FusionConfig):
    """Options of :class:`DeformableFusion`.

    ``grid`` is the query grid, ``dim`` the model width; ``align`` is how the base expert's map
    is brought to ``grid`` for ``queries="base"`` (the levels themselves stay at their own
    resolution).

    Attributes:
        queries: ``"base"``: the base expert's map aligned to ``grid`` (with ``align``) and
            projected to ``dim``; ``"learned"``: a learnable ``(Gh*Gw, dim)`` query grid.
        base_expert: index of the expert whose grid (and, for ``"base"``, tokens) define the
            queries; ``grid=None`` means that expert's grid; ``dim=None`` its channels.
        num_layers: stacked deformable cross-attention + FFN layers.
        num_heads: attention heads (must divide ``dim``).
        num_points: sampling points per head and level.
        ffn_ratio: FFN hidden width as a multiple of ``dim``.
        dropout: dropout after attention and FFN.
        offset_init: ``"grid"`` (Deformable-DETR's radial init) or ``"zero"``.
        valid_ratios: scale reference points per level by the valid fraction of ragged maps.
        norm: ``"post"`` (default): Deformable DETR's post-norm layers; ``"pre"``: pre-norm
            residual layers whose attention output projection and last FFN layer start at
            zero, so the fusion starts as the identity on its queries (for ``queries="base"``:
            the base expert's projected tokens) and learns what to add from the other experts.
    """

    queries: str = "base"
    base_expert: int = 0
    num_layers: int = 2
    num_heads: int = 8
    num_points: int = 4
    ffn_ratio: float = 4.0
    dropout: float = 0.0
    offset_init: str = "grid"
    valid_ratios: bool = True
    norm: str = "post"


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, eq. 3): offsets, weights, sampling.

    Args:
        dim: model width ``D``.
        num_heads: heads ``M``; ``D / M`` channels each.
        num_levels: levels ``L`` (experts).
        num_points: points ``P`` per head and level.
        offset_init: ``"grid"`` or ``"zero"`` (see the module docstring).
    """

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, offset_init: str = "grid"
    ) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters(offset_init)

    def reset_parameters(self, offset_init: str = "grid") -> None:
        """Deformable-DETR's init: zero offset weights, radial offset bias, uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        bias = torch.zeros(self.num_heads, self.num_levels, self.num_points, 2)
        if offset_init == "grid":
            heads = torch.arange(self.num_heads, dtype=torch.float32)
            thetas = heads * (2 * math.pi / self.num_heads)
            direction = torch.stack([thetas.cos(), thetas.sin()], -1)
            direction = direction / direction.abs().max(-1, keepdim=True).values
            scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)
            bias = direction[:, None, None, :] * scale[None, None, :, None]
            bias = bias.expand(-1, self.num_levels, -1, -1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling_locations(
        self, query: torch.Tensor, reference_points: torch.Tensor, shapes: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling locations ``(B, Q, M, L, P, 2)`` and softmaxed weights ``(B, Q, M, L, P)``.

        Args:
            query: ``(B, Q, D)`` (with its position embedding added).
            reference_points: ``(B, Q, L, 2)`` normalised ``(x, y)`` per level.
            shapes: ``(H_l, W_l)`` per level; offsets are in cells of their level.
        """
        b, q, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1)
        normaliser = torch.tensor(
            [(w, h) for h, w in shapes], dtype=query.dtype, device=query.device
        )  # (L, 2) as (W, H) to match (x, y)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[:, None, :]
        return locations, weights.view(b, q, m, lv, p)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query (B, Q, D)``, ``memory (B, S, D)`` (levels flattened), ``memory_mask (B, S)``
        bool (True = valid; invalid values are zeroed before sampling) -> ``(B, Q, D)``."""
        b, s, _ = memory.shape
        value = self.value_proj(memory)
        if memory_mask is not None:
            value = value.masked_fill(~memory_mask[..., None], 0.0)
        value = value.view(b, s, self.num_heads, self.dim // self.num_heads)
        locations, weights = self.sampling_locations(query, reference_points, shapes)
        out = multi_scale_deformable_attention(value, shapes, locations, weights)
        return self.output_proj(out)


class DeformableLayer(nn.Module):
    """Deformable cross-attention to the experts, then an FFN; pre- or post-norm.

    ``norm="post"`` (Deformable DETR): ``q = LN(q + attn(q + pos)); q = LN(q + FFN(q))``.
    ``norm="pre"``: ``q = q + attn(LN(q) + pos); q = q + FFN(LN(q))`` with the attention's
    output projection and the FFN's last layer at zero, so the layer starts as the identity.
    """

    def __init__(self, dim: int, cfg: DeformableConfig, num_levels: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = MSDeformAttn(dim, cfg.num_heads, num_levels, cfg.num_points, cfg.offset_init)
        self.norm1 = nn.LayerNorm(dim)
        hidden = max(1, round(dim * cfg.ffn_ratio))
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        if self.pre_norm:  # identity at init: the residual stream carries the queries through
            for layer in (self.attn.output_proj, self.ffn[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        pos: torch.Tensor | None,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        memory_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``query (B, Q, D)``, ``pos (1, Q, D)`` or None -> ``(B, Q, D)``."""
        if self.pre_norm:
            normed = self.norm1(query)
            offset_query = normed if pos is None else normed + pos
            attn = self.attn(offset_query, reference_points, memory, shapes, memory_mask)
            query = query + self.dropout(attn)
            return query + self.dropout(self.ffn(self.norm2(query)))
        offset_query = query if pos is None else query + pos
        attn = self.attn(offset_query, reference_points, memory, shapes, memory_mask)
        query = self.norm1(query + self.dropout(attn))
        return self.norm2(query + self.dropout(self.ffn(query)))


def _check_config(cfg: DeformableConfig, specs: Sequence[ExpertSpec]) -> None:
    problems = []
    if cfg.queries not in QUERY_MODES:
        problems.append(f"queries={cfg.queries!r} (expected one of {QUERY_MODES})")
    if not -len(specs) <= cfg.base_expert < len(specs):
        problems.append(
            f"base_expert={cfg.base_expert} (expected an index into the {len(specs)} experts "
            f"{[s.name for s in specs]})"
        )
    if cfg.offset_init not in OFFSET_INITS:
        problems.append(f"offset_init={cfg.offset_init!r} (expected one of {OFFSET_INITS})")
    if cfg.norm not in NORMS:
        problems.append(f"norm={cfg.norm!r} (expected one of {NORMS})")
    if cfg.align not in ALIGN_METHODS:
        problems.append(f"align={cfg.align!r} (expected one of {ALIGN_METHODS})")
    elif cfg.queries == "learned" and cfg.align != "auto":
        problems.append(
            f"align={cfg.align!r} with queries='learned' (align only brings the base expert's "
            "map to the query grid for queries='base'; the levels keep their own resolution)"
        )
    for field in ("num_layers", "num_heads", "num_points"):
        if getattr(cfg, field) < 1:
            problems.append(f"{field}={getattr(cfg, field)} (expected >= 1)")
    if len(specs) * cfg.num_points == 1:
        problems.append(
            "num_points=1 with a single expert (one sampling point per head: its attention "
            "weight is always 1 and cannot be learned; expected num_points >= 2)"
        )
    if cfg.ffn_ratio <= 0 or not 0 <= cfg.dropout < 1:
        problems.append(f"ffn_ratio={cfg.ffn_ratio}, dropout={cfg.dropout} (expected > 0, [0, 1))")
    if cfg.grid is not None and (len(cfg.grid) != 2 or min(cfg.grid) < 1):
        problems.append(f"grid={cfg.grid} (expected two positive ints)")
    if cfg.dim is not None and cfg.dim < 1:
        problems.append(f"dim={cfg.dim} (expected a positive int)")
    if problems:
        raise FusionConfigError("fusion 'deformable': invalid options " + "; ".join(problems))


@register_fusion("deformable")
class DeformableFusion(Fusion):
    """Multi-scale deformable attention over the experts' maps (see the module docstring)."""

    config_class = DeformableConfig
    config: DeformableConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: DeformableConfig | None = None) -> None:
        super().__init__(specs, config)
        cfg = self.config
        _check_config(cfg, self.specs)
        self.base_expert = cfg.base_expert % len(self.specs)
        base = self.specs[self.base_expert]
        self.grid: tuple[int, int] = tuple(cfg.grid) if cfg.grid is not None else tuple(base.grid)
        dim = cfg.dim if cfg.dim is not None else base.channels
        if dim % cfg.num_heads:
            raise FusionConfigError(
                f"fusion 'deformable': dim {dim} must be divisible by num_heads {cfg.num_heads}"
                + ("" if cfg.dim is not None else f" (dim defaults to {base.name!r}'s channels)")
                + "; set dim= or num_heads="
            )
        n = self.grid[0] * self.grid[1]
        self.num_tokens, self.out_dim, self.out_grid = n, dim, self.grid
        if cfg.queries == "base":
            try:
                in_ch = aligned_channels(base.channels, base.grid, self.grid, cfg.align)
            except ValueError as err:
                msg = f"fusion 'deformable': base expert {base.name!r}: {err}"
                raise FusionConfigError(msg) from err
            self.query_proj: nn.Module | None = nn.Linear(in_ch, dim)
            # Added to the initial queries and, as in Deformable DETR, to every layer's
            # offset/weight input.
            self.query_pos: nn.Parameter | None = nn.Parameter(torch.randn(1, n, dim) * 0.02)
            self.query_embed: nn.Parameter | None = None
        else:
            self.query_proj, self.query_pos = None, None
            self.query_embed = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.input_proj = nn.ModuleList(nn.Linear(s.channels, dim) for s in self.specs)
        self.level_embed = nn.Parameter(torch.randn(len(self.specs), dim) * 0.02)
        self.layers = nn.ModuleList(
            DeformableLayer(dim, cfg, len(self.specs)) for _ in range(cfg.num_layers)
        )
        gh, gw = self.grid
        ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
        xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
        ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(n, 2)  # (N, (x, y))
        self.register_buffer("reference_grid", ref, persistent=False)

    def reference_points(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``(B, N, L, 2)``: each query's cell centre, scaled by each level's valid ratio."""
        b = maps[0].features.shape[0]
        ref = self.reference_grid.to(maps[0].features.dtype)
        ratios = []
        for m in maps:
            if m.mask is None or not self.config.valid_ratios:
                ratios.append(torch.ones(b, 2, dtype=ref.dtype, device=ref.device))
                continue
            h, w = m.grid
            rows = m.mask.any(2).sum(1).clamp_min(1).to(ref.dtype) / h  # (B,)
            cols = m.mask.any(1).sum(1).clamp_min(1).to(ref.dtype) / w
            ratios.append(torch.stack([cols, rows], -1))
        return ref[None, :, None, :] * torch.stack(ratios, 1)[:, None]  # (B, N, L, 2)

    def queries(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """Initial queries ``(B, N, D)``."""
        b = maps[0].features.shape[0]
        if self.query_proj is None:
            return self.query_embed.unsqueeze(0).expand(b, -1, -1)
        base = align_to_grid(maps[self.base_expert], self.grid, self.config.align)
        tokens = base.tokens()  # (B, N, C')
        if base.mask is not None:  # padding cells of a ragged base expert start from pos only
            tokens = tokens * base.mask.flatten(1)[..., None].to(tokens.dtype)
        return self.query_proj(tokens) + self.query_pos

    def memory(self, maps: Sequence[FeatureMap]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Levels projected and flattened: ``(B, S, D)`` and a ``(B, S)`` mask (or None)."""
        tokens = [
            proj(m.tokens()) + emb for proj, m, emb in zip(self.input_proj, maps, self.level_embed)
        ]
        mask = None
        if any(m.mask is not None for m in maps):
            mask = torch.cat([m.valid().flatten(1) for m in maps], 1)
        return torch.cat(tokens, 1), mask

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``maps[i]`` ``(B, C_i, H_i, W_i)`` -> ``(B, Gh*Gw, D)``."""
        self.check_maps(maps)
        shapes = [m.grid for m in maps]
        memory, mask = self.memory(maps)
        ref = self.reference_points(maps)
        q = self.queries(maps)
        for layer in self.layers:
            q = layer(q, self.query_pos, ref, memory, shapes, mask)
        return q


__all__ = ["DeformableConfig", "DeformableFusion", "DeformableLayer", "MSDeformAttn"]
