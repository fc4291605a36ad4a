"""Token compressors (fusion.projectors.compressors) and the published Eagle 2 token count.

Pixel shuffle is checked against InternVL's own ``pixel_shuffle`` (copied below from
InternVL-Chat-V1-5's ``modeling_internvl_chat.py``, ``ps_version='v2'``) and against a cell-by-cell
loop; average pooling against ``torch.nn.functional.avg_pool2d``. The real-size Eagle 2 layout
(SigLIP-so400m tiled up to 12 x 448 + thumbnail next to ConvNeXt-XXL at 1024) is built on the
meta device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import experts
import fusion
from experts.tiling import map_specs
from experts.tiling_policy import TilingPolicy
from fusion.projectors.compressors import create_compressor, list_compressors
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel


def internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's ``InternVLChatModel.pixel_shuffle`` (v2), verbatim but for ``self``."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(
        n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor))
    )
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_equals_internvl_and_a_loop():
    b, h, w, d = 2, 6, 4, 5
    x = torch.randn(b, h * w, d)
    comp = create_compressor("pixel_shuffle", d, h * w, [(h, w)])
    y = comp(x)
    assert y.shape == (b, (h // 2) * (w // 2), 4 * d) and comp.num_tokens == y.shape[1]
    ref = internvl_pixel_shuffle(x.reshape(b, h, w, d))  # InternVL reshapes tokens to (n, h, w, c)
    assert torch.equal(y, ref.reshape(b, -1, 4 * d))
    grid = x.reshape(b, h, w, d)
    for i in range(h // 2):
        for j in range(w // 2):
            block = [grid[:, 2 * i + di, 2 * j + dj] for di in range(2) for dj in range(2)]
            assert torch.equal(y[:, i * (w // 2) + j], torch.cat(block, -1))


def test_runs_are_compressed_one_by_one_and_avg_pool():
    x = torch.randn(2, 16 + 4, 3)
    ps = create_compressor("pixel_shuffle", 3, 20, [(4, 4), (2, 2)])
    y = ps(x)
    assert torch.equal(
        y[:, :4], internvl_pixel_shuffle(x[:, :16].reshape(2, 4, 4, 3)).flatten(1, 2)
    )
    assert torch.equal(y[:, 4:], x[:, 16:].reshape(2, 1, 12))
    pool = create_compressor("avg_pool", 3, 20, [(4, 4), (2, 2)])
    ref = F.avg_pool2d(x[:, :16].transpose(1, 2).reshape(2, 3, 4, 4), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool(x)[:, :4], ref)
    assert pool.num_tokens == 5 and pool.out_dim == 3
    none = create_compressor("none", 3, 20, None)
    assert none(x) is x and none.num_tokens == 20
    assert set(list_compressors()) >= {"none", "pixel_shuffle", "avg_pool"}


def test_compressor_errors_at_build_time():
    with pytest.raises(ValueError, match="must divide"):
        create_compressor("pixel_shuffle", 3, 15, [(3, 5)])
    with pytest.raises(ValueError, match="token grids"):
        create_compressor("avg_pool", 3, 15, None)
    with pytest.raises(KeyError, match="valid compressors"):
        create_compressor("shuffle", 3, 16, [(4, 4)])
    with pytest.raises(ValueError, match="factor"):
        create_compressor("pixel_shuffle", 3, 16, [(4, 4)], factor=0)


def test_model_reports_compressed_visual_tokens():
    base = dict(
        experts=["siglip-tiny", "convnext-tiny"],
        expert_options={"siglip-tiny": {"tiling": {"max_tiles": 2, "thumbnail": True}}},
        fusion="sequence_append",
        fusion_options={"per_expert_grid": True},
    )
    plain = MoEVisionModel(ModelConfig(**base))
    model = MoEVisionModel(ModelConfig(**base, compressor="pixel_shuffle"))
    # maps: siglip stitched (2x2 tile canvas, 16x16), its thumbnail 8x8, convnext 4x4
    assert plain.num_visual_tokens == 16 * 16 + 8 * 8 + 4 * 4
    assert model.num_visual_tokens == plain.num_visual_tokens // 4
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (30, 100, 3), dtype=np.uint8))
    inputs = [
        {k: v[None] for k, v in pre(im).items()} for pre in model.preprocessors
    ]  # batch of one
    assert model.encode_images(inputs).shape[:2] == (1, model.num_visual_tokens)
    assert "compressor" not in ModelConfig(**base).to_dict()  # unchanged configs, cell ids


def test_eagle2_real_size_token_count_on_meta():
    """Eagle 2: SigLIP-so400m tiles of 448 (32 x 32 patches) pixel-shuffled to 256 tokens each,
    (tiles + 1) x 256 with the thumbnail; ConvNeXt-XXL at 1024 (32 x 32) next to it."""
    tiling = {"max_tiles": 12, "thumbnail": True}
    siglip = experts.create_expert(
        "siglip-so400m-384", device="meta", input_size=(448, 448), tiling=tiling
    )
    convnext = experts.create_expert("convnext-xxl-clip", device="meta", input_size=(1024, 1024))
    assert convnext.spec.grid == (32, 32) and convnext.spec.channels == 3072
    policy = TilingPolicy(**tiling)
    assert policy.slots == 13
    tiles = {"pixel_values": torch.empty(policy.slots, 3, 448, 448, device="meta")}
    per_tile = siglip.forward_map(tiles)  # every tile + thumbnail, one batch
    assert tuple(per_tile.features.shape) == (13, 1152, 32, 32)
    shuffle = create_compressor("pixel_shuffle", 1152, 32 * 32, [(32, 32)])
    assert shuffle.num_tokens == 256 and shuffle.out_dim == 4 * 1152
    for height, width in [(1344, 1792), (448, 5376), (900, 1600), (448, 448)]:
        rows, cols = policy.select_grid(height, width, (448, 448))
        stitched = create_compressor(
            "pixel_shuffle", 1152, rows * cols * 1024, [(rows * 32, cols * 32)]
        )
        tokens = stitched.num_tokens + shuffle.num_tokens
        assert tokens == (rows * cols + 1) * 256
    assert policy.select_grid(1344, 1792, (448, 448)) == (3, 4)  # 12 tiles: 3328 tokens
    specs = map_specs(siglip.spec) + [convnext.spec]
    fuse = fusion.create_fusion(
        "sequence_append", [siglip.spec, convnext.spec], per_expert_grid=True
    )
    assert [s.grid for s in fuse.specs] == [s.grid for s in specs]
    canvas = policy.canvas()
    comp = create_compressor("pixel_shuffle", fuse.out_dim, fuse.num_tokens, fuse.token_grids)
    assert comp.num_tokens == (canvas[0] * canvas[1] + 1) * 256 + 256


@pytest.mark.parametrize("tiling", [{"grid": (2, 3)}, {"max_tiles": 3, "thumbnail": True}])
def test_tiles_order_equals_internvl_per_tile_shuffle(tiling):
    """``token_order="tiles"``: InternVL/Eagle 2 run pixel shuffle on each tile's tokens and
    concatenate tile after tile; the default ``"canvas"`` order holds the same tokens."""
    torch.manual_seed(0)
    plain = experts.create_expert("clip-tiny").eval()
    tiled = experts.create_expert("clip-tiny", tiling=tiling).eval()
    tiled.load_state_dict(plain.state_dict())
    (gh, gw), (th, tw) = plain.spec.grid, plain.spec.input_size
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (30, 100, 3), dtype=np.uint8))  # wide
    with torch.no_grad():
        fmap = tiled(tiled.preprocess([im]))  # (1, C, R*gh, Cc*gw) on the canvas
        policy = tiled.spec.tiling
        rows, cols = policy.select_grid(im.height, im.width, (th, tw))
        big = im.resize((cols * tw, rows * th), Image.Resampling.BICUBIC)
        ref = []  # InternVL: each tile through the encoder, shuffled, tiles concatenated
        for r in range(rows):
            for c in range(cols):
                tile = big.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
                x = plain(plain.preprocess(tile)).features  # (1, C, gh, gw)
                ref.append(internvl_pixel_shuffle(x.permute(0, 2, 3, 1)).flatten(1, 2))
        ref = torch.cat(ref, 1)  # (1, rows*cols*gh*gw/4, 4C)
    c, grid = fmap.channels, fmap.grid
    n = grid[0] * grid[1]
    tiles = create_compressor("pixel_shuffle", c, n, [grid], token_order="tiles", tile=[gh, gw])
    canvas = create_compressor("pixel_shuffle", c, n, [grid])
    y, y_canvas = tiles(fmap.tokens()), canvas(fmap.tokens())
    assert tiles.out_grids == [(gh // 2, gw // 2)] * (n // (gh * gw))
    assert y.shape == y_canvas.shape == (1, tiles.num_tokens, 4 * c)
    # the valid tiles (every tile of a fixed grid) in InternVL's order; padding tiles are zeros
    valid = tiles(fmap.valid().flatten(1)[..., None].float())[0].all(-1).bool()  # (N',)
    torch.testing.assert_close(y[0, valid], ref[0], atol=1e-5, rtol=1e-4)
    assert not y[0, ~valid].any()
    # the same tokens as the canvas order, in another order
    assert not torch.equal(y, y_canvas)
    torch.testing.assert_close(y[0].sort(0).values, y_canvas[0].sort(0).values, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs tile"):
        create_compressor("pixel_shuffle", c, n, [grid], token_order="tiles")
    with pytest.raises(ValueError, match="token_order must be one of"):
        create_compressor("pixel_shuffle", c, n, [grid], token_order="tile")
