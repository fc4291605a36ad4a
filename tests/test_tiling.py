"""Tiling (experts.tiling): every family's tiled forward against a brute-force reference.

The reference runs the *untiled* expert (same weights) on each tile by hand, one tile at a
time, and stitches the maps with ``torch.cat``; the thumbnail is the untiled expert on the whole
image. The grid choice is checked against InternVL's ``find_closest_aspect_ratio``, copied
below with its own ``(width, height)`` ratio convention.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import experts
from experts.tiling import TILE_GRID_KEY, map_specs
from experts.tiling_policy import TilingPolicy
from moe_vision.features.cache_keys import expert_cache_key

TINY = experts.list_experts("*-tiny")
POLICY = {"max_tiles": 3, "thumbnail": True}


def internvl_closest_ratio(aspect_ratio, target_ratios, width, height, image_size):
    """InternVL-Chat-V1-5 ``find_closest_aspect_ratio`` (ratios are (w_tiles, h_tiles))."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_grid_choice_matches_internvl(max_tiles):
    ratios = sorted(
        {
            (i, j)
            for n in range(1, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if 1 <= i * j <= max_tiles
        },
        key=lambda x: x[0] * x[1],
    )
    policy = TilingPolicy(max_tiles=max_tiles)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(8, 4000, (300, 2)).tolist() + [[448, 448], [17, 375], [896, 448]]:
        cols, rows = internvl_closest_ratio(w / h, ratios, w, h, 448)
        assert policy.select_grid(h, w, (448, 448)) == (rows, cols), (h, w)


def internvl_grid(w, h, min_num, max_num, image_size=448):
    """InternVL's ``dynamic_preprocess`` grid for a ``w x h`` image, as ``(rows, cols)``."""
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    cols, rows = internvl_closest_ratio(w / h, target_ratios, w, h, image_size)
    return rows, cols


def test_grid_tie_break_matches_internvl_for_every_min_and_max():
    # the case: a wide image, only 1x2 and 2x1 allowed, equally close: InternVL 1x2
    assert TilingPolicy(min_tiles=2, max_tiles=2).select_grid(800, 1000, (448, 448)) == (1, 2)
    assert internvl_grid(1000, 800, 2, 2) == (1, 2)
    rng = np.random.default_rng(1)
    sizes = rng.integers(8, 3000, (40, 2)).tolist()
    # exact ties: aspect ratios halfway between two grids' (e.g. 5:4 between 1:2 and 2:1)
    sizes += [[800, 1000], [1000, 800], [448, 448], [300, 450], [450, 300], [400, 1000]]
    sizes += [[h, w] for h, w in [[224, 560], [560, 224], [100, 250], [4, 10], [2, 5], [5, 2]]]
    for max_tiles in range(1, 13):
        for min_tiles in range(1, max_tiles + 1):
            policy = TilingPolicy(min_tiles=min_tiles, max_tiles=max_tiles)
            for h, w in sizes:
                got = policy.select_grid(h, w, (448, 448))
                want = internvl_grid(w, h, min_tiles, max_tiles)
                assert got == want, (h, w, min_tiles, max_tiles)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [  # a wide image (1x3 tiles) and a tall one (2x1): a ragged batch
        Image.fromarray(rng.integers(0, 256, (30, 100, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (90, 40, 3), dtype=np.uint8)),
    ]


def pair(name: str, tiling: dict) -> tuple[experts.Expert, experts.Expert]:
    """The untiled and the tiled expert with the same weights."""
    torch.manual_seed(0)
    plain = experts.create_expert(name).eval()
    tiled = experts.create_expert(name, tiling=tiling).eval()
    tiled.load_state_dict(plain.state_dict())
    return plain, tiled


@pytest.mark.parametrize("name", TINY)
def test_tiled_forward_equals_tiles_by_hand(name):
    plain, tiled = pair(name, POLICY)
    ims = images()
    with torch.no_grad():
        out = tiled(tiled.preprocess(ims))
        th, tw = plain.spec.input_size
        canvas = TilingPolicy(**POLICY).canvas()
        for b, (im, (rows, cols)) in enumerate(zip(ims, [(1, 3), (2, 1)])):
            big = im.resize((cols * tw, rows * th), Image.Resampling.BICUBIC)
            blocks = [
                [
                    plain(plain.preprocess(big.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))))
                    for c in range(cols)
                ]
                for r in range(rows)
            ]
            ref = torch.cat([torch.cat([m.features[0] for m in row], 2) for row in blocks], 1)
            ref_valid = torch.cat([torch.cat([m.valid()[0] for m in row], 1) for row in blocks], 0)
            h, w = ref.shape[1:]
            assert out.features.shape[2:] == (canvas[0] * h // rows, canvas[1] * w // cols)
            torch.testing.assert_close(out.features[b, :, :h, :w], ref, atol=1e-5, rtol=1e-4)
            assert torch.equal(out.mask[b, :h, :w], ref_valid)
            assert not out.mask[b, h:].any() and not out.mask[b, :, w:].any()
            assert not out.features[b, :, h:].any() and not out.features[b, :, :, w:].any()
            thumb = plain(plain.preprocess(im))
            torch.testing.assert_close(
                out.thumbnail.features[b], thumb.features[0], atol=1e-5, rtol=1e-4
            )
    assert [s.grid for s in map_specs(tiled.spec)] == [out.grid, out.thumbnail.grid]


@pytest.mark.parametrize("name", ["clip-tiny", "convnext-tiny", "pix2struct-tiny"])
def test_tiled_layers_and_gradients(name):
    """Intermediate layers stitch the same way; gradients reach the expert through tiles."""
    plain, tiled = pair(name, {"grid": (1, 2)})
    layer = plain.spec.layers[-2]
    ims = images()
    inputs = tiled.preprocess(ims)
    (fmap,) = tiled(inputs, layers=[layer])
    assert fmap.mask is None or name == "pix2struct-tiny"  # a fixed grid: no padding
    with torch.no_grad():
        for b, im in enumerate(ims):
            big = im.resize((2 * plain.spec.input_size[1], plain.spec.input_size[0]))
            tw = plain.spec.input_size[1]
            maps = [
                plain(plain.preprocess(big.crop((k * tw, 0, (k + 1) * tw, big.height))), [layer])
                for k in range(2)
            ]
            ref = torch.cat([m[0].features[0] for m in maps], 2)
            torch.testing.assert_close(fmap.features[b].detach(), ref, atol=1e-5, rtol=1e-4)
    fmap.features.sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in tiled.parameters())


