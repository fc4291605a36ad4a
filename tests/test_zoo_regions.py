"""The region-text loss (RegionCLIP-style) of ConvNeXt-CLIP pretraining: boxes in the expert's
pixels, phrases per object, RoIAlign pooling against an independent bilinear reference, the
softmax over the batch's distinct phrases against a per-region loop, and gradients that reach
the map through the region term alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moe_vision.zoo import PretrainConfig, build_objective
from moe_vision.zoo.data import Obj, Scene, make_scenes
from moe_vision.zoo.regions import RegionTextLoss, region_boxes, region_phrase


def _scene(kind: str, objects: list[Obj], size: int = 64) -> Scene:
    return Scene(kind, Image.new("RGB", (size, size), (240, 240, 240)), objects)


def test_boxes_are_the_object_discs_in_the_experts_input_pixels() -> None:
    scenes = [
        _scene("object", [Obj("circle", "red", 32.0, 16.0, 8.0)]),
        _scene("text", []),
        _scene(
            "marker",
            [Obj("square", "gray", 40.0, 40.0, 20.0), Obj("square", "blue", 100.0, 60.0, 4.0)],
            size=192,
        ),
    ]
    boxes, phrases = region_boxes(scenes, input_px=256)
    expected = torch.tensor(
        [[0, 96, 32, 160, 96], [2, 20 * 4 / 3, 20 * 4 / 3, 60 * 4 / 3, 60 * 4 / 3],
         [2, 96 * 4 / 3, 56 * 4 / 3, 104 * 4 / 3, 64 * 4 / 3]],
        dtype=torch.float32,
    )  # fmt: skip
    torch.testing.assert_close(boxes, expected)
    assert phrases == ["a red circle", "a gray square", "a blue marker"]


def test_phrases_name_markers_and_keep_clutter_grey() -> None:
    clutter, marker = Obj("triangle", "gray", 10, 10, 5), Obj("square", "green", 50, 50, 3)
    assert region_phrase(_scene("marker", [clutter, marker]), 0) == "a gray triangle"
    assert region_phrase(_scene("marker", [clutter, marker]), 1) == "a green marker"
    assert region_phrase(_scene("objects", [marker, marker]), 1) == "a green square"


def _bilinear(fmap: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``fmap (C, H, W)`` at continuous map coordinates (cell centres at integers)."""
    h, w = fmap.shape[-2:]
    grid = torch.tensor([[[[2 * (x + 0.5) / w - 1, 2 * (y + 0.5) / h - 1]]]], dtype=fmap.dtype)
    return F.grid_sample(fmap[None], grid, align_corners=False, padding_mode="zeros")[0, :, 0, 0]


def test_region_pooling_and_loss_match_a_per_region_reference() -> None:
    torch.manual_seed(0)
    channels, dim, input_px = 6, 5, 64
    loss_fn = RegionTextLoss(channels, torch.nn.Linear(channels, dim, bias=False))
    fmap = torch.randn(2, channels, 8, 8)
    scenes = [
        _scene("objects", [Obj("circle", "red", 20, 20, 6), Obj("circle", "red", 44, 30, 6)]),
        _scene("pair", [Obj("star", "blue", 12, 40, 9), Obj("circle", "red", 50, 50, 5)]),
    ]
    vocab = {"a red circle": torch.randn(dim), "a blue star": torch.randn(dim)}

    def embed_text(phrases: list[str]) -> torch.Tensor:
        return F.normalize(torch.stack([vocab[p] for p in phrases]), dim=-1)

    scale = torch.tensor(3.0)
    got = loss_fn(fmap, scenes, input_px, embed_text, scale)

    pool = sorted(vocab)  # the distinct phrases, once each
    total = torch.tensor(0.0)
    n = 0
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            s = 8 / input_px  # map cells per input pixel; roi_align: 2x2 samples, aligned
            x0, y0, side = (o.cx - o.r) * s - 0.5, (o.cy - o.r) * s - 0.5, 2 * o.r * s
            samples = [
                _bilinear(fmap[b], x0 + (i + 0.5) * side / 2, y0 + (j + 0.5) * side / 2)
                for i in range(2)
                for j in range(2)
            ]
            pooled = torch.stack(samples).mean(0)
            region = F.normalize(loss_fn.project(loss_fn.norm(pooled)), dim=-1)
            logits = scale * region @ embed_text(pool).T
            target = pool.index(f"a {o.color} {o.shape}")
            total = total - torch.log_softmax(logits, -1)[target]
            n += 1
    torch.testing.assert_close(got, total / n, rtol=1e-5, atol=1e-6)


def _objective(
    region_weight: float, preset: str = "convnext-tiny", objective: str = "convnext-clip"
):
    options = {"region_weight": region_weight} if region_weight else {}
    config = PretrainConfig(steps=1, batch_size=4, kinds=("objects", "marker"), options=options)
    return build_objective(preset, config, objective)


def test_region_term_sends_gradient_to_the_map_and_the_text_tower() -> None:
    model = _objective(1.0)
    scenes = make_scenes(0, 0, 4, ("objects", "marker"))
    inputs = model.expert.preprocess([s.image for s in scenes])
    fmap = model.expert(inputs).features
    region = model.regions(fmap, scenes, 128, model.embed_text, model.scale())
    region.backward()
    stem = model.expert.model.stem[0].weight.grad
    assert stem is not None and stem.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text.parameters())
    assert model.regions.norm.weight.grad.abs().sum() > 0
    assert model.head_norm.weight.grad is None  # the global head is not on this path


FAMILIES = [("convnext-tiny", "convnext-clip"), ("clip-tiny", "clip"), ("siglip-tiny", "siglip")]


@pytest.mark.parametrize("preset,objective", FAMILIES)
@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_region_weight_adds_exactly_its_term(preset: str, objective: str, weight: float) -> None:
    plain, with_regions = _objective(0.0, preset, objective), _objective(weight, preset, objective)
    assert plain.regions is None
    scenes = make_scenes(0, 1, 4, ("objects", "marker"))
    base = plain.loss(scenes, 0)
    if weight == 0.0:
        torch.testing.assert_close(with_regions.loss(scenes, 0), base)
        return
    # same seed -> same expert and towers; the region modules hold no random parameters
    inputs = with_regions.expert.preprocess([s.image for s in scenes])
    fmap = with_regions.expert(inputs).features  # the map a fusion reads, not the pooled output
    px = int(inputs["pixel_values"].shape[-1])
    scale = with_regions.region_scale()
    region = with_regions.regions(fmap, scenes, px, with_regions.embed_text, scale)
    assert region > 0
    torch.testing.assert_close(with_regions.loss(scenes, 0), base + weight * region)
