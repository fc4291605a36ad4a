"""ConvNeXt experts: the CLIP-trained ConvNeXt towers, through timm.

ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) trained contrastively by
OpenCLIP on LAION-2B is the high-resolution alignment expert of Eagle (Shi et al., 2024;
``convnext_xxlarge`` at 1024 px -> 32x32x3072), LLaVA-HR (Luo et al., 2024), Mini-Gemini
(Li et al., 2024) and Cambrian-1 (Tong et al., 2024), which read several stages.

The expert wraps timm's own ``ConvNeXt`` (no vendored model code) with its classifier/CLIP
projection head pruned (``prune_intermediate_layers``): the map is the trunk's output,
``forward_features`` = stem -> 4 stages -> ``norm_pre`` (identity for these towers).

* Staged execution: ``embed`` = stem, ``run_stage(i)`` = ``stages[i]``, ``finish`` = ``norm_pre``.
* Readable layers: the 4 stages (strides 4, 8, 16, 32), read through timm's
  ``forward_intermediates``.
* Mean/std and resize interpolation come from timm's ``pretrained_cfg`` of the preset's weight
  tag, never re-typed.
* Checkpoints: timm weight tags (``convnext_xxlarge.clip_laion2b_soup``), timm hub repos
  (``timm/<model>.<tag>``), folders written by
  ``timm.models.save_for_hf`` and safetensors/``.bin`` files; OpenCLIP checkpoints
  (``visual.trunk.*``) are remapped by timm's own ``checkpoint_filter_fn``.

Presets:

* ``convnext-xxl-clip``: ``convnext_xxlarge.clip_laion2b_soup``, 1024 px (Eagle) -> 32x32x3072.
* ``convnext-l-clip-320``: ``convnext_large_mlp.clip_laion2b_ft_soup_320`` (OpenCLIP's
  ``convnext_large_d_320`` laion2b_s29b_b131k_ft_soup, the tower of LLaVA-HR and Mini-Gemini),
  320 px -> 10x10x1536; LLaVA-HR/MGM run it at 768-1024 px via ``input_size``.
* ``convnext-tiny``: the same timm class with small depths/dims, 128 px -> 4x4x128.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.models.convnext import checkpoint_filter_fn

from experts.base import Expert, StageState
from experts.families._checkpoints import load_into, read_weight_file, resolve_weight_file
from experts.images import resize_normalise
from experts.registry import register_expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap

STEM_STRIDE = 4  # timm ConvNeXt "patch" stem; each later stage halves the grid


def check_pixel_values(
    spec: ExpertSpec, inputs: ExpertInputs, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``inputs["pixel_values"]`` as ``(B, 3, H, W)`` at ``spec.input_size``, cast to ``dtype``
    (the expert's weights, e.g. bf16), or a clear error."""
    if "pixel_values" not in inputs:
        raise KeyError(
            f"expert {spec.name!r} expects inputs {{'pixel_values': (B, 3, H, W)}}, "
            f"got keys {sorted(inputs)}; build them with expert.preprocess(images)"
        )
    x = inputs["pixel_values"]
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != tuple(spec.input_size):
        raise ValueError(
            f"expert {spec.name!r}: pixel_values must be (B, 3, {spec.input_size[0]}, "
            f"{spec.input_size[1]}), got {tuple(x.shape)}; build them with expert.preprocess"
        )
    return x if dtype is None else x.to(dtype)


