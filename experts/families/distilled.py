"""Distilled students: one expert of the zoo plus one adaptor head per teacher (AM-RADIO).

A student distilled from several teachers (AM-RADIO, Ranzinger et al., 2024, arXiv 2312.06709;
trained by :mod:`moe_vision.distill`) is an ordinary expert of any family (``arch["student"]``,
a preset name) plus, per teacher, an :class:`AdaptorHead`: an MLP on the student's summary token
(its CLS token, or the map's mean when the family has none) and an MLP on its spatial map,
resampled to the teacher's grid with :func:`experts.align_to_grid`. Each head ends with the
inverse of the teacher's balancing transform (PHI-S, per-channel standardisation or none), so
its outputs are in the teacher's own feature space.

``arch["adaptor"]`` chooses what the expert's forward returns: ``None`` (the student's own map,
``(B, C_s, h, w)``) or a teacher's name (that adaptor's map ``(B, C_t, H_t, W_t)``, on the
teacher's grid with the teacher's channels), so a fusion reads the student's teacher-shaped maps
in place of the teachers' own with no change to the fusion code::

    create_expert("student-mini", pretrained=True)                           # the student's map
    create_expert("student-mini", pretrained=True, arch={"adaptor": "pix2struct-mini"})

The weights (student + heads) are one safetensors file whose keys are this module's
``state_dict()`` (``student.*``, ``adaptors.<teacher>.*``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torch import nn

from experts.align import align_to_grid
from experts.base import Expert
from experts.families._checkpoints import read_weight_file
from experts.registry import create_expert, get_spec
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap


def _student_options(arch: Mapping[str, Any]) -> dict[str, Any]:
    """``create_expert`` overrides of the student (``arch["student_options"]``), e.g. a ViT-B/16
    built from a ViT-L preset's class: ``{"input_size": [224, 224], "arch": {...}}``."""
    opts = dict(arch.get("student_options") or {})
    if "input_size" in opts:
        opts["input_size"] = tuple(opts["input_size"])
    return opts


def summary_and_map(expert: Expert, inputs: ExpertInputs) -> tuple[torch.Tensor, FeatureMap]:
    """The expert's summary vector ``(B, C)`` and output map ``(B, C, h, w)``.

    The summary is the first prefix token (CLS) at the map's layer when the expert has staged
    execution and prefix tokens, else the masked mean of the map (ConvNets, SigLIP-like towers).
    """
    if expert.num_stages > 0:
        state = expert.embed(inputs)
        for i in range(expert.num_stages):
            state = expert.run_stage(state, i)
        fmap = expert.finish(state)
        if state.num_prefix > 0 and state.hidden.dim() == 3:
            return state.hidden[:, 0], fmap
        return masked_mean(fmap), fmap
    fmap = expert(inputs)
    return masked_mean(fmap), fmap


def masked_mean(fmap: FeatureMap) -> torch.Tensor:
    """Mean over the valid cells of ``fmap``: ``(B, C)``."""
    x = fmap.features
    if fmap.mask is None:
        return x.mean((2, 3))
    m = fmap.mask[:, None].to(x.dtype)
    return (x * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)


def _mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(), nn.Linear(hidden, c_out))


