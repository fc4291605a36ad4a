"""The glyph term of Pix2Struct pretraining and the from-scratch init of the transformers minis.

Glyph boxes hold their character's ink; boxes land in Pix2Struct's patch cells for any aspect
ratio; the pooled loss matches an independent bilinear reference; the term sends gradient to the
patch embedding and adds exactly ``w`` times itself. Every linear weight of a SAM or Pix2Struct
preset that is trained from scratch starts as a real random network, not at the library's
default of ~1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import experts
from experts.families.pix2struct import patch_rows_cols
from moe_vision.zoo import PretrainConfig, build_objective
from moe_vision.zoo.data import Glyph, Scene, make_scenes
from moe_vision.zoo.pix2struct import CharTokenizer, GlyphLoss, glyph_targets


def test_glyph_boxes_hold_their_characters_ink() -> None:
    scenes = make_scenes(3, 0, 24, ("text",))
    for scene in scenes:
        assert "".join(g.char for g in scene.glyphs) == scene.text
        ink = np.asarray(scene.image.convert("L")) < 110  # the ink is dark, backgrounds light
        covered = np.zeros_like(ink)
        for g in scene.glyphs:
            x0, y0 = int(np.floor(g.x0)), int(np.floor(g.y0))
            x1, y1 = int(np.ceil(g.x1)), int(np.ceil(g.y1))
            assert ink[y0:y1, x0:x1].sum() > 3, (scene.text, g)  # each box holds ink
            covered[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
        assert not (ink & ~covered).any(), scene.text  # and no ink lies outside the boxes
        lefts = [g.x0 for g in scene.glyphs]
        assert lefts == sorted(lefts)  # left to right, as read


def test_glyph_targets_are_in_patch_cells_for_any_aspect_ratio() -> None:
    expert = experts.create_expert("pix2struct-tiny")
    wide = Scene("text", Image.new("RGB", (128, 64), "white"), text="AB")
    wide.glyphs = [Glyph("A", 8, 16, 24, 40), Glyph("B", 100, 4, 120, 60)]
    square = Scene("text", Image.new("RGB", (64, 64), "white"), text="7")
    square.glyphs = [Glyph("7", 32, 0, 48, 16)]
    inputs = expert.preprocess([wide.image, square.image])
    boxes, classes = glyph_targets([wide, square], inputs["flattened_patches"], CharTokenizer())
    p, m, g = expert.spec.patch_size, int(expert.spec.max_patches), expert.spec.grid[0]
    rows_w, cols_w = patch_rows_cols(64, 128, p, m, g)
    rows_s, cols_s = patch_rows_cols(64, 64, p, m, g)
    assert cols_w > rows_w  # a wide image gets more columns than rows
    sx, sy = cols_w / 128, rows_w / 64
    expected = torch.tensor(
        [[0, 8 * sx, 16 * sy, 24 * sx, 40 * sy], [0, 100 * sx, 4 * sy, 120 * sx, 60 * sy],
         [1, 32 * cols_s / 64, 0, 48 * cols_s / 64, 16 * rows_s / 64]]
    )  # fmt: skip
    torch.testing.assert_close(boxes, expected)
    assert classes.tolist() == [0, 1, 26 + 7]  # A, B, then digits after the letters


def _bilinear(fmap: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``fmap (C, H, W)`` at continuous cell coordinates (cell ``j`` spans ``[j, j + 1)``); like
    ``roi_align``, a sample within half a cell of the edge takes the edge cell's value."""
    h, w = fmap.shape[-2:]
    grid = torch.tensor([[[[2 * x / w - 1, 2 * y / h - 1]]]], dtype=fmap.dtype)
    return F.grid_sample(fmap[None], grid, align_corners=False, padding_mode="border")[0, :, 0, 0]


def test_glyph_loss_matches_a_per_box_reference() -> None:
    torch.manual_seed(0)
    loss_fn = GlyphLoss(6, 5)
    fmap = torch.randn(2, 6, 8, 8)
    boxes = torch.tensor([[0, 1.2, 0.9, 2.9, 2.7], [1, 4.0, 5.0, 5.5, 7.5], [1, 0, 0, 1, 1]])
    targets = torch.tensor([3, 0, 4])
    total = torch.tensor(0.0)
    for (b, x0, y0, x1, y1), t in zip(boxes.tolist(), targets.tolist(), strict=True):
        w, h = (x1 - x0) / 2, (y1 - y0) / 2  # 2 x 2 samples at the centres of the bin's quarters
        samples = [
            _bilinear(fmap[int(b)], x0 + (i + 0.5) * w, y0 + (j + 0.5) * h)
            for i in range(2)
            for j in range(2)
        ]
        logits = loss_fn.head(loss_fn.norm(torch.stack(samples).mean(0)))
        total = total - torch.log_softmax(logits, -1)[t]
    torch.testing.assert_close(loss_fn(fmap, boxes, targets), total / 3, rtol=1e-5, atol=1e-6)
    assert loss_fn(fmap, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)) == 0


def _objective(weight: float):
    options = {"glyph_weight": weight} if weight else {}
    config = PretrainConfig(steps=1, batch_size=4, kinds=("text",), options=options)
    return build_objective("pix2struct-tiny", config, "pix2struct").eval()  # decoder dropout off


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_glyph_weight_adds_exactly_its_term(weight: float) -> None:
    plain, with_glyphs = _objective(0.0), _objective(weight)
    assert plain.glyphs is None
    scenes = make_scenes(0, 2, 4, ("text",))
    base = plain.loss(scenes, 0)
    if weight == 0.0:
        torch.testing.assert_close(with_glyphs.loss(scenes, 0), base)
        return
    inputs = with_glyphs.expert.preprocess([s.image for s in scenes])
    fmap = with_glyphs.expert(inputs).features  # the map a fusion reads
    boxes, targets = glyph_targets(scenes, inputs["flattened_patches"], with_glyphs.tokenizer)
    term = with_glyphs.glyphs(fmap, boxes, targets)
    assert term > 0
    torch.testing.assert_close(with_glyphs.loss(scenes, 0), base + weight * term)


def test_glyph_term_alone_trains_the_patch_embedding_not_the_decoder() -> None:
    model = _objective(1.0)
    scenes = make_scenes(0, 3, 4, ("text",))
    inputs = model.expert.preprocess([s.image for s in scenes])
    boxes, targets = glyph_targets(scenes, inputs["flattened_patches"], model.tokenizer)
    model.glyphs(model.expert(inputs).features, boxes, targets).backward()
    assert model.expert.model.embeddings.patch_projection.weight.grad.abs().sum() > 0
    assert model.glyphs.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.decoder.parameters())


ZERO_INIT = ("rel_pos_h", "rel_pos_w", "pos_embed")  # SAM's own zero-initialised parameters


@pytest.mark.parametrize("name", ["pix2struct-mini", "sam-mini", "pix2struct-tiny", "sam-tiny"])
def test_from_scratch_presets_start_as_a_random_network(name: str) -> None:
    expert = experts.create_expert(name)
    for key, weight in expert.named_parameters():
        if weight.dim() >= 2 and not key.endswith(ZERO_INIT):
            assert weight.std() > 1e-3, (name, key, float(weight.std()))
