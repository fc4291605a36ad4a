"""SigLIP experts (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training"), through
``transformers.SiglipVisionModel``.

A vision-language alignment expert used by Cambrian-1 (Tong et al., 2024) and Eagle 2. There is
no CLS token: every token is a patch. The map is the patch tokens of the **penultimate** block
(``arch["feature_layer"] = -2``, as LLaVA-OneVision, which drops SigLIP's last block and its
pooling head), without the final norm: ``(B, 1152, 27, 27)`` at 384 px for
``siglip-so400m-384`` (384 = 27 * 14 + 6: the patch convolution drops the last 6 pixels, as
in the released model). Set ``arch={"feature_layer": -1, "feature_norm": True}`` to read the
library's ``last_hidden_state`` instead.

Presets: ``siglip-so400m-384`` (``google/siglip-so400m-patch14-384``, 27 blocks in 3 stages of
9) and ``siglip-tiny`` (same classes, 4 blocks of width 64, patch 8, 64 px, random init).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from experts.families._hf_vit import HFViTExpert
from experts.registry import register_expert

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class SiglipExpert(HFViTExpert):
    """SigLIP vision tower: ``embeddings -> encoder.layers -> post_layernorm`` (``self.model``)."""

    config_cls = SiglipVisionConfig
    model_cls = SiglipVisionModel

    def _embed_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        # (B, 3, H, W) -> (B, h*w, C), position embeddings interpolated when the grid differs.
        return self.model.embeddings(pixel_values, interpolate_pos_encoding=True), {}

    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layers

    def _final_norm(self) -> nn.Module:
        return self.model.post_layernorm


def _spec(name: str, checkpoint: str | None, input_size: int, num_stages: int, **arch: Any):
    return SiglipExpert.make_spec(
        name=name,
        family="siglip",
        library="transformers",
        role="alignment",
        checkpoint=checkpoint,
        input_size=(input_size, input_size),
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        num_stages=num_stages,
        arch=dict(arch, feature_layer=-2, feature_norm=False),
    )


register_expert(
    SiglipExpert,
    _spec(
        "siglip-so400m-384",
        "google/siglip-so400m-patch14-384",
        384,
        3,
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=384,
    ),
)
register_expert(
    SiglipExpert,
    _spec(
        "siglip-tiny",
        None,
        64,
        2,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        patch_size=8,
        image_size=64,
    ),
)
