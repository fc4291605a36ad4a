"""Image-text contrastive pretraining: CLIP, ConvNeXt-CLIP (open_clip's ``ClipLoss``) and
SigLIP (open_clip's ``SigLipLoss``).

CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023): an image tower and a text tower
embed a batch of images and their captions in one space; the InfoNCE loss (CLIP) or the
pairwise sigmoid loss (SigLIP) pulls matching pairs together. The captions
(:meth:`moe_vision.zoo.data.Scene.caption`) name colours, shapes, counts, positions, the text
and the small marker, so the image tower must see all of them.

The image embedding is the family's own pooled output, as in the released models:

* CLIP: the library model's ``pooler_output`` (the CLS token of the last block after
  ``post_layernorm``), then a bias-free projection (``CLIPModel.visual_projection``);
* SigLIP: ``pooler_output`` of its attention-pooling head (MAP), then a projection;
* ConvNeXt-CLIP: global average pool of the trunk's map, LayerNorm, projection (open_clip's
  ``TimmModel`` head for ConvNeXt towers).

The text tower is open_clip's ``TextTransformer`` over a word tokenizer
(:mod:`moe_vision.zoo.text`).

Each can add a region-text term (``options={"region_weight": w}``, :mod:`moe_vision.zoo.regions`,
after RegionCLIP): every drawn object's box, pooled from the map the fusion reads (the expert's
own map, not the pooled embedding), is matched against the batch's object phrases, so the map's
cells learn what lies in them. The shipped ConvNeXt-mini recipe uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from experts import Expert
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import Scene
from moe_vision.zoo.regions import RegionTextLoss
from moe_vision.zoo.text import WordTokenizer, text_tower

EMBED_DIM = 64


class ContrastiveObjective(Objective):
    """Image tower (the expert + a projection) and text tower under a contrastive loss."""

    description = "image-text contrastive (open_clip ClipLoss) on generated captions"

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        self.tokenizer = WordTokenizer()
        self.text = text_tower(self.tokenizer, EMBED_DIM)
        self.visual_projection = nn.Linear(self.pooled_dim(), EMBED_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.criterion = ClipLoss()
        self.build_head()
        # after the head: the parameter order (and so the shipped weights) stays as it was
        self.region_weight = float(config.options.get("region_weight", 0.0))
        self.regions = (
            RegionTextLoss(expert.spec.channels, self.visual_projection)
            if self.region_weight > 0
            else None
        )

    def build_head(self) -> None:
        """Add the family's pooling head's modules (none: the library's own pooler)."""

    def pooled_dim(self) -> int:
        """Width of :meth:`pool`'s embedding."""
        return self.expert.spec.channels

    def pool(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The family's pooled image embedding ``(B, D)`` before the projection, and the
        expert's map ``(B, C, H, W)`` when pooling computed it (``None``: the library's own
        pooler, which does not give the map the fusion reads)."""
        return self.expert.model(pixel_values=inputs["pixel_values"]).pooler_output, None

    def embed_text(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, EMBED_DIM)``."""
        return F.normalize(self.text(self.tokenizer(captions)), dim=-1)

    def embed(
        self, scenes: Sequence[Scene]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The expert's inputs, L2-normalised image and caption embeddings (``(B, D)`` each)
        and the expert's map when :meth:`pool` computed it."""
        inputs = self.expert.preprocess([s.image for s in scenes])
        pooled, fmap = self.pool(inputs)
        image = F.normalize(self.visual_projection(pooled), dim=-1)
        return inputs, image, self.embed_text([s.caption() for s in scenes]), fmap

    def scale(self) -> torch.Tensor:
        """The learnt inverse temperature, capped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def region_scale(self) -> torch.Tensor:
        """Inverse temperature of the region-text softmax (CLIP's own)."""
        return self.scale()

    def region_loss(
        self,
        inputs: dict[str, torch.Tensor],
        scenes: Sequence[Scene],
        fmap: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``region_weight`` times the region-text loss on the expert's map (computed from
        ``inputs`` unless given); ``0`` without the term."""
        if self.regions is None:
            return torch.zeros(())
        fmap = self.expert(inputs).features if fmap is None else fmap
        input_px = int(inputs["pixel_values"].shape[-1])
        region = self.regions(fmap, scenes, input_px, self.embed_text, self.region_scale())
        return self.region_weight * region

    def image_text_loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The family's image-text loss on paired ``(B, D)`` embeddings (CLIP's: ``ClipLoss``)."""
        return self.criterion(image, text, self.scale())

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        inputs, image, text, fmap = self.embed(scenes)
        return self.image_text_loss(image, text) + self.region_loss(inputs, scenes, fmap)


@register_objective("clip")
class ClipObjective(ContrastiveObjective):
    """CLIP: the CLS token of the last block (``pooler_output``), open_clip's ``ClipLoss``."""


@register_objective("convnext-clip")
class ConvNeXtClipObjective(ContrastiveObjective):
    """ConvNeXt-CLIP: average-pooled trunk map + LayerNorm, open_clip's ``ClipLoss``; with
    ``options["region_weight"] > 0``, plus that weight times the region-text loss on the map."""

    description = (
        "image-text contrastive (open_clip ClipLoss), ConvNeXt tower, generated captions; "
        "options.region_weight > 0 adds a region-text loss on the map (RegionCLIP)"
    )

    def build_head(self) -> None:
        self.head_norm = nn.LayerNorm(self.expert.spec.channels)

    def pool(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The map's global average, then the head's LayerNorm ``(B, C)``, and the map."""
        fmap = self.expert(inputs).features  # (B, C, H, W)
        return self.head_norm(fmap.mean(dim=(2, 3))), fmap


@register_objective("siglip")
class SiglipObjective(ContrastiveObjective):
    """SigLIP: the attention-pooling head's output, open_clip's ``SigLipLoss`` with a learnt
    bias (initialised at scale 10, bias -10, as in the paper)."""

    description = "image-text sigmoid loss (open_clip SigLipLoss) on generated captions"

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.criterion = SigLipLoss()
        if self.regions is not None:  # a softmax over phrases: a CLIP-style temperature of its own
            self.region_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def region_scale(self) -> torch.Tensor:
        return self.region_logit_scale.clamp(max=math.log(100)).exp()

    def image_text_loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.criterion(image, text, self.logit_scale.exp(), self.logit_bias)
