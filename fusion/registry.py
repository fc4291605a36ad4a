"""Registries of fusion strategies and projectors: ``create_fusion`` / ``create_projector``.

A strategy module decorates its class with :func:`register_fusion`; a projector module its
builder with :func:`register_projector`. Unknown names raise with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from torch import nn

from experts.spec import ExpertSpec
from fusion.base import Fusion, FusionConfig, FusionConfigError

_FUSIONS: dict[str, type[Fusion]] = {}
_PROJECTORS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=type[Fusion])


def register_fusion(name: str) -> Callable[[F], F]:
    """Class decorator: register a :class:`Fusion` subclass under ``name``."""

    def deco(cls: F) -> F:
        if name in _FUSIONS:
            raise ValueError(f"fusion {name!r} is already registered")
        cls.name = name
        _FUSIONS[name] = cls
        return cls

    return deco


def list_fusions() -> list[str]:
    """Registered fusion strategy names, sorted."""
    return sorted(_FUSIONS)


def get_fusion_class(name: str) -> type[Fusion]:
    if name not in _FUSIONS:
        raise KeyError(f"unknown fusion {name!r}; valid fusions are: {', '.join(list_fusions())}")
    return _FUSIONS[name]


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

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        _PROJECTORS[name] = fn
        return fn

    return deco


def list_projectors() -> list[str]:
    return sorted(_PROJECTORS)


def create_projector(
    name: str, in_dim: int, out_dim: int, grid: tuple[int, int] | None = None, **options: Any
) -> nn.Module:
    """Build projector ``name`` mapping ``(B, N, in_dim)`` to ``(B, N', out_dim)``.

    The returned module has ``num_tokens(n) -> int`` giving ``N'`` for ``N`` input tokens.
    """
    if name not in _PROJECTORS:
        raise KeyError(
            f"unknown projector {name!r}; valid projectors are: {', '.join(list_projectors())}"
        )
    return _PROJECTORS[name](in_dim, out_dim, grid=grid, **options)
