"""Graph fusion: a graph attention network over (expert, grid position) nodes.

Our own design (no paper proposes it for vision-expert fusion); the message passing is
GATv2 (Brody, Alon, Yahav, *How Attentive are Graph Attention Networks?*, ICLR 2022) or the
original GAT (Veličković et al., *Graph Attention Networks*, ICLR 2018), from
torch-geometric. Every expert's map is aligned to one grid and projected to a common width;
each (expert, cell) is a node. Nodes of different experts at the same cell exchange
information (the cross-expert edges play the role of channel concatenation, but with
content-dependent weights per cell), and 4-neighbours inside one expert's map give each node
its local context::

    expert i map (B, C_i, H_i, W_i) --align--> (B, C_i', Gh, Gw) --Linear_i--> (B, Gh*Gw, D)
        + expert_embed[i] + pos_embed                       nodes x: (B * E * Gh*Gw, D)
    edges (one sample, built once, offset per sample), typed and embedded as edge features:
        cross-expert  (i, p) <-> (j, p)   for i != j              E(E-1) Gh Gw
        spatial       (i, p) <-> (i, q)   q a 4-neighbour of p    2 E (2 Gh Gw - Gh - Gw)
        self loop     (i, p) -> (i, p)                            E Gh Gw
    num_layers x [ x = LN(x + GATv2Conv(x, edges)); x = LN(x + FFN(x)) ]
    readout per cell over the E expert nodes: mean, or attention pooling (softmax of a
    learned score)                                           -> (B, Gh*Gw, D), out_grid (Gh, Gw)

Node order is ``b * E*Gh*Gw + i * Gh*Gw + y * Gw + x``. Ragged maps (Pix2Struct): a node
whose aligned cell is padding loses every edge (in and out), is zeroed, and is left out of
the readout, so padding never leaks; a cell where no expert is valid reads out zeros.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.align import ALIGN_METHODS, align_to_grid, aligned_channels
from experts.spec import ExpertSpec, FeatureMap
from fusion.base import Fusion, FusionConfig, FusionConfigError
from fusion.registry import register_fusion

CONVS = ("gatv2", "gat")
READOUTS = ("mean", "attention")
EDGE_TYPES = ("cross_expert", "spatial", "self")


@dataclass
class GraphConfig(FusionConfig):
    """Options of :class:`GraphFusion`; ``grid=None``/``dim=None``: the first expert's grid
    and channels.

    Attributes:
        num_layers: graph attention layers (each followed by an FFN).
        num_heads: attention heads per layer (must divide ``dim``).
        conv: ``"gatv2"`` (GATv2Conv) or ``"gat"`` (GATConv).
        readout: ``"mean"`` or ``"attention"`` pooling over the experts at each cell.
        ffn_ratio: FFN hidden width as a multiple of ``dim``.
        dropout: dropout on attention coefficients and after each sub-layer.
        pos_embed: add a learnable position embedding per grid cell to every node.
    """

    num_layers: int = 2
    num_heads: int = 4
    conv: str = "gatv2"
    readout: str = "mean"
    ffn_ratio: float = 2.0
    dropout: float = 0.0
    pos_embed: bool = True


def build_edges(grid: tuple[int, int], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of one sample's graph.

    Args:
        grid: ``(H, W)``.
        num_experts: ``E``.

    Returns:
        ``edge_index (2, M)`` (row 0 source, row 1 target; node ``i*H*W + y*W + x``) and
        ``edge_type (M,)`` indexing :data:`EDGE_TYPES`.
    """
    h, w = grid
    n = h * w
    cells = torch.arange(n).view(h, w)
    # Cross-expert: every ordered pair (i, j), i != j, at every cell.
    i, j = torch.meshgrid(torch.arange(num_experts), torch.arange(num_experts), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]  # (E(E-1),)
    cross = torch.stack([(i[:, None] * n + torch.arange(n)), (j[:, None] * n + torch.arange(n))])
    # Spatial: horizontal and vertical neighbour pairs, both directions, inside each expert.
    pairs = torch.cat(
        [
            torch.stack([cells[:, :-1].reshape(-1), cells[:, 1:].reshape(-1)]),
            torch.stack([cells[:-1, :].reshape(-1), cells[1:, :].reshape(-1)]),
        ],
        1,
    )
    pairs = torch.cat([pairs, pairs.flip(0)], 1)  # (2, P)
    offsets = torch.arange(num_experts) * n
    spatial = (pairs[:, None, :] + offsets[None, :, None]).reshape(2, -1)
    loops = torch.arange(num_experts * n).expand(2, -1)
    edge_index = torch.cat([cross.reshape(2, -1), spatial, loops], 1)
    edge_type = torch.cat(
        [
            torch.full((cross[0].numel(),), 0),
            torch.full((spatial.shape[1],), 1),
            torch.full((loops.shape[1],), 2),
        ]
    )
    return edge_index, edge_type


