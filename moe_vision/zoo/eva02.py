"""Masked image modelling for EVA-02 (Fang et al., 2024): regress a CLIP teacher's features.

EVA-02's pretraining masks about 40% of the patches (block-wise, as BEiT) and trains the ViT to
predict, at the masked positions, the features a frozen CLIP vision tower gives the full image,
with a cosine-similarity loss. Here the teacher is the shipped ``clip-mini`` (its output map,
the patch tokens of its feature layer, aligned to the student's grid with
:func:`experts.align_to_grid`); the student is the expert's timm ``Eva`` with a learnable mask
token in place of the masked patch embeddings and a linear head to the teacher's width. The
mask token and head are dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import experts
from experts import Expert
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import Scene


def block_mask(
    grid: tuple[int, int], ratio: float, rng: np.random.Generator, max_tries: int = 100
) -> np.ndarray:
    """BEiT-style block-wise mask ``(H, W)`` bool covering about ``ratio`` of the patches:
    random rectangles (aspect 0.3-3.3) until the target count is reached."""
    h, w = grid
    target = max(1, round(ratio * h * w))
    mask = np.zeros(grid, dtype=bool)
    for _ in range(max_tries):
        if mask.sum() >= target:
            break
        area = rng.uniform(1, max(1.0, target - mask.sum()))
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        bh = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
        bw = int(np.clip(round(np.sqrt(area / aspect)), 1, w))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mask[top : top + bh, left : left + bw] = True
    return mask


@register_objective("eva02-mim")
class EVA02MaskedFeatureModelling(Objective):
    """EVA-02's MIM with a CLIP teacher; see the module docstring.

    ``config.options``: ``teacher`` (preset, default ``"clip-mini"``), ``teacher_pretrained``
    (load its shipped weights, default True; False only for tests), ``mask_ratio`` (default 0.4).
    """

    description = (
        "masked image modelling: regress the CLIP-mini teacher's patch features at ~40% "
        "block-masked patches (cosine loss, EVA-02's recipe)"
    )

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        self.teacher_name = config.options.get("teacher", "clip-mini")
        self.mask_ratio = float(config.options.get("mask_ratio", 0.4))
        pretrained = bool(config.options.get("teacher_pretrained", True))
        teacher = experts.create_expert(self.teacher_name, pretrained=pretrained).eval()
        teacher.requires_grad_(False)
        self.teacher = [teacher]  # a list: not a submodule, so not trained nor saved
        width = expert.spec.channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(width, teacher.spec.channels)

    def student_tokens(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, H*W, C)`` of the student with masked patches replaced.

        Args:
            pixel_values: ``(B, 3, H_px, W_px)``.
            mask: ``(B, H, W)`` bool, True = masked.
        """
        eva = self.expert.model
        x = eva.patch_embed(pixel_values)  # (B, H, W, C) with dynamic_img_size
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x, rope = eva._pos_embed(x)
        x = eva.norm_pre(x)
        for i in range(len(eva.blocks)):
            x = self.expert._run_block(i, x, {"rope": rope})
        x = eva.norm(x)
        return x[:, x.shape[1] - mask[0].numel() :]

    @torch.no_grad()
    def targets(self, scenes: Sequence[Scene], grid: tuple[int, int]) -> torch.Tensor:
        """The teacher's map on the full images, ``(B, H*W, C_teacher)`` on the student grid."""
        teacher = self.teacher[0]
        fmap = teacher(teacher.preprocess([s.image for s in scenes]))
        return experts.align_to_grid(fmap, grid, "bilinear").tokens()

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        grid = self.expert.spec.grid
        rng = np.random.default_rng([self.config.seed, step])
        mask = torch.from_numpy(np.stack([block_mask(grid, self.mask_ratio, rng) for _ in scenes]))
        inputs = self.expert.preprocess([s.image for s in scenes])
        pred = self.head(self.student_tokens(inputs["pixel_values"], mask))  # (B, N, C_t)
        target = self.targets(scenes, grid)
        cos = F.cosine_similarity(pred, target, dim=-1)  # (B, N)
        return (1 - cos)[mask.flatten(1)].mean()
