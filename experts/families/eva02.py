"""EVA-02 experts (Fang et al., 2024, "EVA-02: A Visual Representation for Neon Genesis"),
through timm's ``Eva``.

The object-centric expert of Eagle (Shi et al., 2024). EVA-02 is a ViT with 2D rotary position
embeddings (RoPE) on top of absolute ones, SwiGLU MLPs and sub-LN; the rotary table of the
input's grid is computed once in :meth:`EVA02Expert.embed` and carried between stages in
``StageState.extras["rope"]``.

The map is the patch tokens of the **last** block through the model's final ``norm``
(``feature_layer = -1``, ``feature_norm = True``: timm's ``forward_features`` without CLS;
for the avg-pool fine-tuned checkpoints that norm is the identity and pooling uses
``fc_norm``). The model is built with ``dynamic_img_size=True``, so any input size works: the
absolute position embeddings are resampled and the rotary table recomputed for the new grid.

Presets: ``eva02-large`` (``timm/eva02_large_patch14_448.mim_m38m_ft_in22k_in1k``: MIM on
Merged-38M, fine-tuned on IN-22k then IN-1k; 448 px -> 32x32x1024, 24 blocks in 4 stages of 6;
mean/std from timm's ``pretrained_cfg``), ``eva02-tiny`` (same builder, 4 blocks of width 64,
patch 8, 64 px, random init). The classifier head is dropped (``num_classes=0``).

Checkpoints: timm weights ``"<arch>.<tag>"`` or their hub id ``"timm/<arch>.<tag>"``
(``timm.models.load_pretrained`` into the built model: cache first, offline with
``HF_HUB_OFFLINE=1``), or a local
``.safetensors``/``.pth`` state dict in timm's format (``safetensors.torch.save_file(
expert.model.state_dict(), path)``), read with ``timm.models.load_state_dict``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.eva import checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from experts.families._hf_vit import ViTExpert, library_kwargs, looks_local, strip_expert_prefix
from experts.registry import register_expert
from experts.spec import ExpertSpec

logger = logging.getLogger(__name__)

EVA02_LARGE_TAG = "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"


class EVA02Expert(ViTExpert):
    """EVA-02 on timm's ``Eva`` (``self.model``); ``arch["model_name"]`` is the timm builder
    and every other library key of ``arch`` a kwarg of ``timm.create_model``."""

    depth_key = "depth"
    width_key = "embed_dim"

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        kwargs = library_kwargs(spec.arch)
        name = kwargs.pop("model_name", None)
        if name is None:
            raise ValueError(f"expert {spec.name!r}: arch must name a timm model ('model_name')")
        self.model = timm.create_model(name, pretrained=False, **kwargs)

    # ------------------------------------------------------------------ library hooks
    def _embed_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        # (B, 3, H, W) -> (B, h, w, C) -> (B, 1 + h*w, C) and the rotary table of the grid.
        x = self.model.patch_embed(pixel_values)
        x, rope = self.model._pos_embed(x)
        return self.model.norm_pre(x), {"rope": rope}

    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def _run_block(self, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        rope = extras.get("rope")
        if rope is not None and getattr(self.model, "rope_mixed", False):
            rope = rope[index]  # depth-dependent rotary tables
        block = self.model.blocks[index]
        if self.model.grad_checkpointing and torch.is_grad_enabled():
            return grad_checkpoint(block, hidden, rope=rope, use_reentrant=False)
        return block(hidden, rope=rope)

    def _final_norm(self) -> nn.Module:
        return self.model.norm

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, checkpoint: str) -> None:
        """Load a local timm state dict file, or timm weights ``"<arch>.<tag>"``.

        Raises:
            FileNotFoundError: the file is missing, or the hub weights cannot be fetched.
            ValueError: the file is unreadable or does not fit the preset's architecture.
        """
        if not looks_local(checkpoint):
            self._load_pretrained(checkpoint)
            return
        state = strip_expert_prefix(self._read_file(Path(checkpoint).expanduser().absolute()))
        classifier = self.model.pretrained_cfg.get("classifier")
        if classifier and getattr(self.model, "num_classes", 0) == 0:
            dropped = [k for k in state if k.split(".")[0] == classifier]
            for k in dropped:  # this expert has no classifier head (num_classes=0)
                state.pop(k)
        self.load_state(state, str(checkpoint))

    def _read_file(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FileNotFoundError(
                f"expert {self.spec.name!r}: checkpoint file {path} not found; expected a timm "
                f"state dict (.safetensors or .pth), e.g. written by "
                f"safetensors.torch.save_file(expert.model.state_dict(), path)"
            )
        try:
            return dict(timm.models.load_state_dict(str(path)))
        except Exception as err:
            raise ValueError(
                f"expert {self.spec.name!r}: cannot read checkpoint {path}: "
                f"{type(err).__name__}: {err} (is the file truncated or corrupt?)"
            ) from err

    def _load_pretrained(self, name: str) -> None:
        """Timm weights ``"<arch>.<tag>"`` (or their hub id ``timm/<arch>.<tag>``) into
        ``self.model`` (``timm.models.load_pretrained``: its hub download, cache and
        ``HF_HUB_OFFLINE`` handling; EVA's checkpoint filter)."""
        given, name = name, name.removeprefix("hf-hub:").removeprefix("timm/")
        arch_name = self.model.pretrained_cfg.get("architecture")
        known = timm.list_pretrained(f"{arch_name}.*")
        try:
            cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"expert {self.spec.name!r}: checkpoint {given!r} is neither a local file nor "
                f"timm weights ({err}); weights for {arch_name}: {known}"
            ) from err
        if cfg.architecture != arch_name:
            raise ValueError(
                f"expert {self.spec.name!r}: timm weights {given!r} are for {cfg.architecture}, "
                f"this expert is {arch_name}; weights for {arch_name}: {known}"
            )
        try:
            timm.models.load_pretrained(
                self.model,
                pretrained_cfg=cfg.to_dict(),
                num_classes=self.model.num_classes,
                filter_fn=checkpoint_filter_fn,
                strict=True,
            )
        except RuntimeError as err:
            raise ValueError(
                f"expert {self.spec.name!r}: timm weights {given!r} do not fit the expert's "
                f"architecture: {err}"
            ) from err
        except Exception as err:
            raise FileNotFoundError(
                f"expert {self.spec.name!r}: could not fetch timm weights {given!r} "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
                f"{type(err).__name__}: {err}. Fetch them on a machine with hub access "
                f"(timm.create_model({name!r}, pretrained=True) fills the cache), or pass a "
                f"local .safetensors file."
            ) from err
        logger.info("expert %s: loaded timm weights %s", self.spec.name, name)


def _spec(name: str, checkpoint: str | None, input_size: int, num_stages: int, **arch: Any):
    cfg = timm.models.get_pretrained_cfg(EVA02_LARGE_TAG)
    return EVA02Expert.make_spec(
        name=name,
        family="eva02",
        library="timm",
        role="object",
        checkpoint=checkpoint,
        input_size=(input_size, input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        num_stages=num_stages,
        arch=dict(
            arch,
            model_name=EVA02_LARGE_TAG.split(".")[0],
            num_classes=0,
            dynamic_img_size=True,
            feature_layer=-1,
            feature_norm=True,
        ),
    )


_LARGE_SIZE = timm.models.get_pretrained_cfg(EVA02_LARGE_TAG).input_size[-1]

register_expert(
    EVA02Expert,
    _spec(
        "eva02-large",
        f"timm/{EVA02_LARGE_TAG}",
        _LARGE_SIZE,
        4,
        img_size=_LARGE_SIZE,
        patch_size=14,
        embed_dim=1024,
        depth=24,
        num_heads=16,
    ),
)
register_expert(
    EVA02Expert,
    _spec(
        "eva02-tiny",
        None,
        64,
        2,
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
    ),
)
