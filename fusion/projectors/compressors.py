"""Token compressors between the fusion and the projector: pixel shuffle and average pooling.

High-resolution and tiled experts multiply the visual tokens; these cut them before the LLM:

* ``"pixel_shuffle"`` (space to channels; InternVL 1.5, Chen et al., arXiv 2404.16821, and
  Eagle 2, Li et al., arXiv 2501.14818): each ``r x r`` block of cells becomes one token with
  ``r*r`` times the channels, in InternVL's channel order ``(row offset, column offset,
  channel)``, so that InternVL/Eagle 2 projector weights (``mlp1``) apply unchanged::

      run (B, h*w, D) --view--> (B, h/r, r, w/r, r, D) --permute--> (B, h/r, w/r, r, r, D)
                      --reshape--> (B, (h/r)*(w/r), r*r*D)

  Eagle 2's 448-px SigLIP tile (32 x 32 patches) becomes 16 x 16 = 256 tokens with ``r = 2``.

  **Token order.** A tiled expert's stitched canvas is one run; ``token_order="canvas"`` (the
  default) gives its tokens row-major over the whole canvas. InternVL and Eagle 2 shuffle each
  tile on its own and concatenate tile after tile: ``token_order="tiles"`` with ``tile=(h, w)``
  (one tile's token grid) gives that order, so that their projector and LLM weights see tokens
  where they expect them. The two orders hold the same tokens. A run whose sides are not
  multiples of ``tile`` (another expert's map) is shuffled whole; a thumbnail is one tile, the
  same in both orders. On a dynamic canvas padding tiles (zeros, masked) stay in their canvas
  place, so the valid tiles keep InternVL's relative order. ``out_grids`` lists one grid per
  tile.
* ``"avg_pool"``: ``r x r`` average pooling (adaptive, so sides need not divide):
  ``(B, h*w, D) -> (B, ceil(h/r)*ceil(w/r), D)``.
* ``"none"``: the identity (the default; no parameters, no change to any model).

The C-Abstractor (Honeybee), which compresses with convolutions and pooling and learns, is a
projector: ``projector: cabstractor``.

A fusion's output is a sequence of runs, each on its own grid (:attr:`fusion.Fusion.token_grids`;
sequence append gives one run per map, e.g. a tiled expert's stitched canvas then its
thumbnail); each run is compressed on its own grid and the runs are concatenated again.
Compressors carry no parameters; :func:`create_compressor` checks the grids at build time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from experts.registry import Registry

Grid = tuple[int, int]


class TokenCompressor(nn.Module):
    """Base class: ``(B, N, D) -> (B, N', D')`` run by run (see the module docstring).

    Attributes:
        in_dim / out_dim: ``D`` and ``D'``.
        grids / out_grids: the runs' grids in and out (``None``: not grids, identity only).
        num_tokens: ``N'``.
        out_grid: the single run's output grid, or ``None`` with several runs.
    """

    name = "none"

    def __init__(self, in_dim: int, num_tokens: int, grids: Sequence[Grid] | None) -> None:
        super().__init__()
        self.in_dim = self.out_dim = int(in_dim)
        self.grids = None if grids is None else [(int(h), int(w)) for h, w in grids]
        if self.grids is not None and sum(h * w for h, w in self.grids) != num_tokens:
            raise ValueError(
                f"compressor {self.name!r}: token grids {self.grids} hold "
                f"{sum(h * w for h, w in self.grids)} tokens, the fusion gives {num_tokens}"
            )
        self.out_grids = self.grids
        self.num_tokens = int(num_tokens)

    @property
    def out_grid(self) -> Grid | None:
        single = self.out_grids is not None and len(self.out_grids) == 1
        return self.out_grids[0] if single else None

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """One run ``(B, h*w, D)`` on ``grid`` -> ``(B, h'*w', D')``."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N', D')``."""
        if self.grids is None or type(self).compress is TokenCompressor.compress:
            return x
        if x.dim() != 3 or x.shape[1] != sum(h * w for h, w in self.grids):
            raise ValueError(
                f"compressor {self.name!r}: expected (B, {sum(h * w for h, w in self.grids)}, "
                f"{self.in_dim}) tokens on grids {self.grids}, got {tuple(x.shape)}"
            )
        runs = torch.split(x, [h * w for h, w in self.grids], dim=1)
        return torch.cat([self.compress(r, g) for r, g in zip(runs, self.grids)], dim=1)


def _needs_grids(name: str, grids: Sequence[Grid] | None) -> list[Grid]:
    if grids is None:
        raise ValueError(
            f"compressor {name!r} needs the fusion's token grids (Fusion.token_grids); this "
            "fusion's tokens do not form grids: use compressor 'none' or a grid-forming fusion"
        )
    return list(grids)


def _check_factor(name: str, factor: int) -> int:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"compressor {name!r}: factor must be a positive int, got {factor!r}")
    return factor


TOKEN_ORDERS: tuple[str, ...] = ("canvas", "tiles")
"""Orders of :class:`PixelShuffle`'s output tokens (see the module docstring)."""


