"""SAM image-encoder experts, through transformers' ``SamVisionEncoder``.

The Segment Anything image encoder (Kirillov et al., "Segment Anything", ICCV 2023) is Eagle's
segmentation expert (Shi et al., 2024): a ViT with windowed attention, a few global-attention
blocks and a conv neck; at 1024 px with patch 16 it gives a ``64x64x256`` map after the neck,
which Eagle pixel-unshuffles to 32x32 (see :mod:`experts.align`).

The expert wraps transformers' ``SamVisionEncoder`` (no vendored model code) and runs its own
modules: patch embedding -> absolute position embedding -> blocks -> neck.

* Staged execution: the blocks are grouped so that each group ends with a global-attention
  block (ViT-L: 4 groups of 6). The state between stages is SAM's own token grid
  ``(B, H, W, C)``; :meth:`SamExpert.to_map` / :meth:`SamExpert.from_map` convert it.
* Readable layers: every block's output ``(B, C_vit, H, W)`` (before the neck).
* Input size: SAM's absolute position embedding is learnt at 64x64. At another
  ``input_size`` (a multiple of 16) the expert resamples it bicubically to the new grid with
  timm's ``resample_abs_pos_embed_nhwc``; the decomposed relative position tables of the
  global blocks are resized (linearly) by transformers' own ``get_rel_pos``; windows pad.
* Preprocessing: bilinear resize to ``input_size`` (not SAM's longest-side resize + pad, so that the
  map stays spatially aligned with the other experts' maps) and ImageNet mean/std, SAM's own.
* Checkpoints: ``facebook/sam-vit-*`` (full ``SamModel``: the encoder is read from
  ``vision_encoder.*``), folders written by ``save_pretrained`` of ``SamModel`` or
  ``SamVisionModel``, and safetensors/``.bin`` files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed_nhwc
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

from experts.base import Expert, StageState
from experts.families._checkpoints import (
    FROM_SCRATCH_INIT,
    load_into,
    read_weight_file,
    resolve_weight_file,
)
from experts.families.convnext import check_pixel_values
from experts.images import resize_normalise
from experts.registry import register_expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SamProcessor's image_mean / image_std
IMAGENET_STD = (0.229, 0.224, 0.225)


def stage_bounds(num_layers: int, global_attn_indexes: Sequence[int]) -> list[tuple[int, int]]:
    """Block ranges ``[start, end)`` of the stages: each ends after a global-attention block."""
    ends = sorted({int(g) + 1 for g in global_attn_indexes} | {num_layers})
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends))


class SamExpert(Expert):
    """SAM's image encoder as an expert; see the module docstring.

    ``spec.arch``: the ``SamVisionConfig`` fields (``hidden_size``, ``num_hidden_layers``,
    ``global_attn_indexes``, ``image_size`` = the size the weights were trained at, ...).
    """

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        config = SamVisionConfig(**spec.arch)
        self.encoder = SamVisionEncoder(config)
        self.stages = stage_bounds(config.num_hidden_layers, config.global_attn_indexes)
        if len(self.stages) != spec.num_stages or config.output_channels != spec.channels:
            raise ValueError(
                f"expert {spec.name!r}: spec says {spec.num_stages} stages and {spec.channels} "
                f"channels; its config gives {len(self.stages)} and {config.output_channels}"
            )

    @classmethod
    def resolve_spec(cls, spec: ExpertSpec, **overrides: object) -> ExpertSpec:
        spec = super().resolve_spec(spec, **overrides)
        if spec.patch_size != spec.arch["patch_size"]:
            raise ValueError(
                f"expert {spec.name!r}: patch_size {spec.patch_size} differs from the model's "
                f"patch size {spec.arch['patch_size']}"
            )
        return spec

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
        """RGB image -> ``{"pixel_values": (3, H, W)}`` at ``spec.input_size`` (bilinear, as
        ``SamImageProcessor``)."""
        x = resize_normalise(image, spec.input_size, spec.mean, spec.std, Image.Resampling.BILINEAR)
        return {"pixel_values": x}

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, checkpoint: str) -> None:
        path = resolve_weight_file(checkpoint)
        load_into(self.encoder, read_weight_file(path), str(path))

    # ------------------------------------------------------------------ staged execution
    def embed(self, inputs: ExpertInputs) -> StageState:
        """Patch embedding + absolute position embedding: ``(B, 3, H, W) -> (B, H/p, W/p, C)``."""
        x = check_pixel_values(self.spec, inputs, self.encoder.patch_embed.projection.weight.dtype)
        enc = self.encoder
        native = tuple(enc.patch_embed.image_size)
        if tuple(x.shape[-2:]) == native:
            hidden = enc.patch_embed(x)  # the library's own path, with its size check
        else:
            hidden = enc.patch_embed.projection(x).permute(0, 2, 3, 1)
        grid = (int(hidden.shape[1]), int(hidden.shape[2]))
        if enc.pos_embed is not None:
            pos = enc.pos_embed
            if tuple(pos.shape[1:3]) != grid:
                pos = resample_abs_pos_embed_nhwc(pos, list(grid))
            hidden = hidden + pos
        return StageState(hidden, grid)

    def run_stage(self, state: StageState, index: int) -> StageState:
        """Blocks of stage ``index`` on the ``(B, H, W, C)`` token grid."""
        if not 0 <= index < self.num_stages:
            raise IndexError(f"expert {self.spec.name!r} has stages 0..{self.num_stages - 1}")
        start, end = self.stages[index]
        hidden = state.hidden
        for layer in self.encoder.layers[start:end]:
            hidden = layer(hidden)
        return StageState(hidden, state.grid, 0, state.extras)

    def to_map(self, state: StageState) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, C, H, W)``."""
        return state.hidden.permute(0, 3, 1, 2)

    def from_map(self, state: StageState, fmap: torch.Tensor) -> StageState:
        """``(B, C, H, W)`` -> SAM's ``(B, H, W, C)`` state."""
        return StageState(fmap.permute(0, 2, 3, 1), state.grid, 0, state.extras)

    def finish(self, state: StageState) -> FeatureMap:
        """The neck: ``(B, H, W, C_vit) -> (B, 256, H, W)``."""
        return FeatureMap(self.encoder.neck(state.hidden), self.spec.patch_size, self.spec.name)

    # ------------------------------------------------------------------ forward
    def forward_map(self, inputs: ExpertInputs) -> FeatureMap:
        """``(B, 3, H, W)`` -> map after the neck ``(B, 256, H/16, W/16)``."""
        return self.run_staged(inputs)

    def forward_layers(self, inputs: ExpertInputs, layers: Sequence[int]) -> list[FeatureMap]:
        """Block outputs ``(B, C_vit, H/16, W/16)`` for block indices ``layers``."""
        if not layers:
            return []
        state = self.embed(inputs)
        wanted, last = set(layers), max(layers)
        outs: dict[int, torch.Tensor] = {}
        hidden = state.hidden
        for i, layer in enumerate(self.encoder.layers[: last + 1]):
            hidden = layer(hidden)
            if i in wanted:
                outs[i] = hidden.permute(0, 3, 1, 2)
        p = self.spec.patch_size
        return [FeatureMap(outs[i], p, f"{self.spec.name}:block{i}") for i in layers]


