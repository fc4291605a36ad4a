"""CLIP ViT experts (Radford et al., 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), through ``transformers.CLIPVisionModel``.

The vision-language alignment expert of Eagle (Shi et al., 2024) and LLaVA. The map is the
patch tokens of the **penultimate** block (``arch["feature_layer"] = -2``, LLaVA's
``mm_vision_select_layer``), without the final norm: ``(B, 1024, 24, 24)`` at 336 px for
``clip-vit-l-336``. Eagle runs it at 448 px: ``create_expert("clip-vit-l-336",
input_size=(448, 448))`` interpolates the position embeddings (bicubic, the library's
``interpolate_pos_encoding``) and gives 32x32.

Presets: ``clip-vit-l-336`` (``openai/clip-vit-large-patch14-336``; the hub checkpoint is a
full ``CLIPModel``, whose vision tower ``CLIPVisionModel.from_pretrained`` extracts) and
``clip-tiny`` (same classes, 4 blocks of width 64, patch 8, 64 px, random init).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from experts.families._hf_vit import HFViTExpert
from experts.registry import register_expert

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPExpert(HFViTExpert):
    """CLIP vision tower: ``embeddings -> pre_layrnorm -> encoder.layers`` (``self.model``)."""

    config_cls = CLIPVisionConfig
    model_cls = CLIPVisionModel

    def _embed_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        # (B, 3, H, W) -> (B, 1 + h*w, C): CLS + patches, position embeddings interpolated
        # when the grid differs from the pre-training one (a no-op otherwise).
        tokens = self.model.embeddings(pixel_values, interpolate_pos_encoding=True)
        return self.model.pre_layrnorm(tokens), {}

    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layers

    def _final_norm(self) -> nn.Module:
        return self.model.post_layernorm


def _spec(name: str, checkpoint: str | None, input_size: int, num_stages: int, **arch: Any):
    return CLIPExpert.make_spec(
        name=name,
        family="clip",
        library="transformers",
        role="alignment",
        checkpoint=checkpoint,
        input_size=(input_size, input_size),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        num_stages=num_stages,
        arch=dict(arch, feature_layer=-2, feature_norm=False),
    )


register_expert(
    CLIPExpert,
    _spec(
        "clip-vit-l-336",
        "openai/clip-vit-large-patch14-336",
        336,
        4,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=336,
        hidden_act="quick_gelu",
    ),
)
register_expert(
    CLIPExpert,
    _spec(
        "clip-tiny",
        None,
        64,
        2,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        patch_size=8,
        image_size=64,
        hidden_act="quick_gelu",
    ),
)