class PixelShuffle(TokenCompressor):
    """Space to channels by ``factor`` (InternVL's order): ``D' = factor**2 * D``.

    Args:
        factor: ``r``; must divide every run's grid (and ``tile``).
        token_order: ``"canvas"`` (default): row-major over each run's whole grid;
            ``"tiles"``: a run whose sides are multiples of ``tile`` is cut into tiles of
            ``tile`` tokens, each shuffled on its own, tile after tile (InternVL/Eagle 2).
        tile: ``(h, w)`` tokens of one tile (needed by ``"tiles"``), e.g. ``(32, 32)`` for
            Eagle 2's 448-px SigLIP tiles.
    """

    name = "pixel_shuffle"

    def __init__(
        self,
        in_dim: int,
        num_tokens: int,
        grids: Sequence[Grid] | None,
        factor: int = 2,
        token_order: str = "canvas",
        tile: Sequence[int] | None = None,
    ) -> None:
        super().__init__(in_dim, num_tokens, _needs_grids(self.name, grids))
        r = self.factor = _check_factor(self.name, factor)
        bad = [g for g in self.grids if g[0] % r or g[1] % r]
        if bad:
            raise ValueError(
                f"compressor {self.name!r}: factor {r} must divide every token grid; "
                f"{bad} do not (grids {self.grids}); change the fusion grid or the factor"
            )
        if token_order not in TOKEN_ORDERS:
            raise ValueError(
                f"compressor {self.name!r}: token_order must be one of {TOKEN_ORDERS}, "
                f"got {token_order!r}"
            )
        self.token_order = token_order
        self.tile = self._check_tile(tile) if token_order == "tiles" else None
        if token_order == "canvas" and tile is not None:
            raise ValueError(
                f"compressor {self.name!r}: tile={tile!r} is read only with token_order='tiles'"
            )
        self.out_grids = [g for grid in self.grids for g in self._out_grids(grid)]
        self.out_dim = self.in_dim * r * r
        self.num_tokens = sum(h * w for h, w in self.out_grids)

    def _check_tile(self, tile: Sequence[int] | None) -> Grid:
        r = self.factor
        if (
            tile is None
            or len(tile) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in tile)
            or tile[0] % r
            or tile[1] % r
        ):
            raise ValueError(
                f"compressor {self.name!r}: token_order='tiles' needs tile=(h, w), the token "
                f"grid of one tile, positive ints divisible by factor {r}; got {tile!r}"
            )
        return int(tile[0]), int(tile[1])

    def _tiles(self, grid: Grid) -> Grid | None:
        """``(rows, cols)`` of tiles a run on ``grid`` is cut into, or ``None`` (whole run)."""
        if self.tile is None or grid[0] % self.tile[0] or grid[1] % self.tile[1]:
            return None
        return grid[0] // self.tile[0], grid[1] // self.tile[1]

    def _out_grids(self, grid: Grid) -> list[Grid]:
        r, tiles = self.factor, self._tiles(grid)
        if tiles is None:
            return [(grid[0] // r, grid[1] // r)]
        return [(self.tile[0] // r, self.tile[1] // r)] * (tiles[0] * tiles[1])  # type: ignore[index]

    def _shuffle(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, _, d = x.shape
        r, (h, w) = self.factor, grid
        x = x.reshape(b, h // r, r, w // r, r, d).permute(0, 1, 3, 2, 4, 5)  # (B, h', w', r, r, D)
        return x.reshape(b, (h // r) * (w // r), r * r * d)

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        tiles = self._tiles(grid)
        if tiles is None:
            return self._shuffle(x, grid)
        b, _, d = x.shape
        (rows, cols), (th, tw) = tiles, self.tile
        x = x.reshape(b, rows, th, cols, tw, d).permute(0, 1, 3, 2, 4, 5)  # (B, R, C, th, tw, D)
        y = self._shuffle(x.reshape(b * rows * cols, th * tw, d), (th, tw))  # (B*R*C, n', r*r*D)
        return y.reshape(b, -1, y.shape[-1])  # tile after tile, row-major over tiles


class AvgPool(TokenCompressor):
    """Average pooling by ``factor``: ``(h, w) -> (ceil(h/f), ceil(w/f))``, ``D`` kept."""

    name = "avg_pool"

    def __init__(self, in_dim: int, num_tokens: int, grids: Sequence[Grid] | None, factor=2):
        super().__init__(in_dim, num_tokens, _needs_grids(self.name, grids))
        f = self.factor = _check_factor(self.name, factor)
        self.out_grids = [(math.ceil(h / f), math.ceil(w / f)) for h, w in self.grids]
        self.num_tokens = sum(h * w for h, w in self.out_grids)

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, _, d = x.shape
        out = (math.ceil(grid[0] / self.factor), math.ceil(grid[1] / self.factor))
        fmap = x.transpose(1, 2).reshape(b, d, *grid)  # (B, D, h, w)
        return F.adaptive_avg_pool2d(fmap, out).flatten(2).transpose(1, 2)  # (B, h'*w', D)


COMPRESSORS: Registry[Callable[..., TokenCompressor]] = Registry("compressor")
COMPRESSORS.register("none", TokenCompressor)
COMPRESSORS.register("pixel_shuffle", PixelShuffle)
COMPRESSORS.register("avg_pool", AvgPool)


def list_compressors() -> list[str]:
    """Registered compressor names, sorted."""
    return COMPRESSORS.list()


def create_compressor(
    name: str, in_dim: int, num_tokens: int, grids: Sequence[Grid] | None, **options: object
) -> TokenCompressor:
    """Compressor ``name`` for ``num_tokens`` fused tokens of width ``in_dim`` on ``grids``.

    Raises ``KeyError`` (unknown name, valid ones listed) or ``ValueError`` (grids missing or
    not divisible, bad options) at build time.
    """
    cls = COMPRESSORS.get(name)
    if name == "none" and options:
        raise ValueError(f"compressor 'none' takes no options, got {sorted(options)}")
    try:
        return cls(in_dim, num_tokens, grids, **options)
    except TypeError as err:
        raise ValueError(f"compressor {name!r}: bad options {sorted(options)}: {err}") from err
