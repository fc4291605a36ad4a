"""Cambrian SVA: one layer against a brute-force per-query loop over windows, window
shapes, masks, gradients, counts and build errors."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic import synthetic_spec

import fusion
from experts.align import interpolate
from experts.spec import ExpertSpec, FeatureMap
from fusion.strategies.sva import SpatialVisionAggregator, SVAConfig, to_windows, window_shape


def make_spec(name: str, channels: int, grid: tuple[int, int]) -> ExpertSpec:
    return synthetic_spec(name, channels, grid, stride=8, architecture="convnet")


# Query grid (2, 2): a divisible 4x4 map (2x2 windows), a ragged 5x5 map (resized to 6x6,
# 3x3 windows) and a 1x3 map smaller than the grid (resized to 2x4, 1x2 windows).
SPECS = [make_spec("vit", 6, (4, 4)), make_spec("doc", 5, (5, 5)), make_spec("tiny", 3, (1, 3))]


def make_maps(b: int = 2) -> list[FeatureMap]:
    mask = torch.zeros(b, 5, 5, dtype=torch.bool)
    mask[0, :2, :5] = True  # sample 0: two rows of patches
    mask[1:, :5, :1] = True  # sample 1: one column
    masks = [None, mask, None]
    return [
        FeatureMap(torch.randn(b, s.channels, *s.grid), 8, s.name, m) for s, m in zip(SPECS, masks)
    ]


def brute_force_layer(layer, query, maps, grid, windows) -> torch.Tensor:
    """One SVA layer with explicit loops over samples, queries, experts and window cells."""
    b, n, d = query.shape
    heads, dh = layer.num_heads, d // layer.num_heads
    resized = [interpolate(m, (grid[0] * k, grid[1] * w)) for m, (k, w) in zip(maps, windows)]
    out = torch.empty_like(query)
    for bi in range(b):
        means = []
        for m in maps:
            valid = m.valid()[bi]
            cells = [m.features[bi, :, y, x] for y, x in zip(*torch.nonzero(valid, as_tuple=True))]
            means.append(torch.stack(cells).mean(0) if cells else torch.zeros(m.channels))
        context = layer.context_proj(torch.cat(means))
        for gy in range(grid[0]):
            for gx in range(grid[1]):
                q = query[bi, gy * grid[1] + gx] + context
                keys, values, valid = [], [], []
                for i, (m, (kh, kw)) in enumerate(zip(resized, windows)):
                    for dy in range(kh):
                        for dx in range(kw):
                            y, x = gy * kh + dy, gx * kw + dx
                            tok = m.features[bi, :, y, x] + layer.window_pos[i][dy * kw + dx]
                            keys.append(layer.k_proj[i](tok))
                            values.append(layer.v_proj[i](tok))
                            valid.append(bool(m.valid()[bi, y, x]))
                k, v, ok = torch.stack(keys), torch.stack(values), torch.tensor(valid)
                qp = layer.q_proj(q)
                heads_out = []
                for h in range(heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    scores = (k[:, sl] @ qp[sl]) / math.sqrt(dh)
                    if not ok.any():
                        heads_out.append(torch.zeros(dh))
                        continue
                    p = scores.masked_fill(~ok, float("-inf")).softmax(0)
                    heads_out.append(p @ v[:, sl])
                q = q + layer.o_proj(torch.cat(heads_out))
                out[bi, gy * grid[1] + gx] = q + layer.mlp(q)
    return out


def test_window_shapes_and_unfold() -> None:
    assert window_shape((24, 24), (24, 24)) == (1, 1)
    assert window_shape((64, 64), (32, 32)) == (2, 2)
    assert window_shape((5, 5), (2, 2)) == (3, 3)
    assert window_shape((1, 3), (2, 2)) == (1, 2)
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    tokens, mask = to_windows(FeatureMap(x, 1, "x"), (2, 3), (2, 2))
    assert tokens.shape == (1, 6, 4, 2) and mask.all()
    # Query (1, 2) owns rows 2-3, cols 4-5, row-major inside the window.
    expected = torch.stack([x[0, :, 2, 4], x[0, :, 2, 5], x[0, :, 3, 4], x[0, :, 3, 5]])
    torch.testing.assert_close(tokens[0, 1 * 3 + 2], expected)


def test_one_layer_matches_brute_force_loop() -> None:
    fuse = SpatialVisionAggregator(SPECS, SVAConfig(grid=(2, 2), dim=8, num_heads=2, num_layers=1))
    assert fuse.windows == [(2, 2), (3, 3), (1, 2)]
    maps = make_maps()
    maps[1].mask[1, :, :] = False  # sample 1: the ragged expert is pure padding
    out = fuse(maps)
    q0 = fuse.queries.unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        ref = brute_force_layer(fuse.layers[0], q0, maps, (2, 2), fuse.windows)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_stacked_layers_shapes_counts_and_gradients() -> None:
    fuse = fusion.create_fusion("sva", SPECS, grid=(2, 3), dim=8, num_heads=2, num_layers=2)
    assert (fuse.num_tokens, fuse.out_dim, fuse.out_grid) == (6, 8, (2, 3))
    maps = make_maps()
    for m in maps:
        m.features.requires_grad_(True)
    out = fuse(maps)
    assert out.shape == (2, 6, 8) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in fuse.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"
    assert all(m.features.grad.abs().sum() > 0 for m in maps)
    d, channels = 8, [s.channels for s in SPECS]
    windows = [window_shape(s.grid, (2, 3)) for s in SPECS]
    per_layer = 2 * sum(channels) + (sum(channels) + 1) * d  # context LN + Linear
    per_layer += 2 * d + (d + 1) * d  # query LN + Linear
    per_layer += sum(2 * (2 * c + (c + 1) * d) for c in channels)  # K and V per expert
    per_layer += sum(k * w * c for (k, w), c in zip(windows, channels))  # window positions
    per_layer += (d + 1) * d + 2 * d + (d + 1) * 4 * d + (4 * d + 1) * d  # out proj, MLP
    assert fuse.num_parameters() == 6 * d + 2 * per_layer


def test_defaults_use_first_expert() -> None:
    fuse = fusion.create_fusion("sva", SPECS, num_heads=2, num_layers=1)
    assert fuse.out_grid == (4, 4) and fuse.out_dim == 6
    assert fuse(make_maps(1)).shape == (1, 16, 6)


def test_padded_cells_do_not_leak() -> None:
    fuse = fusion.create_fusion("sva", SPECS, grid=(2, 2), dim=8, num_heads=2).eval()
    maps = make_maps()
    out = fuse(maps)
    doc = maps[1]
    noise = torch.randn_like(doc.features) * 1e3 * (~doc.mask[:, None])
    out2 = fuse([maps[0], FeatureMap(doc.features + noise, 8, "doc", doc.mask), maps[2]])
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dim": 10, "num_heads": 4}, "dim=10"),
        ({"num_heads": 4}, "defaults to 'vit'"),
        ({"grid": (0, 2), "dim": 8, "num_heads": 2}, "grid="),
        ({"num_layers": 0, "dim": 8}, "num_layers=0"),
        ({"window": 3}, "has no options"),
        ({"align": "unshuffle", "dim": 8, "num_heads": 2}, "align='unshuffle'"),
    ],
)
def test_build_errors(options: dict, match: str) -> None:
    with pytest.raises(fusion.FusionConfigError, match=match):
        fusion.create_fusion("sva", SPECS, **options)


def test_wrong_channels_raise() -> None:
    fuse = fusion.create_fusion("sva", SPECS, grid=(2, 2), dim=8, num_heads=2)
    maps = make_maps()
    maps[0] = FeatureMap(torch.randn(2, 7, 4, 4), 8, "vit")
    with pytest.raises(ValueError, match="7 channels"):
        fuse(maps)


def test_mismatched_batch_raises() -> None:
    fuse = fusion.create_fusion("sva", SPECS, grid=(2, 2), dim=8, num_heads=2)
    maps = make_maps()
    maps[2] = make_maps(3)[2]
    with pytest.raises(ValueError, match="same batch size"):
        fuse(maps)


def test_without_window_position_embedding() -> None:
    with_pos = fusion.create_fusion("sva", SPECS, grid=(2, 2), dim=8, num_heads=2, num_layers=1)
    without = fusion.create_fusion(
        "sva", SPECS, grid=(2, 2), dim=8, num_heads=2, num_layers=1, window_pos_embed=False
    )
    assert without.layers[0].window_pos is None
    windows = sum(k * w * s.channels for (k, w), s in zip(with_pos.windows, SPECS))
    assert with_pos.num_parameters() - without.num_parameters() == windows
    assert without(make_maps()).shape == (2, 4, 8)


def test_single_key_windows_pass_values_without_query_key_projections() -> None:
    spec = make_spec("vit", 6, (3, 3))
    fuse = fusion.create_fusion("sva", [spec], dim=8, num_heads=2, num_layers=1)
    layer = fuse.layers[0]
    assert layer.q_proj is None and layer.k_proj is None and fuse.windows == [(1, 1)]
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1, 2] = False
    fmap = FeatureMap(torch.randn(2, 6, 3, 3), 8, "vit", mask)
    out = fuse([fmap])
    with torch.no_grad():
        q = (
            fuse.queries
            + layer.context_proj(
                torch.stack([fmap.features[0].mean((1, 2)), fmap.features[1, :, :2].mean((1, 2))])
            )[:, None]
        )
        v = layer.v_proj[0](fmap.tokens() + layer.window_pos[0]) * mask.flatten(1)[..., None]
        q = q + layer.o_proj(v)
        expected = q + layer.mlp(q)
    torch.testing.assert_close(out, expected)