class ConvNeXtExpert(Expert):
    """A timm ConvNeXt trunk as an expert; see the module docstring.

    ``spec.arch``: ``model`` (timm builder name), ``kwargs`` (builder overrides, e.g.
    ``depths``/``dims``), ``pretrained_tag`` (timm weight tag the mean/std come from).
    """

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        model = timm.create_model(
            spec.arch["model"], pretrained=False, num_classes=0, **spec.arch.get("kwargs", {})
        )
        # The CLIP projection / classifier head is not part of the map: prune it.
        model.prune_intermediate_layers(len(model.stages), prune_norm=False, prune_head=True)
        self.model = model
        self.stage_strides = tuple(int(f["reduction"]) for f in model.feature_info)
        channels = tuple(int(f["num_chs"]) for f in model.feature_info)
        if channels != tuple(spec.layer_channels) or self.stage_strides[-1] != spec.patch_size:
            raise ValueError(
                f"expert {spec.name!r}: spec says stage channels {spec.layer_channels} and stride "
                f"{spec.patch_size}, timm {spec.arch['model']} has {channels} and "
                f"{self.stage_strides[-1]}"
            )

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
        """RGB image -> ``{"pixel_values": (3, H, W)}`` at ``spec.input_size``, with the weight
        tag's interpolation and mean/std."""
        resample = Image.Resampling[spec.arch.get("interpolation", "bicubic").upper()]
        x = resize_normalise(image, spec.input_size, spec.mean, spec.std, resample)
        return {"pixel_values": x}

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, checkpoint: str) -> None:
        cfg = None if Path(checkpoint).exists() else timm.models.get_pretrained_cfg(checkpoint)
        if (
            cfg is not None and cfg.hf_hub_id
        ):  # a timm weight tag, e.g. "convnext_xxlarge.clip_laion2b_soup"
            checkpoint = cfg.hf_hub_id
        path = resolve_weight_file(checkpoint)
        state_dict = checkpoint_filter_fn(read_weight_file(path), self.model)
        headless = {  # the pruned head: its checkpoint keys have no place in the trunk
            name for name, m in self.model.named_children() if next(m.parameters(), None) is None
        }
        load_into(self.model, state_dict, str(path), ignore=lambda k: k.split(".")[0] in headless)

    # ------------------------------------------------------------------ forward
    def forward_map(self, inputs: ExpertInputs) -> FeatureMap:
        """``(B, 3, H, W)`` -> map ``(B, C, H/32, W/32)`` (timm ``forward_features``)."""
        x = check_pixel_values(self.spec, inputs, self._dtype)
        return FeatureMap(self.model.forward_features(x), self.spec.patch_size, self.spec.name)

    def forward_layers(self, inputs: ExpertInputs, layers: Sequence[int]) -> list[FeatureMap]:
        """Stage outputs ``(B, C_i, H/s_i, W/s_i)`` for stage indices ``layers``."""
        if not layers:
            return []
        x = check_pixel_values(self.spec, inputs, self._dtype)
        order = sorted(set(layers))
        maps = self.model.forward_intermediates(
            x, indices=order, intermediates_only=True, stop_early=True
        )
        by_stage = dict(zip(order, maps))
        return [
            FeatureMap(by_stage[i], self.stage_strides[i], f"{self.spec.name}:stage{i}")
            for i in layers
        ]

    # ------------------------------------------------------------------ staged execution
    def embed(self, inputs: ExpertInputs) -> StageState:
        """Stem: ``(B, 3, H, W)`` -> ``(B, C_0, H/4, W/4)``."""
        x = self.model.stem(check_pixel_values(self.spec, inputs, self._dtype))
        return StageState(x, (int(x.shape[-2]), int(x.shape[-1])))

    def run_stage(self, state: StageState, index: int) -> StageState:
        """``stages[index]``: ``(B, C_{i-1}, h, w)`` -> ``(B, C_i, h', w')``."""
        if not 0 <= index < self.num_stages:
            raise IndexError(f"expert {self.spec.name!r} has stages 0..{self.num_stages - 1}")
        x = self.model.stages[index](state.hidden)
        return StageState(x, (int(x.shape[-2]), int(x.shape[-1])), 0, state.extras)

    def finish(self, state: StageState) -> FeatureMap:
        return FeatureMap(self.model.norm_pre(state.hidden), self.spec.patch_size, self.spec.name)


def convnext_spec(
    name: str,
    model: str,
    pretrained_tag: str,
    depths: tuple[int, ...],
    dims: tuple[int, ...],
    input_px: int,
    checkpoint: str | None,
    output_stride: int | None = None,
) -> ExpertSpec:
    """A ConvNeXt preset: channels/strides from ``dims``, mean/std from timm's weight tag.

    ``output_stride`` (timm's own argument, e.g. 16) dilates the last stages instead of
    downsampling them, so the map keeps a finer grid (``input_px / output_stride``).
    """
    cfg = timm.models.get_pretrained_cfg(f"{model}.{pretrained_tag}")
    if cfg is None:
        raise ValueError(f"timm has no pretrained config {model}.{pretrained_tag}")
    stride = output_stride or STEM_STRIDE * 2 ** (len(dims) - 1)
    kwargs: dict = {"depths": tuple(depths), "dims": tuple(dims)}
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    return ExpertSpec(
        name=name,
        family="convnext",
        library="timm",
        role="high-resolution",
        architecture="convnet",
        checkpoint=checkpoint,
        input_size=(input_px, input_px),
        patch_size=stride,
        channels=dims[-1],
        grid=(input_px // stride, input_px // stride),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        layers=tuple(range(len(dims))),
        layer_channels=tuple(dims),
        num_stages=len(dims),
        arch={
            "model": model,
            "pretrained_tag": pretrained_tag,
            "interpolation": cfg.interpolation,
            "kwargs": kwargs,
        },
    )


register_expert(
    ConvNeXtExpert,
    convnext_spec(
        "convnext-xxl-clip",
        "convnext_xxlarge",
        "clip_laion2b_soup",
        depths=(3, 4, 30, 3),
        dims=(384, 768, 1536, 3072),
        input_px=1024,
        checkpoint="timm/convnext_xxlarge.clip_laion2b_soup",
    ),
)
register_expert(
    ConvNeXtExpert,
    convnext_spec(
        "convnext-l-clip-320",
        "convnext_large_mlp",
        "clip_laion2b_ft_soup_320",
        depths=(3, 3, 27, 3),
        dims=(192, 384, 768, 1536),
        input_px=320,
        checkpoint="timm/convnext_large_mlp.clip_laion2b_ft_soup_320",
    ),
)
register_expert(
    ConvNeXtExpert,
    convnext_spec(
        "convnext-tiny",
        "convnext_xxlarge",
        "clip_laion2b_soup",
        depths=(1, 1, 2, 1),
        dims=(16, 32, 64, 128),
        input_px=128,
        checkpoint=None,
    ),
)
