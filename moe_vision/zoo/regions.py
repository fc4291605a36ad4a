"""Region-text contrastive loss: the expert's *map* learns what each drawn object is.

A contrastive image tower learns from its pooled embedding only; a map cell that holds a small
object may stay uninformative, because averaging 64 cells hides it (the ConvNeXt-mini map is
what a fusion reads, not the pooled embedding). RegionCLIP (Zhong et al., CVPR 2022) aligns
*region* features with text instead: each region of the map, pooled with RoIAlign, is matched
against a pool of concept phrases embedded by the text tower, with a softmax over the pool.

Here the regions are the scenes' drawn objects (:class:`moe_vision.zoo.data.Obj`, whose disc
gives the box), the concept pool is the batch's distinct phrases, and the region embedding goes
through a LayerNorm and the image tower's own projection, so regions and whole images share
one space. Pooling is torchvision's ``roi_align``.

Shapes: map ``(B, C, H, W)``; ``R`` regions over the batch; ``P`` distinct phrases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from moe_vision.zoo.data import GREY, Scene


def region_phrase(scene: Scene, index: int) -> str:
    """The concept phrase of ``scene.objects[index]``: ``"a red circle"``; the small marker of a
    ``marker`` scene (its last object) is ``"a red marker"``."""
    obj = scene.objects[index]
    is_marker = scene.kind == "marker" and index == len(scene.objects) - 1
    if is_marker and obj.color != GREY:
        return f"a {obj.color} marker"
    return f"a {obj.color} {obj.shape}"


def region_boxes(scenes: Sequence[Scene], input_px: int) -> tuple[torch.Tensor, list[str]]:
    """Boxes of every drawn object, in the expert's input pixels, and their phrases.

    Returns:
        ``(R, 5)`` float tensor of ``(batch index, x0, y0, x1, y1)`` (``roi_align``'s format)
        and the ``R`` phrases. Scenes without objects (rendered text) add none.
    """
    rows: list[list[float]] = []
    phrases: list[str] = []
    for b, scene in enumerate(scenes):
        scale = input_px / scene.image.width
        for i, o in enumerate(scene.objects):
            rows.append([b, (o.cx - o.r) * scale, (o.cy - o.r) * scale,
                         (o.cx + o.r) * scale, (o.cy + o.r) * scale])  # fmt: skip
            phrases.append(region_phrase(scene, i))
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5), phrases


def pool_boxes(fmap: torch.Tensor, boxes: torch.Tensor, spatial_scale: float) -> torch.Tensor:
    """``(R, C)`` mean of each box of ``fmap (B, C, H, W)``: torchvision's ``roi_align`` with one
    output bin of 2x2 bilinear samples, pixel-centre aligned (cell ``j`` spans ``[j, j + 1)``).

    Args:
        boxes: ``(R, 5)`` ``(batch index, x0, y0, x1, y1)``; ``spatial_scale`` maps them to cells.
    """
    return roi_align(
        fmap,
        boxes.to(fmap),
        output_size=1,
        spatial_scale=spatial_scale,
        sampling_ratio=2,
        aligned=True,
    ).flatten(1)


class RegionTextLoss(nn.Module):
    """Softmax over the batch's distinct phrases for every object region of the map.

    Args:
        channels: the map's channels ``C``.
        project: the image tower's projection ``(N, C) -> (N, D)`` (shared with the global
            embedding).
    """

    def __init__(self, channels: int, project: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.project = project

    def region_embeddings(
        self, fmap: torch.Tensor, boxes: torch.Tensor, input_px: int
    ) -> torch.Tensor:
        """L2-normalised ``(R, D)`` embeddings of the ``boxes`` pooled from ``fmap``."""
        pooled = pool_boxes(fmap, boxes, fmap.shape[-1] / input_px)
        return F.normalize(self.project(self.norm(pooled)), dim=-1)

    def forward(
        self,
        fmap: torch.Tensor,
        scenes: Sequence[Scene],
        input_px: int,
        embed_text: Callable[[list[str]], torch.Tensor],
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy of each region against the concept pool; ``0`` without regions.

        Args:
            fmap: ``(B, C, H, W)`` map of the batch's images at ``input_px``.
            embed_text: phrases -> L2-normalised ``(P, D)`` text embeddings.
            logit_scale: the temperature's inverse, a scalar.
        """
        boxes, phrases = region_boxes(scenes, input_px)
        if not phrases:
            return fmap.sum() * 0.0
        pool = sorted(set(phrases))
        target = torch.tensor([pool.index(p) for p in phrases], device=fmap.device)
        regions = self.region_embeddings(fmap, boxes.to(fmap.device), input_px)
        logits = logit_scale * regions @ embed_text(pool).T
        return F.cross_entropy(logits, target)
