"""The axes of a sweep grid, as data: expert combinations, fusion choices, left-out cells.

:class:`ExpertCombos` (explicit combinations and ``k``-subsets of a pool around a base expert,
Eagle's design-space study), :class:`FusionChoice` (a fusion strategy with its options and table
column) and the ``exclude`` entries (:data:`EXCLUDE_KEYS`) are read from the sweep YAML here,
with the checks that name the valid keys; :class:`~moe_vision.sweeps.spec.SweepSpec` combines
them into cells.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

EXCLUDE_KEYS = ("experts", "fusion", "recipe", "seed", "control")


class SweepSpecError(ValueError):
    """A sweep spec that cannot be read: says which key, what it holds and what was expected
    (``sweep spec[ <file>]: <key> ...``)."""


def as_list(value: Any, what: str, item: type | tuple[type, ...] | None = None) -> list[Any]:
    """``value`` as a list (a lone string or integer becomes one item); with ``item``, every
    item must be of that type (``bool`` is not an ``int`` here)."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, int)) else value
    if not isinstance(items, (list, tuple)):
        raise SweepSpecError(
            f"sweep spec: {what} must be a value or a list, got {value!r} ({type(value).__name__})"
        )
    if item is not None:
        bad = [v for v in items if not isinstance(v, item) or (isinstance(v, bool) and item is int)]
        if bad:
            names = item.__name__ if isinstance(item, type) else "/".join(t.__name__ for t in item)
            raise SweepSpecError(f"sweep spec: {what} must hold {names} values, got {bad!r}")
    return list(items)


def check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Raise unless ``data`` is a mapping whose keys are all in ``valid`` (which are listed)."""
    if not isinstance(data, Mapping):
        raise SweepSpecError(
            f"sweep spec: {where} must be a mapping, got {data!r} ({type(data).__name__})"
        )
    bad = sorted(set(data) - set(valid))
    if bad:
        raise SweepSpecError(
            f"sweep spec: unknown keys {bad} in {where}; valid keys are {list(valid)}"
        )


@dataclass
class ExpertCombos:
    """Which expert combinations a sweep covers.

    Attributes:
        combinations: explicit combinations, e.g. ``[["clip-tiny"], ["clip-tiny", "sam-tiny"]]``.
        pool: experts to draw subsets from.
        k: subset sizes: every ``k``-subset of ``pool`` for each ``k`` (counting the base
            expert when one is set). Empty with a pool: every size from 1 to ``len(pool)``.
        base: an expert every combination includes, in first position (Eagle's CLIP base);
            its grid is the fusion strategies' default target grid.
    """

    combinations: list[list[str]] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    base: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Sequence[Any]) -> ExpertCombos:
        """From YAML: a mapping with the fields above, or a plain list of combinations."""
        if isinstance(data, (list, tuple)):
            data = {"combinations": data}
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "experts")
        combos = [
            as_list(c, "experts.combinations[i]", str)
            for c in as_list(data.get("combinations"), "experts.combinations")
        ]
        base = data.get("base")
        if base is not None and not isinstance(base, str):
            raise SweepSpecError(f"sweep spec: experts.base must be an expert name, got {base!r}")
        return cls(
            combinations=combos,
            pool=as_list(data.get("pool"), "experts.pool", str),
            k=as_list(data.get("k"), "experts.k", int),
            base=base,
        )

    def expand(self) -> list[tuple[str, ...]]:
        """All combinations, explicit ones first, base first in each, duplicates removed."""
        combos: list[tuple[str, ...]] = [tuple(c) for c in self.combinations]
        pool = [e for e in self.pool if e != self.base]
        offset = 1 if self.base else 0
        if self.k:
            sizes = self.k
        else:  # every size, from the base alone (or one expert) to the whole pool
            sizes = list(range(1, len(pool) + offset + 1)) if self.pool else []
        for size in sizes:
            if size - offset < 0 or size - offset > len(pool):
                raise ValueError(
                    f"sweep spec: experts.k={size} is impossible with pool {self.pool}"
                    + (f" and base {self.base!r}" if self.base else "")
                    + f"; expected {offset}..{len(pool) + offset}"
                )
            combos += list(itertools.combinations(pool, size - offset))
        if self.base:
            combos = [(self.base, *[e for e in c if e != self.base]) for c in combos]
        out = list(dict.fromkeys(c for c in combos if c))
        for c in out:
            if len(set(c)) != len(c):
                raise ValueError(f"sweep spec: expert combination {list(c)} repeats an expert")
        if not out:
            raise ValueError(
                "sweep spec: no expert combinations; give experts.combinations or experts.pool"
            )
        return out


@dataclass
class FusionChoice:
    """One fusion strategy of the sweep with its options.

    Attributes:
        name: registered fusion strategy (``fusion.list_fusions()``).
        options: the strategy's config options (merged over ``model.fusion_options``).
        label: column name in the tables (default: ``name``); lets one strategy appear twice
            with different options.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @classmethod
    def from_dict(cls, data: str | Mapping[str, Any]) -> FusionChoice:
        if isinstance(data, str):
            return cls(name=data)
        check_keys(data, ["name", "options", "label"], "fusions[i]")
        if "name" not in data:
            raise SweepSpecError(f"sweep spec: fusion entry {dict(data)} has no 'name'")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise SweepSpecError(
                f"sweep spec: fusion {data['name']!r}: options must be a mapping, got {options!r}"
            )
        return cls(str(data["name"]), dict(options), data.get("label"))

    @property
    def column(self) -> str:
        return self.label or self.name


def exclusion(entry: Any) -> dict[str, Any]:
    """An ``exclude`` entry, checked: a mapping of some of experts, fusion, recipe, seed and
    control (a control kind: the entry then matches only that control's cells)."""
    if not isinstance(entry, Mapping) or not entry:
        raise SweepSpecError(
            f"sweep spec: an exclude entry must be a non-empty mapping, got {entry!r}"
        )
    check_keys(entry, list(EXCLUDE_KEYS), "an exclude entry")
    out = dict(entry)
    if "experts" in out:
        out["experts"] = as_list(out["experts"], "exclude.experts", str)
    return out
