"""Sequence append and channel concatenation: numerics against hand-built references, token
counts, ragged masks, and build-time errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic import synthetic_spec

import fusion
from experts.spec import ExpertSpec, FeatureMap
from fusion import FusionConfigError


def make_spec(name: str, channels: int, grid: tuple[int, int], stride: int = 8) -> ExpertSpec:
    return synthetic_spec(name, channels, grid, stride=stride)


def make_map(spec: ExpertSpec, batch: int = 2, mask: torch.Tensor | None = None) -> FeatureMap:
    x = torch.randn(batch, spec.channels, *spec.grid)
    return FeatureMap(x, spec.patch_size, spec.name, mask)


SPECS = [make_spec("a", 8, (4, 4)), make_spec("b", 6, (8, 8), 4), make_spec("c", 5, (2, 3), 16)]


def test_channel_concat_equals_hand_built_concat_and_projection():
    fuse = fusion.create_fusion(
        "channel_concat", SPECS, dim=7, expert_align=("auto", "unshuffle", "bilinear")
    )
    maps = [make_map(s) for s in SPECS]
    a, b, c = (m.features for m in maps)
    stacked = torch.cat(
        [
            a,
            F.pixel_unshuffle(b, 2),
            F.interpolate(c, size=(4, 4), mode="bilinear", align_corners=False),
        ],
        dim=1,
    )  # (B, 8 + 24 + 5, 4, 4)
    tokens = stacked.flatten(2).transpose(1, 2)
    expected = tokens @ fuse.proj.weight.T + fuse.proj.bias
    out = fuse(maps)
    assert out.shape == (2, 16, 7) and (fuse.num_tokens, fuse.out_dim) == (16, 7)
    assert fuse.out_grid == (4, 4)
    torch.testing.assert_close(out, expected)


def test_channel_concat_without_dim_keeps_channels_and_zeroes_padding():
    specs = [make_spec("a", 3, (4, 4)), make_spec("ragged", 2, (4, 4))]
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[:, :, 3:] = False  # Pix2Struct-style: last column is padding
    maps = [make_map(specs[0]), make_map(specs[1], mask=mask)]
    out = fusion.create_fusion("channel_concat", specs)(maps)
    assert out.shape == (2, 16, 5)
    grid = out.reshape(2, 4, 4, 5)
    torch.testing.assert_close(grid[..., :3], maps[0].features.permute(0, 2, 3, 1))
    assert torch.all(grid[:, :, 3:, 3:] == 0)
    torch.testing.assert_close(grid[:, :, :3, 3:], maps[1].features.permute(0, 2, 3, 1)[:, :, :3])


def test_channel_concat_grid_and_gradients():
    fuse = fusion.create_fusion("channel_concat", SPECS, grid=(2, 2), dim=4, align="avgpool")
    maps = [make_map(s) for s in SPECS]
    for m in maps:
        m.features.requires_grad_(True)
    out = fuse(maps)
    assert out.shape == (2, 4, 4)
    out.square().sum().backward()
    assert all(m.features.grad.abs().sum() > 0 for m in maps)
    assert fuse.num_parameters() == (8 + 6 + 5) * 4 + 4


def test_sequence_append_token_counts_and_numerics():
    fuse = fusion.create_fusion("sequence_append", SPECS, dim=12)
    maps = [make_map(s) for s in SPECS]
    out = fuse(maps)
    assert fuse.num_tokens == 3 * 16 and out.shape == (2, 48, 12)
    aligned_b = F.adaptive_avg_pool2d(maps[1].features, (4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 16:32], fuse.projs[1](aligned_b))
    own = fusion.create_fusion("sequence_append", SPECS, per_expert_grid=True)
    assert own.num_tokens == 16 + 64 + 6 and own.out_dim == 8  # default D: widest expert
    out = own(maps)
    assert out.shape == (2, 86, 8)
    tokens_c = maps[2].tokens()
    torch.testing.assert_close(out[:, 80:], tokens_c @ own.projs[2].weight.T + own.projs[2].bias)
    assert own.out_grid is None
    single = fusion.create_fusion("sequence_append", SPECS[:1], grid=(2, 2))
    assert single.out_grid == (2, 2) and single.num_tokens == 4


def test_sequence_append_zeroes_invalid_tokens():
    specs = [make_spec("a", 3, (2, 2)), make_spec("ragged", 4, (2, 2))]
    mask = torch.tensor([[[True, False], [True, True]], [[True, True], [False, False]]])
    fuse = fusion.create_fusion("sequence_append", specs, dim=5)
    out = fuse([make_map(specs[0]), make_map(specs[1], mask=mask)])
    ragged = out[:, 4:]
    assert torch.all(ragged[~mask.flatten(1)] == 0)
    assert torch.all(ragged[mask.flatten(1)].abs().sum(-1) > 0)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("channel_concat", {"colour": 1}, "has no options \\['colour'\\]"),
        ("channel_concat", {"align": "nearest"}, "unknown alignment method 'nearest'"),
        ("channel_concat", {"align": "unshuffle"}, "cannot align expert 'c'"),
        ("channel_concat", {"expert_align": ("auto",)}, "expert_align has 1 entries"),
        ("channel_concat", {"grid": (0, 4)}, "grid must be two positive integers"),
        ("sequence_append", {"per_expert_grid": True, "grid": (4, 4)}, "per_expert_grid"),
        ("sequence_append", {"align": "cubic"}, "unknown alignment method"),
    ],
)
def test_build_time_errors(name, options, match):
    with pytest.raises(FusionConfigError, match=match):
        fusion.create_fusion(name, SPECS, **options)


def test_unknown_fusion_and_bad_maps():
    with pytest.raises(KeyError, match="valid fusions are: .*channel_concat"):
        fusion.create_fusion("concat", SPECS)
    with pytest.raises(FusionConfigError, match="at least one expert"):
        fusion.create_fusion("sequence_append", [])
    fuse = fusion.create_fusion("channel_concat", SPECS)
    maps = [make_map(s) for s in SPECS]
    with pytest.raises(ValueError, match="built for 3 experts"):
        fuse(maps[:2])
    with pytest.raises(ValueError, match="has 5 channels, expert 'b' was declared with 6"):
        fuse([maps[0], maps[2], maps[2]])


def test_real_size_configurations_from_the_papers_build_on_meta():
    """Token counts and widths of the published configurations, without allocating weights."""
    import experts

    clip448 = experts.get_spec("clip-vit-l-336", input_size=(448, 448))
    clip336 = experts.get_spec("clip-vit-l-336")
    convnext = experts.get_spec("convnext-xxl-clip")
    sam = experts.get_spec("sam-vit-l")
    with torch.device("meta"):
        eagle = fusion.create_fusion(
            "channel_concat", [clip448, convnext, sam], expert_align=("auto", "auto", "unshuffle")
        )
        llava_hr = fusion.create_fusion("mr_adapter", [clip336, convnext])
        mgm_stages = fusion.create_fusion(  # MGM-HD: ConvNeXt stages at 768 px
            "mini_gemini",
            [clip336, experts.get_spec("convnext-xxl-clip", input_size=(768, 768))],
            highres_indices=(1,),
            highres_layers=(0, 1, 2),
        )
        mgm_hr = fusion.create_fusion(
            "mini_gemini",
            [clip336, experts.get_spec("convnext-xxl-clip", input_size=(1536, 1536))],
        )
        append = fusion.create_fusion(
            "sequence_append", [clip336, experts.get_spec("dinov2-large")], per_expert_grid=True
        )
    assert (eagle.num_tokens, eagle.out_dim) == (1024, 1024 + 3072 + 256 * 4)  # Eagle: 32x32
    assert (llava_hr.num_tokens, llava_hr.out_dim, len(llava_hr.adapters)) == (576, 1024, 3)
    assert (mgm_stages.num_tokens, mgm_stages.staged_experts()) == (576, {1})
    assert (mgm_hr.query_index, mgm_hr.window, mgm_hr.num_tokens) == (0, (2, 2), 576)
    assert append.num_tokens == 24 * 24 + 37 * 37
    assert llava_hr.num_parameters() > 0 and eagle.num_parameters() == 0