class AdaptorHead(nn.Module):
    """One teacher's adaptor: summary MLP and spatial MLP, then the inverse balancing.

    Args:
        student_channels: ``C_s``.
        channels: the teacher's ``C_t``.
        grid: the teacher's ``(H_t, W_t)``.
        hidden: MLP width (default ``max(C_s, C_t)``).

    Buffers ``{summary,spatial}_inverse`` ``(C_t, C_t)`` and ``{summary,spatial}_offset``
    ``(C_t,)`` map a normalised prediction ``y`` to the teacher's space: ``y @ inverse +
    offset`` (identity until the distillation sets them).
    """

    def __init__(
        self, student_channels: int, channels: int, grid: tuple[int, int], hidden: int = 0
    ) -> None:
        super().__init__()
        hidden = hidden or max(student_channels, channels)
        self.grid = (int(grid[0]), int(grid[1]))
        self.summary = _mlp(student_channels, hidden, channels)
        self.spatial = _mlp(student_channels, hidden, channels)
        for part in ("summary", "spatial"):
            self.register_buffer(f"{part}_inverse", torch.eye(channels))
            self.register_buffer(f"{part}_offset", torch.zeros(channels))

    def normalised(
        self, summary: torch.Tensor, fmap: FeatureMap
    ) -> tuple[torch.Tensor, FeatureMap]:
        """Predictions in the teacher's balanced space.

        Args:
            summary: the student's summary ``(B, C_s)``.
            fmap: the student's map ``(B, C_s, h, w)``.

        Returns:
            ``(B, C_t)`` and a map ``(B, C_t, H_t, W_t)``: the MLP applied per cell, then
            resampled to the teacher's grid with :func:`align_to_grid` (``"auto"``).
        """
        x = self.spatial(fmap.features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C_t, h, w)
        out = align_to_grid(FeatureMap(x, fmap.stride, fmap.source, fmap.mask), self.grid)
        return self.summary(summary), out

    def denormalise(self, y: torch.Tensor, part: str = "spatial") -> torch.Tensor:
        """``y`` ``(..., C_t)`` in the balanced space to the teacher's space."""
        inverse, offset = getattr(self, f"{part}_inverse"), getattr(self, f"{part}_offset")
        return y @ inverse + offset

    def forward(self, summary: torch.Tensor, fmap: FeatureMap) -> tuple[torch.Tensor, FeatureMap]:
        """Predictions in the teacher's own space: ``(B, C_t)`` and ``(B, C_t, H_t, W_t)``."""
        s, m = self.normalised(summary, fmap)
        feats = self.denormalise(m.features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.denormalise(s, "summary"), FeatureMap(feats, m.stride, m.source, m.mask)


class DistilledExpert(Expert):
    """A student expert with its adaptor heads; see the module docstring.

    ``spec.arch``: ``student`` (preset name), ``student_options`` (its ``create_expert``
    overrides), ``teachers`` (``{name: {"channels": C_t, "grid":
    [H_t, W_t]}}``), ``adaptor`` (``None`` or a teacher name), ``hidden`` (MLP width, 0: auto).
    Subclasses set :attr:`student_cls` (:func:`distilled_class`), whose preprocessing is used.
    """

    student_cls: type[Expert]

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        self.student = create_expert(spec.arch["student"], **_student_options(spec.arch))
        c_s, hidden = self.student.spec.channels, int(spec.arch.get("hidden", 0))
        self.adaptors = nn.ModuleDict(
            {
                name: AdaptorHead(c_s, int(t["channels"]), tuple(t["grid"]), hidden)
                for name, t in spec.arch["teachers"].items()
            }
        )

    @classmethod
    def resolve_spec(cls, spec: ExpertSpec, **overrides: object) -> ExpertSpec:
        """Apply overrides; channels, grid and stride follow ``arch["adaptor"]``."""
        fields = set(ExpertSpec.__dataclass_fields__)
        bad = sorted(set(overrides) - fields)
        if bad:
            raise TypeError(f"unknown expert spec fields {bad}; valid fields are {sorted(fields)}")
        arch = dict(spec.arch)
        arch.update(overrides.pop("arch", None) or {})  # type: ignore[arg-type]
        student = get_spec(arch["student"], **_student_options(arch))
        adaptor, teachers = arch.get("adaptor"), arch["teachers"]
        if adaptor is not None and adaptor not in teachers:
            raise ValueError(
                f"expert {spec.name!r}: arch adaptor {adaptor!r} is not one of its teachers "
                f"{sorted(teachers)} (or None for the student's own map)"
            )
        channels, grid = student.channels, student.grid
        if adaptor is not None:
            channels, grid = int(teachers[adaptor]["channels"]), tuple(teachers[adaptor]["grid"])
        spec = spec.replace(arch=arch, **overrides)
        stride = max(1, round(student.input_size[0] / grid[0]))
        return spec.replace(
            input_size=student.input_size,
            mean=student.mean,
            std=student.std,
            channels=channels,
            grid=(int(grid[0]), int(grid[1])),
            patch_size=stride,
        )

    @classmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
        """The student's own preprocessing (its input size, mean and std)."""
        student = get_spec(spec.arch["student"], **_student_options(spec.arch))
        return cls.student_cls.preprocess_image(student, image)

    def load_checkpoint(self, checkpoint: str) -> None:
        """Load student + heads from a ``.safetensors`` written by ``moe-vision distill``."""
        from pathlib import Path

        state = read_weight_file(Path(checkpoint))
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        if missing or extra or shapes:
            raise ValueError(
                f"expert {self.spec.name!r}: checkpoint {checkpoint} does not fit: missing "
                f"{missing[:5]}, unexpected {extra[:5]}, other shapes {sorted(shapes)[:5]}"
            )
        self.load_state_dict(state, strict=True)

    def forward_map(self, inputs: ExpertInputs) -> FeatureMap:
        """The student's map, or with ``arch["adaptor"]`` that adaptor's map in the teacher's
        space ``(B, C_t, H_t, W_t)``."""
        adaptor = self.spec.arch.get("adaptor")
        if adaptor is None:
            fmap = self.student(inputs)
            return FeatureMap(fmap.features, fmap.stride, self.spec.name, fmap.mask)
        summary, fmap = summary_and_map(self.student, inputs)
        out = self.adaptors[adaptor](summary, fmap)[1]
        return FeatureMap(out.features, self.spec.patch_size, self.spec.name, out.mask)


@functools.cache
def distilled_class(student_cls: type[Expert]) -> type[DistilledExpert]:
    """The :class:`DistilledExpert` subclass of a student family (one per family)."""
    name = f"Distilled{student_cls.__name__}"
    return type(name, (DistilledExpert,), {"student_cls": student_cls})


def distilled_spec(
    name: str,
    student: str,
    teachers: Mapping[str, Mapping[str, Any]],
    checkpoint: str | None,
    adaptor: str | None = None,
    hidden: int = 0,
    student_options: Mapping[str, Any] | None = None,
) -> ExpertSpec:
    """The spec of a distilled student of preset ``student`` (built with ``student_options``)
    with heads for ``teachers`` (``{name: {"channels", "grid"}}``)."""
    s = get_spec(student, **_student_options({"student_options": student_options}))
    arch = {
        "student": student,
        "student_options": dict(student_options or {}),
        "teachers": {
            k: {"channels": int(v["channels"]), "grid": list(v["grid"])}
            for k, v in teachers.items()
        },
        "adaptor": adaptor,
        "hidden": int(hidden),
    }
    spec = ExpertSpec(
        name=name,
        family="distilled",
        library=s.library,
        role="distilled",
        architecture=s.architecture,
        checkpoint=checkpoint,
        input_size=s.input_size,
        patch_size=s.patch_size,
        channels=s.channels,
        grid=s.grid,
        mean=s.mean,
        std=s.std,
        arch=arch,
    )
    return DistilledExpert.resolve_spec(spec)


def teacher_shapes(names: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{teacher: {"channels": C, "grid": [H, W]}}`` from the registered specs."""
    out = {}
    for n in names:
        s = get_spec(n)
        out[n] = {"channels": s.channels, "grid": list(s.grid)}
    return out
