"""Registries of fusion strategies and projectors: ``create_fusion`` / ``create_projector``.

A strategy module decorates its class with :func:`register_fusion`; a projector module its
builder with :func:`register_projector`. Both tables are :class:`experts.registry.Registry`
instances; unknown names raise with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from torch import nn

from experts.registry import Registry
from experts.spec import ExpertSpec
from fusion.base import Fusion, FusionConfig, FusionConfigError

FUSIONS: Registry[type[Fusion]] = Registry("fusion")
PROJECTORS: Registry[Callable[..., nn.Module]] = Registry("projector")

F = TypeVar("F", bound=type[Fusion])


def register_fusion(name: str) -> Callable[[F], F]:
    """Class decorator: register a :class:`Fusion` subclass under ``name``."""

    def deco(cls: F) -> F:
        FUSIONS.register(name, cls)
        cls.name = name
        return cls

    return deco


def list_fusions() -> list[str]:
    """Registered fusion strategy names, sorted."""
    return FUSIONS.list()


def get_fusion_class(name: str) -> type[Fusion]:
    """The class registered as ``name``; unknown names raise with the valid ones listed."""
    return FUSIONS.get(name)


def make_fusion_config(name: str, **options: Any) -> FusionConfig:
    """The strategy's config dataclass from keyword options; unknown options raise."""
    cls = get_fusion_class(name)
    valid = {f.name for f in fields(cls.config_class)}
    bad = sorted(set(options) - valid)
    if bad:
        raise FusionConfigError(
            f"fusion {name!r} has no options {bad}; its options are {sorted(valid)}"
        )
    if "grid" in options and options["grid"] is not None:
        options["grid"] = tuple(int(v) for v in options["grid"])
    return cls.config_class(**options)


def create_fusion(name: str, specs: Sequence[ExpertSpec], **options: Any) -> Fusion:
    """Build fusion strategy ``name`` for experts ``specs`` with its config ``options``."""
    cls = get_fusion_class(name)
    return cls(list(specs), make_fusion_config(name, **options))


def register_projector(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a projector builder ``(in_dim, out_dim, grid=None, **kw) -> Module``."""

    return PROJECTORS.register(name)


def list_projectors() -> list[str]:
    """Registered projector names, sorted."""
    return PROJECTORS.list()


def create_projector(
    name: str, in_dim: int, out_dim: int, grid: tuple[int, int] | None = None, **options: Any
) -> nn.Module:
    """Build projector ``name`` mapping ``(B, N, in_dim)`` to ``(B, N', out_dim)``.

    The returned module has ``num_tokens(n) -> int`` giving ``N'`` for ``N`` input tokens.
    """
    return PROJECTORS.create(name, in_dim, out_dim, grid=grid, **options)
