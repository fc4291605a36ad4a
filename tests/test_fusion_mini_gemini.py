"""Mini-Gemini patch-info mining against a brute-force loop over tokens and windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic import synthetic_spec

import fusion
from experts.spec import ExpertSpec, FeatureMap
from fusion import FusionConfigError


def make_spec(name: str, channels: int, grid: tuple[int, int]) -> ExpertSpec:
    return synthetic_spec(name, channels, grid, architecture="convnet")


def brute_force(fuse, low: torch.Tensor, high: torch.Tensor, key_valid: torch.Tensor | None):
    """Loop over batch, query cells and heads; softmax over the valid cells of each window.

    low: (B, C_L, h, w); high: (B, C_H, h*wh, w*ww); key_valid: (B, h*wh, w*ww) or None.
    """
    b, c, h, w = low.shape
    wh, ww = high.shape[2] // h, high.shape[3] // w
    heads = fuse.heads
    d = c // heads
    out = torch.zeros(b, h * w, c)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                query = fuse.q_proj(low[bi, :, i, j])  # (C_L,)
                cells = high[bi, :, i * wh : (i + 1) * wh, j * ww : (j + 1) * ww]
                cells = cells.reshape(high.shape[1], -1).T  # (wh*ww, C_H)
                keys, values = fuse.k_proj(cells), fuse.v_proj(cells)
                ok = torch.ones(wh * ww, dtype=torch.bool)
                if key_valid is not None:
                    ok = key_valid[bi, i * wh : (i + 1) * wh, j * ww : (j + 1) * ww].reshape(-1)
                mined = torch.zeros(c)
                for hd in range(heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    if not ok.any():
                        continue
                    scores = keys[ok, sl] @ query[sl] / d**0.5
                    mined[sl] = scores.softmax(0) @ values[ok, sl]
                out[bi, i * w + j] = low[bi, :, i, j] + mined
    return out


def test_matches_brute_force_with_heads_and_ragged_keys():
    specs = [make_spec("low", 8, (3, 2)), make_spec("high", 6, (9, 8))]
    mask = torch.rand(2, 9, 8) > 0.4
    mask[0, :3, :4] = False  # one window entirely padding: that query mines nothing
    maps = [
        FeatureMap(torch.randn(2, 8, 3, 2), 12, "low"),
        FeatureMap(torch.randn(2, 6, 9, 8), 4, "high", mask),
    ]
    fuse = fusion.create_fusion("mini_gemini", specs, heads=2)
    assert fuse.window == (3, 4) and fuse.query_index == 0 and fuse.highres_indices == [1]
    with torch.no_grad():
        for p in fuse.parameters():  # non-trivial LayerNorm affine parameters too
            p.add_(0.1 * torch.randn_like(p))
    out = fuse(maps)
    high = maps[1].features * mask[:, None]
    expected = brute_force(fuse, maps[0].features, high, mask)
    assert out.shape == (2, 6, 8) and fuse.num_tokens == 6 and fuse.out_grid == (3, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 0], maps[0].features[0, :, 0, 0])


def test_several_highres_maps_upsampled_to_finest_and_extra_low_expert():
    specs = [
        make_spec("mid", 4, (4, 4)),
        make_spec("query", 6, (2, 2)),
        make_spec("fine", 5, (8, 8)),
        make_spec("side", 3, (2, 2)),
    ]
    maps = [FeatureMap(torch.randn(2, s.channels, *s.grid), 4, s.name) for s in specs]
    fuse = fusion.create_fusion("mini_gemini", specs, dim=7)
    assert fuse.query_index == 1 and fuse.highres_indices == [0, 2]
    assert fuse.low_indices == [1, 3] and fuse.window == (4, 4) and fuse.out_dim == 7
    out = fuse(maps)
    low = torch.cat([maps[1].features, maps[3].features], 1)  # (B, 9, 2, 2)
    mid_up = F.interpolate(maps[0].features, size=(8, 8), mode="bilinear", align_corners=False)
    high = torch.cat([mid_up, maps[2].features], 1)  # (B, 9, 8, 8)
    expected = brute_force(fuse, low, high, None) @ fuse.out_proj.weight.T + fuse.out_proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_resolutions_and_every_parameter():
    specs = [make_spec("low", 4, (2, 2)), make_spec("high", 4, (4, 6))]
    maps = [FeatureMap(torch.randn(2, 4, *s.grid, requires_grad=True), 4, s.name) for s in specs]
    fuse = fusion.create_fusion("mini_gemini", specs)
    fuse(maps).square().sum().backward()
    assert all(m.features.grad.abs().sum() > 0 for m in maps)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fuse.parameters())


@pytest.mark.parametrize(
    ("grids", "options", "match"),
    [
        ([(4, 4), (4, 4)], {}, "needs at least one expert whose map is larger than the query grid"),
        ([(4, 4), (8, 2)], {}, "larger than the query grid"),
        ([(2, 2), (8, 8)], {"highres_indices": (0,)}, "must name experts other than the query"),
        ([(2, 2), (8, 8)], {"query_index": 5}, "query_index=5 is not an expert index"),
        ([(2, 2), (8, 8)], {"heads": 3}, "heads=3 must be a positive divisor"),
        ([(2, 2), (8, 8)], {"align": "unshuffle"}, "unknown alignment method 'unshuffle'"),
        ([(2, 2), (8, 8)], {"window": 4}, "has no options \\['window'\\]"),
    ],
)
def test_build_time_errors(grids, options, match):
    specs = [make_spec(f"e{i}", 4, g) for i, g in enumerate(grids)]
    with pytest.raises(FusionConfigError, match=match):
        fusion.create_fusion("mini_gemini", specs, **options)


def test_convnext_stages_as_highres_source():
    """MGM's setup: CLIP tokens query ConvNeXt stages upsampled to the finest and concatenated."""
    import numpy as np
    from PIL import Image

    import experts

    clip, conv = experts.create_expert("clip-tiny"), experts.create_expert("convnext-tiny")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))] * 2
    inputs = [clip.preprocess(images), conv.preprocess(images)]
    specs = [clip.spec, conv.spec]
    fuse = fusion.create_fusion(
        "mini_gemini", specs, query_index=0, highres_indices=(1,), highres_layers=(0, 1, 2)
    )
    assert fuse.staged_experts() == {1} and fuse.num_tokens == clip.spec.num_tokens
    with torch.no_grad():
        out = fuse.run([clip, conv], inputs, precomputed={0: clip(inputs[0])})
        stages = conv(inputs[1], layers=[0, 1, 2])
        finest = stages[0].grid
        high = torch.cat(
            [
                F.interpolate(s.features, size=finest, mode="bilinear", align_corners=False)
                for s in stages
            ],
            1,
        )
        expected = brute_force(fuse, clip(inputs[0]).features, high, None)
    assert finest == (32, 32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="call run"):
        fuse([clip(inputs[0]), conv(inputs[1])])
    late = fusion.create_fusion(
        "mini_gemini", specs, query_index=0, highres_indices=(1,), highres_layers=(3,)
    )
    with pytest.raises(ValueError, match="not larger than the query grid"):
        late.run([clip, conv], inputs)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"highres_layers": (0,)}, "name that expert with highres_indices"),
        ({"highres_layers": (7,), "highres_indices": (1,)}, "must be readable layers"),
        ({"highres_layers": (0,), "highres_indices": (1,), "query_index": 1}, "must not be the"),
    ],
)
def test_highres_layers_errors(options, match):
    specs = [make_spec("low", 4, (2, 2)), make_spec("high", 4, (8, 8))]
    specs[1] = specs[1].replace(layers=(0, 1), layer_channels=(2, 4))
    with pytest.raises(FusionConfigError, match=match):
        fusion.create_fusion("mini_gemini", specs, **options)
