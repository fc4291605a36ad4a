"""Promptable mask prediction for SAM (Kirillov et al., 2023) on generated shapes.

transformers' own ``SamModel`` is built around the expert: its ``vision_encoder`` **is** the
expert's ``SamVisionEncoder`` (one module), with a small prompt encoder and mask decoder sized to
the encoder's neck. Each scene gives a few prompts: a positive point at the centre of one of its
objects (the small marker in clutter is always among them), and the target is that object's
mask at the decoder's resolution (4x the embedding grid). The loss is SAM's: focal and dice on
the mask logits (20:1, torchvision's ``sigmoid_focal_loss``) plus the mean-squared error of the
predicted IoU. The prompt encoder and mask decoder are dropped afterwards; the expert keeps the
image encoder, as the real zoo does with ``facebook/sam-vit-large``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import sigmoid_focal_loss
from transformers import SamConfig, SamModel

from experts import Expert
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import Scene

FOCAL_WEIGHT = 20.0  # SAM's focal : dice ratio


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean soft dice loss of mask logits ``(N, H, W)`` against binary targets ``(N, H, W)``."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


@register_objective("sam")
class SamPromptableMasks(Objective):
    """``SamModel`` around the expert's image encoder; see the module docstring.
    ``config.options``: ``prompts`` per image (default 2)."""

    description = (
        "promptable mask prediction from point prompts on generated shapes (transformers "
        "SamModel; focal + dice + IoU loss)"
    )

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        spec = expert.spec
        width = spec.channels
        self.prompts = int(config.options.get("prompts", 2))
        model_config = SamConfig(
            # num_pos_feats sizes SamModel's shared positional embedding (2x = the neck width)
            vision_config=dict(expert.encoder.config.to_dict(), num_pos_feats=width // 2),
            prompt_encoder_config=dict(
                hidden_size=width,
                image_size=spec.input_size[0],
                patch_size=spec.patch_size,
                image_embedding_size=spec.grid[0],
            ),
            mask_decoder_config=dict(
                hidden_size=width,
                mlp_dim=4 * width,
                num_attention_heads=4,
                iou_head_hidden_dim=width,
            ),
        )
        self.model = SamModel(model_config)
        self.model.vision_encoder = expert.encoder  # one module: the decoder trains the expert

    def prompts_for(self, scene: Scene, rng: np.random.Generator) -> list[int]:
        """Object indices to prompt: the marker (last object) of a marker scene, then random."""
        n = len(scene.objects)
        first = [n - 1] if scene.kind == "marker" else []
        rest = rng.integers(n, size=self.prompts - len(first)).tolist()
        return first + rest

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        spec = self.expert.spec
        size, mask_size = spec.input_size[0], 4 * spec.grid[0]
        rng = np.random.default_rng([self.config.seed, step])
        points, targets = [], []
        for scene in scenes:
            scale = size / scene.image.width
            idx = self.prompts_for(scene, rng)
            points.append(
                [[[scene.objects[i].cx * scale, scene.objects[i].cy * scale]] for i in idx]
            )
            targets.append(np.stack([scene.mask(i, mask_size) for i in idx]))
        inputs = self.expert.preprocess([s.image for s in scenes])
        points_t = torch.tensor(points, dtype=torch.float32)  # (B, prompts, 1, 2)
        labels = torch.ones(points_t.shape[:3], dtype=torch.long)  # positive points
        out = self.model(
            pixel_values=inputs["pixel_values"],
            input_points=points_t,
            input_labels=labels,
            multimask_output=False,
        )
        logits = out.pred_masks[:, :, 0].flatten(0, 1)  # (B * prompts, h, w)
        target = torch.from_numpy(np.stack(targets)).float().flatten(0, 1)
        focal = sigmoid_focal_loss(logits, target, reduction="mean")
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (target > 0)).flatten(1).sum(1)
            union = (pred | (target > 0)).flatten(1).sum(1).clamp(min=1)
            iou = inter / union
        iou_loss = torch.nn.functional.mse_loss(out.iou_scores[:, :, 0].flatten(), iou)
        return FOCAL_WEIGHT * focal + dice_loss(logits, target) + iou_loss
