"""Deformable-attention fusion: the sampling core against a brute-force loop and transformers'
MultiScaleDeformableAttention, reference-point sampling, masks, gradients, build errors."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic import synthetic_spec
from transformers.models.deformable_detr.modeling_deformable_detr import (
    MultiScaleDeformableAttention,
)

import fusion
from experts.spec import ExpertSpec, FeatureMap
from fusion.ops import multi_scale_deformable_attention
from fusion.strategies.deformable import DeformableConfig, DeformableFusion, MSDeformAttn


def make_spec(name: str, channels: int, grid: tuple[int, int], ragged: bool = False) -> ExpertSpec:
    return synthetic_spec(name, channels, grid, ragged=ragged)


SPECS = [make_spec("vit", 16, (4, 4)), make_spec("conv", 12, (8, 6)), make_spec("doc", 10, (5, 5))]


def make_maps(b: int = 2, specs=SPECS) -> list[FeatureMap]:
    maps = []
    for s in specs:
        mask = None
        if s.name == "doc":  # ragged: the image fills a top-left rectangle, different per sample
            mask = torch.zeros(b, *s.grid, dtype=torch.bool)
            mask[0, :3, :4] = True
            mask[1:, :5, :2] = True
        maps.append(FeatureMap(torch.randn(b, s.channels, *s.grid), 4, s.name, mask))
    return maps


def bilinear_reference(value_l: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``value_l (H, W, d)`` at normalised ``(x, y)``, zeros outside (align_corners=False)."""
    h, w, d = value_l.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=torch.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= yy < h and 0 <= xx < w:
                out += weight * value_l[yy, xx].double()
    return out


def brute_force_msda(value, shapes, locations, weights) -> torch.Tensor:
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, q, heads, d, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                for li, (h, w) in enumerate(shapes):
                    v_l = value[bi, starts[li] : starts[li + 1], hi].reshape(h, w, d)
                    for pi in range(points):
                        x, y = locations[bi, qi, hi, li, pi].tolist()
                        out[bi, qi, hi] += weights[bi, qi, hi, li, pi].double() * (
                            bilinear_reference(v_l, x, y)
                        )
    return out.reshape(b, q, heads * d)


def random_msda_inputs(shapes, b=2, q=5, heads=2, d=3, points=3):
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, heads, d)
    # Locations in [-0.3, 1.3]: some fall outside the map and must read zeros.
    locations = torch.rand(b, q, heads, len(shapes), points, 2) * 1.6 - 0.3
    weights = torch.randn(b, q, heads, len(shapes) * points).softmax(-1)
    return value, locations, weights.view(b, q, heads, len(shapes), points)


def test_core_matches_brute_force_bilinear_loop() -> None:
    shapes = [(4, 5), (2, 3), (7, 7)]
    value, loc, w = random_msda_inputs(shapes)
    ours = multi_scale_deformable_attention(value, torch.tensor(shapes), loc, w)
    ref = brute_force_msda(value, shapes, loc, w)
    assert ours.shape == (2, 5, 6)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    assert (loc < 0).any() and (loc > 1).any()


def test_core_matches_transformers_multiscale_deformable_attention() -> None:
    shapes = [(6, 4), (3, 3), (1, 2)]
    value, loc, w = random_msda_inputs(shapes, b=3, q=7, heads=4, d=8, points=4)
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    theirs = MultiScaleDeformableAttention()(value, spatial, shapes, start, loc, w, 64)
    ours = multi_scale_deformable_attention(value, shapes, loc, w)
    torch.testing.assert_close(ours, theirs)


def test_core_rejects_bad_shapes() -> None:
    value, loc, w = random_msda_inputs([(2, 2)])
    with pytest.raises(ValueError, match="spatial shapes"):
        multi_scale_deformable_attention(value, [(3, 3)], loc, w)
    with pytest.raises(ValueError, match="sampling_locations"):
        multi_scale_deformable_attention(value, [(2, 2)], loc[..., 0], w)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attention(value, [(2, 2)], loc, w[..., :1])


