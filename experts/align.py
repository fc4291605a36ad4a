"""Grid alignment: bring feature maps of different grids to one target grid.

Three ways, as used in the literature:

* ``"bilinear"`` interpolation (any grid to any grid; LLaVA-HR, Cambrian),
* ``"unshuffle"``: pixel-unshuffle, space to channels (Eagle's choice for SAM's 64x64 map:
  ``(B, C, 64, 64) -> (B, 4C, 32, 32)``); needs an integer factor,
* ``"avgpool"``: adaptive average pooling (downsampling only),
* ``"auto"``: average pooling when the map is larger than the target, bilinear otherwise.

Masks (ragged Pix2Struct grids): Pix2Struct lays an image's patches out row-major in the
top-left corner of a fixed grid (a square image fills 8x8 of the mini preset's 11x11) and pads
the rest. Resampling that whole grid would squeeze the image into part of the target grid, out
of register with the other experts' maps, which cover the whole target grid (channel
concatenation pairs cell ``(i, j)`` of every expert). So when a masked map is resampled and each
sample's valid cells form a top-left rectangle, that rectangle alone is resampled to the whole
target grid and the result has no mask (:func:`fill_content`). Any other mask is carried along:
pooled and interpolated features are normalised by the valid fraction, so padding never leaks
into valid cells, and a target cell is valid when any of its source cells is. A map already on
the target grid is returned as it is, mask included (sequence append keeps Pix2Struct's own
tokens and zeroes the padding).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from experts.spec import FeatureMap

AlignMethod = Literal["bilinear", "unshuffle", "avgpool", "auto"]
ALIGN_METHODS: tuple[str, ...] = ("bilinear", "unshuffle", "avgpool", "auto")


def _check(method: str) -> None:
    if method not in ALIGN_METHODS:
        raise ValueError(f"unknown alignment method {method!r}; expected one of {ALIGN_METHODS}")


def unshuffle_factor(src: tuple[int, int], dst: tuple[int, int]) -> int:
    """Integer factor ``r`` with ``src == (r * dst[0], r * dst[1])``; raises if there is none."""
    r = src[0] // dst[0] if dst[0] else 0
    if r < 1 or src[0] != r * dst[0] or src[1] != r * dst[1]:
        raise ValueError(
            f"pixel-unshuffle needs a grid that is an integer multiple of the target: "
            f"got {src} -> {dst}; use 'bilinear' or 'avgpool' instead"
        )
    return r


def aligned_channels(
    channels: int, src: tuple[int, int], dst: tuple[int, int], method: AlignMethod = "auto"
) -> int:
    """Channels after aligning a ``channels``-wide map of grid ``src`` to ``dst``."""
    _check(method)
    if method == "unshuffle":
        return channels * unshuffle_factor(src, dst) ** 2
    return channels


def content_boxes(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per sample ``(rows, cols)`` of the valid top-left rectangle of ``mask`` ``(B, H, W)``, or
    ``None`` when some sample's valid cells are empty or not such a rectangle (one host sync)."""
    rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)  # (B,) each
    h, w = mask.shape[1:]
    in_row = torch.arange(h, device=mask.device)[None, :, None] < rows[:, None, None]
    in_col = torch.arange(w, device=mask.device)[None, None, :] < cols[:, None, None]
    if not bool(torch.equal(in_row & in_col, mask) and (rows > 0).all()):
        return None
    return [(int(r), int(c)) for r, c in zip(rows.tolist(), cols.tolist())]


def _pools(method: str, src: tuple[int, int], grid: tuple[int, int]) -> bool:
    """Whether ``method`` average-pools from ``src`` to ``grid`` (``"auto"``: when ``src`` is
    at least as large in both dimensions) rather than interpolating."""
    larger = src[0] >= grid[0] and src[1] >= grid[1]
    return method == "avgpool" or (method == "auto" and larger)


def _resample(x: torch.Tensor, grid: tuple[int, int], pool: bool) -> torch.Tensor:
    if pool:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