def sam_spec(name: str, checkpoint: str | None, input_px: int, **config: object) -> ExpertSpec:
    """A SAM preset from ``SamVisionConfig`` fields; grid, stages and channels derive from it."""
    cfg = SamVisionConfig(image_size=input_px, **config)
    patch = int(cfg.patch_size)
    return ExpertSpec(
        name=name,
        family="sam",
        library="transformers",
        role="segmentation",
        architecture="vit",
        checkpoint=checkpoint,
        input_size=(input_px, input_px),
        patch_size=patch,
        channels=int(cfg.output_channels),
        grid=(input_px // patch, input_px // patch),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        layers=tuple(range(cfg.num_hidden_layers)),
        layer_channels=(int(cfg.hidden_size),) * cfg.num_hidden_layers,
        num_stages=len(stage_bounds(cfg.num_hidden_layers, cfg.global_attn_indexes)),
        arch={"image_size": input_px, **config},
    )


register_expert(
    SamExpert,
    sam_spec(  # facebook/sam-vit-large's vision_config
        "sam-vit-l",
        "facebook/sam-vit-large",
        1024,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        mlp_dim=4096,
        patch_size=16,
        output_channels=256,
        window_size=14,
        global_attn_indexes=(5, 11, 17, 23),
    ),
)
register_expert(
    SamExpert,
    sam_spec(
        "sam-tiny",
        None,
        128,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=64,
        patch_size=16,
        output_channels=16,
        window_size=4,
        global_attn_indexes=(1, 3),
        initializer_range=FROM_SCRATCH_INIT,
    ),
)