def test_zero_offsets_sample_at_reference_points() -> None:
    attn = MSDeformAttn(dim=8, num_heads=2, num_levels=2, num_points=3, offset_init="zero")
    with torch.no_grad():  # non-uniform weights: the output must not depend on them
        attn.attention_weights.weight.normal_()
    shapes = [(3, 4), (5, 2)]
    memory = torch.randn(1, 3 * 4 + 5 * 2, 8)
    query = torch.randn(1, 4, 8)
    ref = torch.rand(1, 4, 2, 2)
    loc, _ = attn.sampling_locations(query, ref, shapes)
    torch.testing.assert_close(loc, ref[:, :, None, :, None, :].expand_as(loc))
    out = attn(query, ref, memory, shapes)
    value = attn.value_proj(memory).view(1, -1, 2, 4)
    expected = torch.zeros(1, 4, 8, dtype=torch.float64)
    starts = [0, 12, 22]
    weights = attn.sampling_locations(query, ref, shapes)[1]
    for qi in range(4):
        for hi in range(2):
            for li, (h, w) in enumerate(shapes):
                v_l = value[0, starts[li] : starts[li + 1], hi].reshape(h, w, 4).detach()
                x, y = ref[0, qi, li].tolist()
                lw = weights[0, qi, hi, li].sum().double()
                expected[0, qi, hi * 4 : hi * 4 + 4] += lw * bilinear_reference(v_l, x, y)
    expected = attn.output_proj(expected.float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_grid_init_matches_deformable_detr() -> None:
    attn = MSDeformAttn(dim=16, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head h points along angle 2*pi*h/4 (normalised to the unit square), point p at (p+1).
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        torch.testing.assert_close(bias[:, 1, p], directions * (p + 1), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0


@pytest.mark.parametrize("queries", ["base", "learned"])
def test_fusion_shapes_counts_and_gradients(queries: str) -> None:
    fuse = fusion.create_fusion(
        "deformable", SPECS, grid=(3, 5), dim=16, queries=queries, num_heads=2, num_points=2
    )
    assert (fuse.num_tokens, fuse.out_dim, fuse.out_grid) == (15, 16, (3, 5))
    maps = make_maps()
    for m in maps:
        m.features.requires_grad_(True)
    out = fuse(maps)
    assert out.shape == (2, 15, 16) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in fuse.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"
    assert all(m.features.grad.abs().sum() > 0 for m in maps)
    # Parameter count from the architecture: input projections, level and query embeddings,
    # per layer: offsets (M*L*P*2), weights (M*L*P), value/output projections, 2 LNs, FFN.
    d, n, lv, m, p = 16, 15, 3, 2, 2
    per_layer = (d + 1) * m * lv * p * 2 + (d + 1) * m * lv * p + 2 * (d + 1) * d
    per_layer += 2 * 2 * d + (d + 1) * 4 * d + (4 * d + 1) * d
    query = (16 + 1) * d + n * d if queries == "base" else n * d  # projection + pos, or learned
    expected = sum((s.channels + 1) * d for s in SPECS) + lv * d + query
    assert fuse.num_parameters() == expected + 2 * per_layer


def test_defaults_follow_base_expert() -> None:
    fuse = fusion.create_fusion("deformable", SPECS, base_expert=1, num_heads=4)
    assert fuse.out_grid == (8, 6) and fuse.out_dim == 12 and fuse.num_tokens == 48
    assert fuse(make_maps(1)).shape == (1, 48, 12)
    negative = fusion.create_fusion("deformable", SPECS, base_expert=-2, num_heads=4)
    assert negative.base_expert == 1 and negative.out_grid == (8, 6)


@pytest.mark.parametrize("base_expert", [0, 2])
def test_padded_cells_do_not_leak(base_expert: int) -> None:
    """Also when the ragged expert is the base, at its own grid (alignment is a no-op)."""
    fuse = fusion.create_fusion(
        "deformable", SPECS, grid=(5, 5), dim=16, num_heads=4, base_expert=base_expert
    ).eval()
    maps = make_maps()
    out = fuse(maps)
    doc = maps[2]
    noisy = doc.features.masked_fill(~doc.mask[:, None], 0.0) + torch.randn_like(
        doc.features
    ) * 100 * (~doc.mask[:, None])
    out2 = fuse([maps[0], maps[1], FeatureMap(noisy, doc.stride, doc.source, doc.mask)])
    torch.testing.assert_close(out, out2)


def test_valid_ratios_scale_reference_points() -> None:
    fuse = DeformableFusion(SPECS, DeformableConfig(grid=(2, 2), dim=16, num_heads=4))
    ref = fuse.reference_points(make_maps())  # (B, N, L, 2)
    torch.testing.assert_close(ref[:, 0, 0], torch.tensor([[0.25, 0.25]] * 2))
    # Sample 0's ragged map is valid on 3 of 5 rows and 4 of 5 columns: x *= 4/5, y *= 3/5.
    torch.testing.assert_close(ref[0, 3, 2], torch.tensor([0.75 * 4 / 5, 0.75 * 3 / 5]))
    torch.testing.assert_close(ref[1, 3, 2], torch.tensor([0.75 * 2 / 5, 0.75 * 5 / 5]))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"queries": "random"}, "queries='random'"),
        ({"base_expert": 3}, "base_expert=3"),
        ({"num_points": 0}, "num_points=0"),
        ({"offset_init": "xavier"}, "offset_init"),
        ({"norm": "sandwich"}, "norm='sandwich'"),
        ({"queries": "learned", "align": "avgpool", "dim": 16}, "align only"),
        ({"dim": 10, "num_heads": 4}, "dim 10 must be divisible by num_heads 4"),
        ({"grid": (3, 3), "align": "unshuffle", "dim": 16}, "integer multiple"),
    ],
)
def test_build_errors(options: dict, match: str) -> None:
    with pytest.raises(fusion.FusionConfigError, match=match):
        fusion.create_fusion("deformable", SPECS, **options)


