"""Registries by name (timm's ``_registry.py``): the generic :class:`Registry` and the experts'.

:class:`Registry` is the one name -> entry table behind every registry of the project (experts,
fusions, projectors, compressors, token reducers, LLM presets, training recipes, the mini zoo's
objectives and pretraining recipes, sweep executors, bench sections). It lives here, on the
lowest floor, because ``experts`` imports nothing from ``fusion`` or ``moe_vision``.

The expert presets: a family module registers its presets with :func:`register_expert`: a
preset is an :class:`~experts.spec.ExpertSpec` plus the :class:`~experts.base.Expert` subclass
that builds it. Adding a family is one new module plus its registration in
``experts/__init__.py``; nothing else changes, and nothing branches on an expert's name.

Weights are a choice independent of the architecture (open_clip's lesson):
``create_expert("clip-vit-l-336")`` is the real architecture, randomly initialised;
``pretrained=True`` loads the preset's checkpoint (hub id, through the library's own loader);
``checkpoint="path/or/hub-id"`` loads that one.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

import torch

from experts.base import Expert
from experts.spec import ExpertSpec

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry for one kind of component: register, list, get, create.

    Args:
        kind: what an entry is, in the singular (``"expert"``); errors name it.
        plural: its plural (default ``kind + "s"``).
        ordered: :meth:`list` keeps registration order instead of sorting.

    Iterating yields the names in registration order; ``name in registry`` and ``len`` work as
    for a dict. An unknown name raises ``KeyError("unknown expert 'x'; valid experts are: a, b")``.
    """

    def __init__(self, kind: str, *, plural: str | None = None, ordered: bool = False) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.ordered = ordered
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: Any = None) -> Any:
        """Register ``entry`` under ``name`` (returns it); without ``entry``, a decorator.

        A name registered twice raises ``ValueError``.
        """
        if entry is None:
            return lambda obj: self.register(name, obj)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def list(self, pattern: str | None = None) -> builtins.list[str]:
        """Registered names (sorted, or in registration order when ``ordered``); ``pattern`` is
        an fnmatch filter (``"*-tiny"``)."""
        names = builtins.list(self._entries) if self.ordered else sorted(self._entries)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name raises listing the valid ones."""
        if name not in self._entries:
            valid = ", ".join(self.list())
            raise KeyError(f"unknown {self.kind} {name!r}; valid {self.plural} are: {valid}")
        return self._entries[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry ``name`` (a class or builder) with ``args`` and ``kwargs``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def items(self) -> builtins.list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order."""
        return builtins.list(self._entries.items())

    def values(self) -> builtins.list[T]:
        """The entries in registration order."""
        return builtins.list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(builtins.list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"


EXPERTS: Registry[tuple[type[Expert], ExpertSpec]] = Registry("expert")
"""Preset name -> (the Expert subclass that builds it, its spec)."""


def register_expert(cls: type[Expert], spec: ExpertSpec) -> ExpertSpec:
    """Register ``spec`` (built by ``cls``) under ``spec.name``."""
    if spec.name in EXPERTS:
        raise ValueError(f"expert preset {spec.name!r} is already registered")
    EXPERTS.register(spec.name, (cls, spec))
    return spec


def list_experts(pattern: str | None = None) -> list[str]:
    """Registered preset names, sorted; ``pattern`` is an fnmatch filter (``"*-tiny"``)."""
    return EXPERTS.list(pattern)


def get_spec(name: str, **overrides: Any) -> ExpertSpec:
    """The spec ``create_expert(name, **overrides)`` would build, without building anything."""
    cls, spec = EXPERTS.get(name)
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
    cls, spec = EXPERTS.get(name)
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
