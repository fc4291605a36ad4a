"""Graph fusion: edges against a brute-force adjacency and torch-geometric's batching,
padding isolation, readouts, gradients, counts and build errors."""

from __future__ import annotations

import pytest
import torch
from synthetic import synthetic_spec
from torch_geometric.data import Batch, Data

import fusion
from experts.spec import ExpertSpec, FeatureMap
from fusion.strategies.graph import EDGE_TYPES, batch_edges, build_edges


def make_spec(name: str, channels: int, grid: tuple[int, int]) -> ExpertSpec:
    return synthetic_spec(name, channels, grid)


SPECS = [make_spec("vit", 8, (3, 3)), make_spec("conv", 6, (6, 6)), make_spec("doc", 5, (4, 5))]


def make_maps(b: int = 2) -> list[FeatureMap]:
    mask = torch.zeros(b, 4, 5, dtype=torch.bool)
    mask[0, :2, :] = True
    mask[1:, :, :2] = True
    masks = [None, None, mask]
    return [
        FeatureMap(torch.randn(b, s.channels, *s.grid), 4, s.name, m) for s, m in zip(SPECS, masks)
    ]


def brute_force_edges(grid: tuple[int, int], experts: int) -> set[tuple[int, int, str]]:
    h, w = grid
    nodes = [(e, y, x) for e in range(experts) for y in range(h) for x in range(w)]
    edges = set()
    for s, (e1, y1, x1) in enumerate(nodes):
        for t, (e2, y2, x2) in enumerate(nodes):
            if s == t:
                edges.add((s, t, "self"))
            elif e1 != e2 and (y1, x1) == (y2, x2):
                edges.add((s, t, "cross_expert"))
            elif e1 == e2 and abs(y1 - y2) + abs(x1 - x2) == 1:
                edges.add((s, t, "spatial"))
    return edges


@pytest.mark.parametrize("grid, experts", [((3, 4), 3), ((1, 5), 2), ((2, 2), 1)])
def test_edges_match_brute_force_adjacency(grid: tuple[int, int], experts: int) -> None:
    edge_index, edge_type = build_edges(grid, experts)
    ours = [(int(s), int(t), EDGE_TYPES[k]) for (s, t), k in zip(edge_index.T, edge_type)]
    assert len(ours) == len(set(ours)), "duplicate edges"
    assert set(ours) == brute_force_edges(grid, experts)


def test_batched_edges_match_torch_geometric_batch() -> None:
    edge_index, edge_type = build_edges((2, 3), 2)
    ours, types = batch_edges(edge_index, edge_type, 3, 12)
    ref = Batch.from_data_list([Data(edge_index=edge_index, num_nodes=12)] * 3).edge_index
    assert torch.equal(ours, ref)
    assert torch.equal(types, edge_type.repeat(3))


@pytest.mark.parametrize("readout, conv", [("mean", "gatv2"), ("attention", "gat")])
def test_shapes_counts_and_gradients(readout: str, conv: str) -> None:
    fuse = fusion.create_fusion(
        "graph", SPECS, grid=(3, 4), dim=8, num_heads=2, readout=readout, conv=conv
    )
    assert (fuse.num_tokens, fuse.out_dim, fuse.out_grid) == (12, 8, (3, 4))
    maps = make_maps()
    for m in maps:
        m.features.requires_grad_(True)
    out = fuse(maps)
    assert out.shape == (2, 12, 8) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in fuse.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"
    assert all(m.features.grad.abs().sum() > 0 for m in maps)
    d, n, e = 8, 12, 3
    # GATv2: lin_l, lin_r (with bias), attention vector, lin_edge (no bias), output bias.
    # GAT: one shared lin (no bias), att_src, att_dst, lin_edge, att_edge, output bias.
    gat = 3 * d * d + 4 * d if conv == "gatv2" else 2 * d * d + 4 * d
    per_layer = gat + 2 * 2 * d + (d + 1) * 2 * d + (2 * d + 1) * d  # + 2 LNs + FFN
    expected = sum((s.channels + 1) * d for s in SPECS) + e * d + n * d + 3 * d
    expected += (d + 1) if readout == "attention" else 0
    assert fuse.num_parameters() == expected + 2 * per_layer


def test_nodes_are_projected_tokens_and_readout_of_one_expert() -> None:
    """With one expert and no padding, readout = that expert's node states."""
    fuse = fusion.create_fusion("graph", SPECS[:1], dim=8, num_heads=2).eval()
    maps = make_maps()[:1]
    x, valid = fuse.nodes(maps)
    assert valid is None and x.shape == (2, 1, 9, 8)
    expected = maps[0].tokens() @ fuse.input_proj[0].weight.T + fuse.input_proj[0].bias
    torch.testing.assert_close(x[:, 0], expected + fuse.expert_embed[0] + fuse.pos_embed)
    torch.testing.assert_close(fuse.readout(x, None), x[:, 0])


@pytest.mark.parametrize("readout", ["mean", "attention"])
def test_padding_never_leaks(readout: str) -> None:
    fuse = fusion.create_fusion("graph", SPECS, grid=(4, 5), dim=8, num_heads=2, readout=readout)
    fuse.eval()
    maps = make_maps()
    out = fuse(maps)
    doc = maps[2]
    noise = torch.randn_like(doc.features) * 1e3 * (~doc.mask[:, None])
    out2 = fuse([maps[0], maps[1], FeatureMap(doc.features + noise, 4, "doc", doc.mask)])
    torch.testing.assert_close(out, out2)


def test_cells_without_valid_expert_read_zeros() -> None:
    fuse = fusion.create_fusion("graph", SPECS[2:], dim=8, num_heads=2, readout="attention")
    out = fuse(make_maps()[2:])
    mask = make_maps()[2].mask.flatten(1)
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all() and (out[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"conv": "gcn"}, "conv='gcn'"),
        ({"readout": "max"}, "readout='max'"),
        ({"dim": 9, "num_heads": 2}, "dim=9"),
        ({"num_heads": 3}, "defaults to 'vit'"),
        ({"align": "unshuffle", "grid": (2, 2)}, "expert 'vit'"),
        ({"align": "nearest"}, "align='nearest'"),
        ({"grid": (0, 3)}, "grid="),
    ],
)
def test_build_errors(options: dict, match: str) -> None:
    with pytest.raises(fusion.FusionConfigError, match=match):
        fusion.create_fusion("graph", SPECS, **options)


def test_single_node_graph_is_rejected() -> None:
    with pytest.raises(fusion.FusionConfigError, match="single node"):
        fusion.create_fusion("graph", SPECS[:1], grid=(1, 1), dim=8, num_heads=2)
    assert fusion.create_fusion("graph", SPECS[:2], grid=(1, 1), dim=8, num_heads=2).num_tokens == 1


def test_unshuffle_alignment_widens_inputs() -> None:
    specs = [make_spec("vit", 8, (3, 3)), make_spec("sam", 4, (6, 6))]
    fuse = fusion.create_fusion("graph", specs, align="unshuffle", dim=8, num_heads=2)
    assert fuse.input_proj[1].in_features == 16
    maps = [FeatureMap(torch.randn(1, s.channels, *s.grid), 4, s.name) for s in specs]
    assert fuse(maps).shape == (1, 9, 8)


def test_mismatched_batch_raises() -> None:
    fuse = fusion.create_fusion("graph", SPECS, dim=8, num_heads=2)
    maps = make_maps()
    maps[0] = make_maps(1)[0]
    with pytest.raises(ValueError, match="same batch size"):
        fuse(maps)
