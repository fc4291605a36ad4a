"""The mini zoo: small presets of every family, pretrained by this project with the family's
own objective, shipped as package data (``experts/mini/<name>.safetensors`` + ``<name>.json``).

Each mini preset is its family's real architecture class, built by the same spec helper the
family's real and tiny presets use; only the numbers (depth, width, input size) and the weights
differ. The weights were written by ``moe-vision pretrain NAME`` (:mod:`moe_vision.zoo`) on
procedurally generated images that never share pixels with the built-in benchmark; the JSON card
next to them records the objective, data generator and seed, steps, wall time, final loss,
probe scores and an output fingerprint.

Weights and architecture are two choices (the zoo's convention):

>>> create_expert("clip-mini", pretrained=True)   # doctest: +SKIP  (the shipped weights)
>>> create_expert("clip-mini")                    # doctest: +SKIP  (random-init twin)

``spec.checkpoint`` is the absolute path of the packaged ``.safetensors`` file, loaded through
the family's own ``load_checkpoint`` (the local-file path every checkpoint takes). Resolutions
mirror the real zoo: the high-resolution experts (ConvNeXt, SAM, Pix2Struct) see more pixels
than CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experts.families import clip, dinov2, eva02, siglip
from experts.families._checkpoints import FROM_SCRATCH_INIT
from experts.families.convnext import ConvNeXtExpert, convnext_spec
from experts.families.pix2struct import Pix2StructExpert, pix2struct_spec
from experts.families.sam import SamExpert, sam_spec
from experts.registry import get_spec, register_expert
from experts.spec import ExpertSpec

MINI_DIR = Path(__file__).resolve().parent.parent / "mini"
"""Folder of the shipped mini weights and cards (package data of ``experts``)."""


def mini_checkpoint(name: str) -> Path:
    """Path of the shipped weights of mini preset ``name`` (may not exist before pretraining)."""
    return MINI_DIR / f"{name}.safetensors"


def mini_card_path(name: str) -> Path:
    """Path of the JSON card of mini preset ``name``."""
    return MINI_DIR / f"{name}.json"


def mini_card(name: str) -> dict[str, Any]:
    """The JSON card of mini preset ``name`` (objective, data, steps, probe scores, ...).

    Raises:
        FileNotFoundError: no card shipped for ``name`` (names the file looked for).
        ValueError: the card is not valid JSON (names the file).
    """
    path = mini_card_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no card for mini preset {name!r}: {path} not found; regenerate it with "
            f"`moe-vision pretrain {name}`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"mini card {path} is not valid JSON: {err}") from err


def _ckpt(name: str) -> str:
    return str(mini_checkpoint(name))


VIT_MINI: dict[str, Any] = dict(
    hidden_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=8, image_size=64
)
"""Shared numbers of the 64 px ViT minis (CLIP, SigLIP, DINOv2): 4 blocks of width 96."""

MINI_SPECS: tuple[tuple[type, ExpertSpec], ...] = (
    (
        clip.CLIPExpert,
        clip._spec(
            "clip-mini",
            _ckpt("clip-mini"),
            64,
            2,
            intermediate_size=384,
            hidden_act="quick_gelu",
            **VIT_MINI,
        ),
    ),
    (
        siglip.SiglipExpert,
        siglip._spec("siglip-mini", _ckpt("siglip-mini"), 64, 2, intermediate_size=384, **VIT_MINI),
    ),
    (
        dinov2.Dinov2Expert,
        dinov2._spec("dinov2-mini", _ckpt("dinov2-mini"), 64, 2, mlp_ratio=4, **VIT_MINI),
    ),
    (
        eva02.EVA02Expert,
        eva02._spec(
            "eva02-mini",
            _ckpt("eva02-mini"),
            64,
            2,
            img_size=64,
            patch_size=8,
            embed_dim=96,
            depth=4,
            num_heads=4,
        ),
    ),
    (
        ConvNeXtExpert,
        convnext_spec(
            "convnext-mini",
            "convnext_xxlarge",
            "clip_laion2b_soup",
            depths=(1, 1, 2, 1),
            dims=(24, 48, 96, 192),
            input_px=256,
            checkpoint=_ckpt("convnext-mini"),
        ),
    ),
    (
        SamExpert,
        sam_spec(
            "sam-mini",
            _ckpt("sam-mini"),
            128,
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            mlp_dim=384,
            patch_size=16,
            output_channels=64,
            window_size=4,
            global_attn_indexes=(1, 3),
            initializer_range=FROM_SCRATCH_INIT,
        ),
    ),
    (
        Pix2StructExpert,
        pix2struct_spec(
            "pix2struct-mini",
            _ckpt("pix2struct-mini"),
            max_patches=64,
            num_stages=2,
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            d_ff=384,
            d_kv=24,
            seq_len=128,
            dense_act_fn="gelu_new",
            layer_norm_eps=1e-6,
            initializer_range=FROM_SCRATCH_INIT,
        ),
    ),
)
"""(expert class, spec) of every mini preset, in pretraining order (EVA-02's teacher, CLIP,
comes first)."""

for _cls, _spec in MINI_SPECS:
    register_expert(_cls, _spec)

STUDENT_TEACHERS: tuple[str, ...] = ("clip-mini", "pix2struct-mini", "convnext-mini")
"""Teachers of the shipped distilled student ``mini-student`` (``moe-vision distill``)."""


def _register_students() -> None:
    """``mini-student`` (CLIP-mini's architecture distilled from :data:`STUDENT_TEACHERS`,
    :mod:`experts.families.distilled`) and ``mini-student-as-<teacher family>``: the same
    weights returning one adaptor head's map, on that teacher's grid with its channels."""
    from experts.families.distilled import distilled_class, distilled_spec, teacher_shapes

    cls, shapes = distilled_class(clip.CLIPExpert), teacher_shapes(STUDENT_TEACHERS)
    register_expert(cls, distilled_spec("mini-student", "clip-mini", shapes, _ckpt("mini-student")))
    for teacher in STUDENT_TEACHERS:
        family = get_spec(teacher).family
        spec = distilled_spec(
            f"mini-student-as-{family}", "clip-mini", shapes, _ckpt("mini-student"), teacher
        )
        register_expert(cls, spec)


_register_students()