def test_untiled_unchanged_and_cache_key_has_tiling():
    plain, tiled = pair("clip-tiny", POLICY)
    assert plain.spec.tiling is None and "tiling" not in plain.spec.cache_key()
    ims = images()
    inputs = plain.preprocess(ims)
    assert set(inputs) == {"pixel_values"}
    with torch.no_grad():
        assert torch.equal(plain(inputs).features, plain.forward_map(inputs).features)
        assert plain(inputs).thumbnail is None
    keys = {
        expert_cache_key(plain),
        expert_cache_key(tiled),
        expert_cache_key(pair("clip-tiny", {"max_tiles": 2})[1]),
    }
    assert len(keys) == 3  # tiled and untiled maps never share a cache entry
    assert tiled.spec.cache_key()["tiling"]["max_tiles"] == 3


def test_one_tile_without_thumbnail_is_the_untiled_expert():
    plain, tiled = pair("siglip-tiny", {"grid": (1, 1)})
    ims = images()
    a, b = plain.preprocess(ims), tiled.preprocess(ims)
    assert torch.equal(a["pixel_values"], b["pixel_values"][:, 0])
    with torch.no_grad():
        assert torch.equal(plain(a).features, tiled(b).features)


def test_preprocessor_pickles_and_bad_inputs_raise():
    _, tiled = pair("siglip-tiny", POLICY)
    pre = pickle.loads(pickle.dumps(tiled.preprocessor))
    x = pre(images()[0])
    assert x[TILE_GRID_KEY].tolist() == [1, 3] and x["pixel_values"].shape[0] == 4
    inputs = tiled.preprocess(images())
    inputs[TILE_GRID_KEY] = torch.tensor([[2, 2], [1, 1]])
    with pytest.raises(ValueError, match="not allowed"):
        tiled(inputs)
    with pytest.raises(KeyError, match="tile_grid"):
        tiled({"pixel_values": inputs["pixel_values"]})
    with pytest.raises(ValueError, match="unknown options"):
        experts.create_expert("siglip-tiny", tiling={"tiles": 4})
    with pytest.raises(ValueError, match="min_tiles"):
        TilingPolicy(max_tiles=0)


def test_feature_cache_round_trip_and_thumbnail_experts_run_live(tmp_path):
    """Stitched (ragged, masked) maps survive the feature cache; experts with a thumbnail are
    listed in ``staged_experts`` so the trainer never serves them from it."""
    import fusion
    from moe_vision.features.cache import FeatureCache

    _, tiled = pair("clip-tiny", {"max_tiles": 3})
    inputs = tiled.preprocess(images())
    cache = FeatureCache(tmp_path)
    key = expert_cache_key(tiled)
    first = cache.maps(tiled, key, inputs, ["a0", "b1"])
    again = cache.maps(tiled, key, inputs, ["a0", "b1"])
    with torch.no_grad():
        direct = tiled(inputs)
    assert cache.hits == 2 and cache.misses == 2
    for m in (first, again):
        assert torch.equal(m.features, direct.features) and torch.equal(m.mask, direct.mask)
    thumb = experts.get_spec("siglip-tiny", tiling={"grid": (1, 2), "thumbnail": True})
    fuse = fusion.create_fusion("channel_concat", [experts.get_spec("clip-tiny"), thumb])
    assert fuse.staged_experts() == {1} and len(fuse.specs) == 3
