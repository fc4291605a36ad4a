"""DINOv2 experts (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features without
Supervision"), through ``transformers.Dinov2Model``.

The self-supervised expert of Eagle and Cambrian-1. The map is the patch tokens of the **last**
block after the final LayerNorm (``arch["feature_layer"] = -1``, ``feature_norm = True``:
DINOv2's ``x_norm_patchtokens``, the library's ``last_hidden_state`` without CLS).

Input size: the native **518 px** (37x37 = 1369 tokens, the size of the released position
embeddings, so nothing is interpolated at the default). Other sizes interpolate the position
embeddings (bicubic, the library always does so): ``input_size=(224, 224)`` gives 16x16.

Presets: ``dinov2-large`` (``facebook/dinov2-large``, 24 blocks in 4 stages of 6) and
``dinov2-tiny`` (same classes, 4 blocks of width 64, patch 8, 64 px, random init).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from experts.families._hf_vit import HFViTExpert
from experts.registry import register_expert

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Expert(HFViTExpert):
    """DINOv2 backbone: ``embeddings -> encoder.layer -> layernorm`` (``self.model``)."""

    config_cls = Dinov2Config
    model_cls = Dinov2Model

    def _embed_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        # (B, 3, H, W) -> (B, 1 + h*w, C): CLS + patches with interpolated position embeddings.
        return self.model.embeddings(pixel_values), {}

    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layer

    def _final_norm(self) -> nn.Module:
        return self.model.layernorm


def _spec(name: str, checkpoint: str | None, input_size: int, num_stages: int, **arch: Any):
    return Dinov2Expert.make_spec(
        name=name,
        family="dinov2",
        library="transformers",
        role="self-supervised",
        checkpoint=checkpoint,
        input_size=(input_size, input_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_stages=num_stages,
        arch=dict(arch, feature_layer=-1, feature_norm=True),
    )


register_expert(
    Dinov2Expert,
    _spec(
        "dinov2-large",
        "facebook/dinov2-large",
        518,
        4,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
    ),
)
register_expert(
    Dinov2Expert,
    _spec(
        "dinov2-tiny",
        None,
        64,
        2,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        patch_size=8,
        image_size=64,
    ),
)
