"""The expert registry: presets by name, ``create_expert`` and ``list_experts`` (timm style).

A family module registers its presets with :func:`register_expert`: a preset is an
:class:`~experts.spec.ExpertSpec` plus the :class:`~experts.base.Expert` subclass that builds
it. Adding a family is one new module plus its registration in ``experts/__init__.py``;
nothing else changes, and nothing branches on an expert's name.

Weights are a choice independent of the architecture (open_clip's lesson):
``create_expert("clip-vit-l-336")`` is the real architecture, randomly initialised;
``pretrained=True`` loads the preset's checkpoint (hub id, through the library's own loader);
``checkpoint="path/or/hub-id"`` loads that one.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any

import torch

from experts.base import Expert
from experts.spec import ExpertSpec

_PRESETS: dict[str, tuple[type[Expert], ExpertSpec]] = {}


def register_expert(cls: type[Expert], spec: ExpertSpec) -> ExpertSpec:
    """Register ``spec`` (built by ``cls``) under ``spec.name``."""
    if spec.name in _PRESETS:
        raise ValueError(f"expert preset {spec.name!r} is already registered")
    _PRESETS[spec.name] = (cls, spec)
    return spec


def list_experts(pattern: str | None = None) -> list[str]:
    """Registered preset names, sorted; ``pattern`` is an fnmatch filter (``"*-tiny"``)."""
    names = sorted(_PRESETS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _lookup(name: str) -> tuple[type[Expert], ExpertSpec]:
    if name not in _PRESETS:
        raise KeyError(f"unknown expert {name!r}; valid experts are: {', '.join(list_experts())}")
    return _PRESETS[name]


def get_spec(name: str, **overrides: Any) -> ExpertSpec:
    """The spec ``create_expert(name, **overrides)`` would build, without building anything."""
    cls, spec = _lookup(name)
    return cls.resolve_spec(spec, **overrides)


def create_expert(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | None = None,
    device: str | torch.device | None = None,
    init_seed: int | None = None,
    **overrides: Any,
) -> Expert:
    """Build the expert preset ``name``.

    Args:
        name: a preset from :func:`list_experts`.
        pretrained: load the preset's own checkpoint (hub id or path).
        checkpoint: load this checkpoint instead (hub id, local folder or file).
        device: build on this device; ``"meta"`` builds without allocating (shape checks of
            real-size presets without weights; no checkpoint is loaded then).
        init_seed: give the random init of ``torch.manual_seed(init_seed)`` followed by this
            build, whatever the global random state (which advances exactly as without the
            option, so what is built after the expert is unchanged). ``create_expert(name,
            init_seed=0)`` is the untrained expert the mini zoo's pretraining of ``name``
            started from (it seeds 0, then builds): a random-init twin that is the same in
            every run, so its maps can be cached across runs.
        **overrides: spec fields to change, e.g. ``input_size=(448, 448)``.
    """
    cls, spec = _lookup(name)
    spec = cls.resolve_spec(spec, **overrides)
    ckpt = checkpoint if checkpoint is not None else (spec.checkpoint if pretrained else None)
    spec = spec.replace(checkpoint=ckpt)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        expert = cls(spec)
        if init_seed is not None and str(device) != "meta":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                expert.load_state_dict(cls(spec).state_dict())
    if ckpt is not None and str(device) != "meta":
        expert.load_checkpoint(ckpt)
    return expert