def test_single_sampling_point_needs_two_levels() -> None:
    with pytest.raises(fusion.FusionConfigError, match="num_points=1 with a single expert"):
        fusion.create_fusion("deformable", SPECS[:1], num_points=1, num_heads=4)
    assert fusion.create_fusion("deformable", SPECS[:2], num_points=1, num_heads=4).out_dim == 16


def test_wrong_maps_raise() -> None:
    fuse = fusion.create_fusion("deformable", SPECS, dim=16)
    with pytest.raises(ValueError, match="built for 3 experts"):
        fuse(make_maps()[:2])


def test_mismatched_batch_raises() -> None:
    fuse = fusion.create_fusion("deformable", SPECS, dim=16)
    maps = make_maps()
    maps[1] = make_maps(3)[1]
    with pytest.raises(ValueError, match="same batch size"):
        fuse(maps)


def test_pre_norm_starts_as_identity_then_trains_everything() -> None:
    """norm="pre": the output at init is the queries themselves (the base expert's tokens,
    projected, + pos), so the base expert's information reaches the LLM untouched; after three
    optimiser steps every parameter gets a gradient (the zero-initialised branches open: step 1
    the output projection, step 2 the offset/weight layers behind it, step 3 the norm before)."""
    fuse = fusion.create_fusion(
        "deformable", SPECS, grid=(4, 4), dim=16, num_heads=4, num_points=2, norm="pre"
    )
    maps = make_maps()
    torch.testing.assert_close(fuse(maps), fuse.queries(maps))
    post = fusion.create_fusion("deformable", SPECS, grid=(4, 4), dim=16, num_heads=4)
    assert not torch.allclose(post(maps), post.queries(maps))  # post-norm: not the identity
    target = torch.randn(2, 16, 16)
    opt = torch.optim.SGD(fuse.parameters(), lr=1e-2)
    for _ in range(3):
        (fuse(maps) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    (fuse(maps) - target).square().mean().backward()
    missing = [n for n, p in fuse.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"