def batch_edges(
    edge_index: torch.Tensor, edge_type: torch.Tensor, batch: int, nodes_per_sample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's edges repeated for ``batch`` samples with node offsets.

    Returns ``edge_index (2, B*M)`` and ``edge_type (B*M,)``.
    """
    offsets = torch.arange(batch, device=edge_index.device) * nodes_per_sample
    batched = (edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)
    return batched, edge_type.repeat(batch)


def _conv_class(name: str) -> type[nn.Module]:
    # Imported here: torch-geometric takes seconds to import, only graph fusion needs it. Its
    # import-time use of the deprecated torch.jit.script is library noise, not the user's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from torch_geometric.nn import GATConv, GATv2Conv

    return {"gatv2": GATv2Conv, "gat": GATConv}[name]


class GraphLayer(nn.Module):
    """``x = LN(x + GAT(x)); x = LN(x + FFN(x))`` on nodes ``(num_nodes, D)``."""

    def __init__(self, dim: int, cfg: GraphConfig) -> None:
        super().__init__()
        self.conv = _conv_class(cfg.conv)(
            dim,
            dim // cfg.num_heads,
            heads=cfg.num_heads,
            concat=True,
            dropout=cfg.dropout,
            add_self_loops=False,  # self loops are explicit (typed) edges
            edge_dim=dim,
        )
        self.norm1 = nn.LayerNorm(dim)
        hidden = max(1, round(dim * cfg.ffn_ratio))
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
    ) -> torch.Tensor:
        """``x (nodes, D)``, ``edge_index (2, M)``, ``edge_attr (M, D)`` -> ``(nodes, D)``."""
        x = self.norm1(x + self.dropout(self.conv(x, edge_index, edge_attr)))
        return self.norm2(x + self.dropout(self.ffn(x)))


def _check_config(cfg: GraphConfig, grid: tuple[int, ...], dim: int, first: ExpertSpec) -> None:
    problems = []
    if cfg.conv not in CONVS:
        problems.append(f"conv={cfg.conv!r} (expected one of {CONVS})")
    if cfg.readout not in READOUTS:
        problems.append(f"readout={cfg.readout!r} (expected one of {READOUTS})")
    if cfg.align not in ALIGN_METHODS:
        problems.append(f"align={cfg.align!r} (expected one of {ALIGN_METHODS})")
    if len(grid) != 2 or min(grid) < 1:
        problems.append(f"grid={grid} (expected two positive ints)")
    if cfg.num_layers < 1 or cfg.num_heads < 1:
        problems.append(f"num_layers={cfg.num_layers}, num_heads={cfg.num_heads} (expected >= 1)")
    elif dim < 1 or dim % cfg.num_heads:
        problems.append(
            f"dim={dim} (expected a positive multiple of num_heads={cfg.num_heads}"
            + ("" if cfg.dim is not None else f"; dim defaults to {first.name!r}'s channels")
            + ")"
        )
    if cfg.ffn_ratio <= 0 or not 0 <= cfg.dropout < 1:
        problems.append(f"ffn_ratio={cfg.ffn_ratio}, dropout={cfg.dropout} (expected > 0, [0, 1))")
    if problems:
        raise FusionConfigError("fusion 'graph': invalid options " + "; ".join(problems))


@register_fusion("graph")
class GraphFusion(Fusion):
    """Graph attention over (expert, cell) nodes (see the module docstring)."""

    config_class = GraphConfig
    config: GraphConfig

    def __init__(self, specs: Sequence[ExpertSpec], config: GraphConfig | None = None) -> None:
        super().__init__(specs, config)
        cfg = self.config
        first = self.specs[0]
        grid = tuple(int(g) for g in cfg.grid) if cfg.grid is not None else tuple(first.grid)
        dim = cfg.dim if cfg.dim is not None else first.channels
        _check_config(cfg, grid, dim, first)
        if len(self.specs) * grid[0] * grid[1] < 2:
            raise FusionConfigError(
                f"fusion 'graph': one expert on a {grid} grid is a single node with only its "
                "self loop, so graph attention has nothing to attend to; use a larger grid or "
                "more experts"
            )
        self.grid: tuple[int, int] = grid  # type: ignore[assignment]
        n, e = grid[0] * grid[1], len(self.specs)
        self.num_tokens, self.out_dim, self.out_grid = n, dim, self.grid
        in_channels = []
        for s in self.specs:
            try:
                in_channels.append(aligned_channels(s.channels, s.grid, self.grid, cfg.align))
            except ValueError as err:
                raise FusionConfigError(f"fusion 'graph': expert {s.name!r}: {err}") from err
        self.input_proj = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)
        self.expert_embed = nn.Parameter(torch.randn(e, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n, dim) * 0.02) if cfg.pos_embed else None
        self.edge_embed = nn.Embedding(len(EDGE_TYPES), dim)
        self.layers = nn.ModuleList(GraphLayer(dim, cfg) for _ in range(cfg.num_layers))
        self.readout_score = nn.Linear(dim, 1) if cfg.readout == "attention" else None
        edge_index, edge_type = build_edges(self.grid, e)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self.register_buffer("edge_type", edge_type, persistent=False)

    def nodes(self, maps: Sequence[FeatureMap]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Node features ``(B, E, Gh*Gw, D)`` and validity ``(B, E, Gh*Gw)`` (None: all valid)."""
        aligned = [align_to_grid(m, self.grid, self.config.align) for m in maps]
        x = torch.stack(
            [
                proj(a.tokens()) + emb
                for proj, a, emb in zip(self.input_proj, aligned, self.expert_embed)
            ],
            1,
        )
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if all(a.mask is None for a in aligned):
            return x, None
        valid = torch.stack([a.valid().flatten(1) for a in aligned], 1)
        return x * valid[..., None], valid

    def readout(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Pool ``(B, E, N, D)`` over the experts' valid nodes -> ``(B, N, D)``."""
        if valid is None:
            valid = torch.ones(x.shape[:3], dtype=torch.bool, device=x.device)
        if self.readout_score is None:
            w = valid.to(x.dtype)
            return (x * w[..., None]).sum(1) / w.sum(1).clamp_min(1.0)[..., None]
        score = self.readout_score(x)[..., 0].masked_fill(~valid, float("-inf"))
        weight = torch.nan_to_num(score.softmax(1), nan=0.0)  # all-invalid cells: zeros
        return (x * weight[..., None]).sum(1)

    def forward(self, maps: Sequence[FeatureMap]) -> torch.Tensor:
        """``maps[i]`` ``(B, C_i, H_i, W_i)`` -> ``(B, Gh*Gw, D)``."""
        self.check_maps(maps)
        x, valid = self.nodes(maps)  # (B, E, N, D)
        b, e, n, d = x.shape
        edge_index, edge_type = batch_edges(self.edge_index, self.edge_type, b, e * n)
        if valid is not None:  # drop every edge touching a padding node
            flat = valid.reshape(-1)
            keep = flat[edge_index[0]] & flat[edge_index[1]]
            edge_index, edge_type = edge_index[:, keep], edge_type[keep]
        edge_attr = self.edge_embed(edge_type)
        h = x.reshape(b * e * n, d)
        for layer in self.layers:
            h = layer(h, edge_index, edge_attr)
        return self.readout(h.view(b, e, n, d), valid)