def fill_content(
    fmap: FeatureMap, grid: tuple[int, int], boxes: list[tuple[int, int]], method: str
) -> FeatureMap:
    """Resample each sample's valid top-left ``boxes[b]`` of ``fmap`` ``(B, C, H, W)`` to the
    whole ``grid``: ``(B, C, *grid)``, no mask. ``"auto"`` pools a box larger than ``grid`` and
    interpolates a smaller one; a box equal to ``grid`` is copied as it is."""
    out = []
    for b, (rows, cols) in enumerate(boxes):
        x = fmap.features[b : b + 1, :, :rows, :cols]
        if (rows, cols) != grid:
            x = _resample(x, grid, pool=_pools(method, (rows, cols), grid))
        out.append(x)
    return FeatureMap(torch.cat(out), _stride(fmap, grid), fmap.source, None)


def _masked_resample(fmap: FeatureMap, grid: tuple[int, int], pool: bool) -> FeatureMap:
    x = fmap.features
    if fmap.mask is None:
        return FeatureMap(_resample(x, grid, pool), _stride(fmap, grid), fmap.source, None)
    m = fmap.mask.unsqueeze(1).to(x.dtype)
    if pool:
        num, den = F.adaptive_avg_pool2d(x * m, grid), F.adaptive_avg_pool2d(m, grid)
        valid = F.adaptive_max_pool2d(m, grid) > 0
    else:
        num = F.interpolate(x * m, size=grid, mode="bilinear", align_corners=False)
        den = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        valid = den > 1e-6
    y = torch.where(valid, num / den.clamp_min(1e-6), torch.zeros_like(num))
    return FeatureMap(y, _stride(fmap, grid), fmap.source, valid[:, 0])


def _stride(fmap: FeatureMap, grid: tuple[int, int]) -> int:
    return max(1, round(fmap.stride * fmap.grid[0] / grid[0]))


def interpolate(fmap: FeatureMap, grid: tuple[int, int]) -> FeatureMap:
    """Bilinear resize of ``(B, C, H, W)`` to ``(B, C, *grid)``."""
    if fmap.grid == tuple(grid):
        return fmap
    return _masked_resample(fmap, tuple(grid), pool=False)


def avg_pool(fmap: FeatureMap, grid: tuple[int, int]) -> FeatureMap:
    """Adaptive average pooling of ``(B, C, H, W)`` to ``(B, C, *grid)``."""
    if fmap.grid == tuple(grid):
        return fmap
    return _masked_resample(fmap, tuple(grid), pool=True)


def pixel_unshuffle(fmap: FeatureMap, grid: tuple[int, int]) -> FeatureMap:
    """Space to channels: ``(B, C, rH, rW) -> (B, C*r*r, H, W)`` with ``grid == (H, W)``."""
    r = unshuffle_factor(fmap.grid, tuple(grid))
    if r == 1:
        return fmap
    x = fmap.features
    if fmap.mask is not None:  # padding cells become zero channels, never their raw values
        x = torch.where(fmap.mask[:, None], x, torch.zeros_like(x))
    y = F.pixel_unshuffle(x, r)
    mask = None
    if fmap.mask is not None:
        mask = F.pixel_unshuffle(fmap.mask[:, None].float(), r).amax(1) > 0
    return FeatureMap(y, fmap.stride * r, fmap.source, mask)


def align_to_grid(
    fmap: FeatureMap, grid: tuple[int, int], method: AlignMethod = "auto"
) -> FeatureMap:
    """Align ``fmap`` to ``grid`` with ``method`` (see the module docstring)."""
    _check(method)
    grid = (int(grid[0]), int(grid[1]))
    boxes = None
    if fmap.mask is not None and method != "unshuffle" and fmap.grid != grid:
        boxes = content_boxes(fmap.mask)
    if boxes is not None:
        return fill_content(fmap, grid, boxes, method)
    if method == "auto":
        method = "avgpool" if _pools(method, fmap.grid, grid) else "bilinear"
    fn = {"bilinear": interpolate, "avgpool": avg_pool, "unshuffle": pixel_unshuffle}[method]
    return fn(fmap, grid)
