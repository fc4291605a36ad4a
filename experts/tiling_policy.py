"""The tiling policy of an expert: which ``(rows, cols)`` grid an image is cut into.

A :class:`TilingPolicy` is an *expert option* (``create_expert(name, tiling={...})``, stored as
``ExpertSpec.tiling``); the tiling itself (cutting, running the tiles as one batch, stitching)
is :mod:`experts.tiling`. This module imports nothing of the project, so the spec can hold a
policy without importing the tiling machinery.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Grid = tuple[int, int]
"""``(rows, cols)`` of tiles, or ``(height, width)`` in pixels."""


@dataclass(frozen=True)
class TilingPolicy:
    """How an expert tiles its images (see the module docstring).

    Attributes:
        grid: fixed ``(rows, cols)``; ``None`` chooses the grid per image (dynamic).
        max_tiles: most tiles per image (dynamic policies).
        min_tiles: fewest tiles per image (dynamic policies).
        grids: explicit allowed ``(rows, cols)`` grids (dynamic); ``None``: every grid with
            ``min_tiles <= rows * cols <= max_tiles``.
        thumbnail: also run the whole image at the expert's native size (one more map).
    """

    grid: Grid | None = None
    max_tiles: int = 6
    min_tiles: int = 1
    grids: tuple[Grid, ...] | None = None
    thumbnail: bool = False

    def __post_init__(self) -> None:
        def pair(v: Any, what: str) -> Grid:
            if len(v) != 2 or any(int(x) != x or int(x) < 1 for x in v):
                raise ValueError(f"TilingPolicy.{what}: expected (rows, cols) >= 1, got {v!r}")
            return (int(v[0]), int(v[1]))

        if self.grid is not None:
            object.__setattr__(self, "grid", pair(self.grid, "grid"))
        if self.grids is not None:
            grids = tuple(pair(g, "grids") for g in self.grids)
            if not grids:
                raise ValueError("TilingPolicy.grids: expected at least one (rows, cols) grid")
            object.__setattr__(self, "grids", grids)
        if not 1 <= int(self.min_tiles) <= int(self.max_tiles):
            raise ValueError(
                f"TilingPolicy: need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, "
                f"max_tiles={self.max_tiles}"
            )

    @classmethod
    def from_value(cls, value: TilingPolicy | Mapping[str, Any] | None) -> TilingPolicy | None:
        """A policy from a policy, a dict (YAML/JSON ``expert_options``) or ``None``."""
        if value is None or isinstance(value, TilingPolicy):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"tiling: expected a TilingPolicy or a dict, got {value!r}")
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - valid)
        if bad:
            raise ValueError(f"tiling: unknown options {bad}; valid options are {sorted(valid)}")
        return cls(**dict(value))

    @property
    def dynamic(self) -> bool:
        """True when the grid is chosen per image (ragged across a batch)."""
        return self.grid is None

    def allowed_grids(self) -> tuple[Grid, ...]:
        """Candidate ``(rows, cols)`` grids in the order :meth:`select_grid` visits them:
        InternVL's order (see :func:`internvl_order`)."""
        if self.grid is not None:
            return (self.grid,)
        if self.grids is not None:
            return internvl_order((c, r) for r, c in self.grids)
        lo, hi = int(self.min_tiles), int(self.max_tiles)
        return internvl_order(
            (i, j)
            for n in range(lo, hi + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if lo <= i * j <= hi
        )

    def canvas(self) -> Grid:
        """Bounding box ``(rows, cols)`` of the allowed grids: the stitched map's extent."""
        grids = self.allowed_grids()
        return max(g[0] for g in grids), max(g[1] for g in grids)

    @property
    def tile_slots(self) -> int:
        """Most tiles of one image (input slots before the thumbnail)."""
        return max(g[0] * g[1] for g in self.allowed_grids())

    @property
    def slots(self) -> int:
        """Input slots per image: tiles plus the thumbnail."""
        return self.tile_slots + int(self.thumbnail)

    def select_grid(self, height: int, width: int, tile_size: Grid) -> Grid:
        """``(rows, cols)`` for an image of ``height x width`` and tiles of ``tile_size``."""
        if self.grid is not None:
            return self.grid
        th, tw = tile_size
        aspect = width / height
        best, best_diff = self.allowed_grids()[0], float("inf")
        for r, c in self.allowed_grids():
            diff = abs(aspect - (c * tw) / (r * th))
            if diff < best_diff:
                best, best_diff = (r, c), diff
            elif diff == best_diff and height * width > 0.5 * th * tw * r * c:
                best = (r, c)
        return best


def internvl_order(ratios: Iterable[Grid]) -> tuple[Grid, ...]:
    """``(cols, rows)`` ratios to ``(rows, cols)`` grids in InternVL's visiting order.

    InternVL's ``dynamic_preprocess`` builds a Python ``set`` of ``(cols, rows)`` pairs and
    sorts it by tile count only, so grids of one count keep the set's iteration order (fixed
    by CPython's tuple hash, not by any rule). :meth:`TilingPolicy.select_grid` replaces the
    best grid by a later one on an exact tie (when the image is large enough), so this order
    decides ties between equally close grids of one count, e.g. 1 x 2 against 2 x 1 for a
    wide image with ``min_tiles=max_tiles=2``; building the same set reproduces them exactly.
    """
    ordered = sorted(set(ratios), key=lambda x: x[0] * x[1])  # InternVL: (cols, rows)
    return tuple((rows, cols) for cols, rows in ordered)
