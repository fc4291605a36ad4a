"""Dynamic tiling for any expert: cut a high-resolution image into tiles, run them as one batch,
stitch the tile maps into one :class:`~experts.spec.FeatureMap` on the combined grid.

LLaVA-NeXT's AnyRes (Liu et al., 2024), InternVL 1.5 (Chen et al., arXiv 2404.16821) and
Eagle 2 (Li et al., arXiv 2501.14818) cut an image into tiles of the encoder's native size on a
grid chosen from its aspect ratio, run the encoder on every tile, and add a thumbnail (the whole
image at the native size). Here a :class:`~experts.tiling_policy.TilingPolicy` is an *expert option*
(``create_expert(name, tiling={...})``, stored as ``spec.tiling``), so it applies to every
family through the family's own preprocessing::

    image (H, W) --select grid (rows, cols)--> resize to (rows*th, cols*tw) --cut--> tiles
    tile_k --expert.preprocess_image--> inputs_k        (each tile is one image to the expert)
    [inputs_1 .. inputs_n, (padding slots), thumbnail] --stack--> tiled inputs (S, ...)
    valid slots of the batch --expert.forward_map, ONE batch--> (sum n_b + B, C, h, w)
    tile maps --stitch row-major--> (B, C, R*h, Cc*w) + mask;  thumbnail map (B, C, h, w)

* **Grid choice.** A fixed ``grid=(rows, cols)``, or InternVL's rule: among the allowed grids
  (every ``(r, c)`` with ``min_tiles <= r*c <= max_tiles``, or an explicit ``grids`` list) take
  the one whose aspect ratio ``c*tw / (r*th)`` is closest to the image's. Candidates are
  visited in InternVL's order (by tile count; within one count, the iteration order of
  InternVL's Python set of ``(cols, rows)`` pairs, :func:`~experts.tiling_policy.internvl_order`),
  and on an exact tie a later candidate replaces the best one when the image has more than half
  of its pixels (``h * w > 0.5 * th * tw * r * c``): InternVL's ``find_closest_aspect_ratio``,
  tie-breaks included.
* **Inputs** keep a fixed shape so that batches stack (as Pix2Struct's padded patches do): every
  input tensor of the expert gains a slot dimension ``S = max tiles (+1 thumbnail)``; unused
  slots are zeros and are never run. ``inputs["tile_grid"]`` ``(2,)`` holds ``(rows, cols)``.
* **The stitched map** lives on a fixed canvas: the bounding box ``(R, Cc)`` of the allowed
  grids, times the tile grid ``(h, w)``. Tile ``k`` lands at block ``(k // cols, k % cols)``;
  the mask is True inside ``rows*h x cols*w`` (and inside each tile's own mask, e.g.
  Pix2Struct). A fixed grid gives a canvas without padding and no mask. Note the canvas of
  InternVL's full 1..12 set is 12 x 12 tiles: restrict ``grids`` (or ``max_tiles``) to keep
  stitched maps small.
* **The thumbnail** (``thumbnail=True``) is the expert's untiled preprocessing of the whole
  image, run in the same batch; it comes back as ``FeatureMap.thumbnail`` and fusion sees it as
  one more map (:func:`map_specs`). Unlike InternVL it is present for 1-tile images too, so that
  every image has the same maps.

The spec of a tiled expert keeps its tile ``input_size`` and tile ``grid``; :func:`map_specs`
gives the specs of the maps it presents to fusion (stitched canvas, then thumbnail). Because
``spec.tiling`` is a spec field, the feature-cache key (``ExpertSpec.cache_key``) includes it;
an untiled spec (``tiling=None``) keeps its key and takes exactly the code path it took before.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from experts.spec import ExpertInputs, ExpertSpec, FeatureMap
from experts.tiling_policy import Grid, TilingPolicy

TILE_GRID_KEY = "tile_grid"
"""Input key of the ``(rows, cols)`` tile grid of each image: ``(B, 2)`` long."""


class TiledExpert(Protocol):
    """What the tiling needs of an :class:`~experts.base.Expert` (the tiling is imported by
    ``experts.base``, so it names the expert by this protocol, not by the class)."""

    spec: ExpertSpec

    @classmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs: ...

    def forward_map(self, inputs: ExpertInputs) -> FeatureMap: ...

    def forward_layers(self, inputs: ExpertInputs, layers: Sequence[int]) -> list[FeatureMap]: ...


def cut_tiles(
    image: Image.Image, policy: TilingPolicy, tile_size: Grid
) -> tuple[list[Image.Image], Grid]:
    """Resize ``image`` to the chosen grid and cut it: tiles in row-major order and the grid."""
    th, tw = tile_size
    rows, cols = policy.select_grid(image.height, image.width, tile_size)
    big = image.resize((cols * tw, rows * th), resample=Image.Resampling.BICUBIC)
    tiles = [
        big.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
        for r in range(rows)
        for c in range(cols)
    ]
    return tiles, (rows, cols)


def tile_size_of(spec: ExpertSpec) -> Grid:
    """Pixel size of one tile: the expert's native ``input_size``."""
    return int(spec.input_size[0]), int(spec.input_size[1])


def preprocess_tiled(cls: type[TiledExpert], spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
    """One RGB image to a tiled expert's inputs (no batch dim): every input tensor of the
    expert gets a slot dimension ``S = policy.slots``; ``"tile_grid"`` is ``(rows, cols)``.

    Each tile and the thumbnail go through ``cls.preprocess_image(spec, ...)``, the expert's
    own preprocessing; the thumbnail is exactly the untiled expert's input.
    """
    policy: TilingPolicy = spec.tiling
    tiles, (rows, cols) = cut_tiles(image, policy, tile_size_of(spec))
    items = [cls.preprocess_image(spec, t) for t in tiles]
    pad = {k: torch.zeros_like(v) for k, v in items[0].items()}
    items += [pad] * (policy.tile_slots - len(items))
    if policy.thumbnail:
        items.append(cls.preprocess_image(spec, image))
    out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    if TILE_GRID_KEY in out:
        raise ValueError(f"expert {spec.name!r} already has an input named {TILE_GRID_KEY!r}")
    out[TILE_GRID_KEY] = torch.tensor([rows, cols], dtype=torch.long)
    return out


def tiled_preprocessor(cls: type[TiledExpert], spec: ExpertSpec) -> functools.partial[ExpertInputs]:
    """A picklable ``image -> tiled inputs`` callable (data-loader workers)."""
    return functools.partial(preprocess_tiled, cls, spec)


def _grids(spec: ExpertSpec, inputs: ExpertInputs) -> list[Grid]:
    policy: TilingPolicy = spec.tiling
    if TILE_GRID_KEY not in inputs:
        raise KeyError(
            f"tiled expert {spec.name!r} expects input {TILE_GRID_KEY!r} (B, 2) next to "
            f"{sorted(inputs)}; build inputs with expert.preprocess"
        )
    grid = inputs[TILE_GRID_KEY]
    if grid.device.type == "meta":
        if policy.dynamic:
            raise ValueError(
                f"tiled expert {spec.name!r}: a dynamic tiling reads each image's tile grid, "
                "which meta tensors do not hold; use a fixed grid for shape checks"
            )
        return [policy.grid] * grid.shape[0]  # type: ignore[list-item]
    allowed = set(policy.allowed_grids())
    out = [(int(r), int(c)) for r, c in grid.tolist()]
    bad = [g for g in out if g not in allowed]
    if bad:
        raise ValueError(
            f"tiled expert {spec.name!r}: tile grids {bad} are not allowed by its policy "
            f"(allowed {sorted(allowed)}); build inputs with expert.preprocess"
        )
    return out


def _stitch(fmap: FeatureMap, grids: Sequence[Grid], canvas: Grid, name: str) -> FeatureMap:
    """Tile maps ``(sum n_b, C, h, w)`` (row-major per image) to ``(B, C, R*h, Cc*w)``."""
    _, c, h, w = fmap.features.shape
    full_h, full_w = canvas[0] * h, canvas[1] * w
    padded = any(g != tuple(canvas) for g in grids) or fmap.mask is not None
    feats, masks, start = [], [], 0
    for rows, cols in grids:
        n = rows * cols
        x = fmap.features[start : start + n].reshape(rows, cols, c, h, w)
        x = x.permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)  # (C, rows*h, cols*w)
        feats.append(F.pad(x, (0, full_w - cols * w, 0, full_h - rows * h)))
        if padded:
            m = fmap.valid()[start : start + n].reshape(rows, cols, h, w)
            m = m.permute(0, 2, 1, 3).reshape(rows * h, cols * w)
            masks.append(F.pad(m, (0, full_w - cols * w, 0, full_h - rows * h), value=False))
        start += n
    mask = torch.stack(masks) if padded else None
    return FeatureMap(torch.stack(feats), fmap.stride, name, mask)


def tiled_forward(
    expert: TiledExpert, inputs: ExpertInputs, layers: Sequence[int] | None = None
) -> FeatureMap | list[FeatureMap]:
    """Run a tiled expert: every valid tile (and thumbnail) of the batch in ONE forward.

    Args:
        expert: an expert whose ``spec.tiling`` is set.
        inputs: from :func:`preprocess_tiled`, batched: each tensor ``(B, S, ...)`` plus
            ``"tile_grid"`` ``(B, 2)``.
        layers: intermediate layers, as :meth:`Expert.forward`.

    Returns:
        The stitched map ``(B, C, R*h, Cc*w)`` (mask where ragged), with ``.thumbnail``
        ``(B, C, h, w)`` when the policy asks for it; a list of such maps with ``layers``.
    """
    spec, policy = expert.spec, expert.spec.tiling
    grids = _grids(spec, inputs)
    b, slots = len(grids), policy.slots
    index = [i * slots + k for i, (r, c) in enumerate(grids) for k in range(r * c)]
    if policy.thumbnail:
        index += [i * slots + slots - 1 for i in range(b)]
    flat: dict[str, torch.Tensor] = {}
    for k, v in inputs.items():
        if k == TILE_GRID_KEY:
            continue
        if v.dim() < 2 or v.shape[:2] != (b, slots):
            raise ValueError(
                f"tiled expert {spec.name!r}: input {k!r} must be (B={b}, S={slots}, ...), "
                f"got {tuple(v.shape)}; build inputs with expert.preprocess"
            )
        flat[k] = v.flatten(0, 1).index_select(0, torch.tensor(index, device=v.device))
    outs = expert.forward_map(flat) if layers is None else expert.forward_layers(flat, layers)
    outs_list = [outs] if isinstance(outs, FeatureMap) else list(outs)
    n_tiles = sum(r * c for r, c in grids)
    stitched = []
    for out in outs_list:
        tiles = FeatureMap(
            out.features[:n_tiles],
            out.stride,
            out.source,
            None if out.mask is None else out.mask[:n_tiles],
        )
        m = _stitch(tiles, grids, policy.canvas(), out.source)
        if policy.thumbnail:
            m.thumbnail = FeatureMap(
                out.features[n_tiles:],
                out.stride,
                f"{out.source}:thumbnail",
                None if out.mask is None else out.mask[n_tiles:],
            )
        stitched.append(m)
    return stitched[0] if layers is None else stitched


def stitched_spec(spec: ExpertSpec) -> ExpertSpec:
    """Spec of a tiled expert's stitched map: the canvas grid and its pixel extent."""
    policy: TilingPolicy = spec.tiling
    rows, cols = policy.canvas()
    (gh, gw), (th, tw) = spec.grid, tile_size_of(spec)
    return spec.replace(
        grid=(rows * gh, cols * gw),
        input_size=(rows * th, cols * tw),
        variable_resolution=spec.variable_resolution or policy.dynamic,
    )


def thumbnail_spec(spec: ExpertSpec) -> ExpertSpec:
    """Spec of a tiled expert's thumbnail map: the untiled expert, named ``<name>:thumbnail``."""
    return spec.replace(name=f"{spec.name}:thumbnail", tiling=None)


def map_specs(spec: ExpertSpec) -> list[ExpertSpec]:
    """The specs of the maps an expert presents to fusion: itself when untiled; the stitched
    map, then the thumbnail when asked, when tiled."""
    if spec.tiling is None:
        return [spec]
    out = [stitched_spec(spec)]
    if spec.tiling.thumbnail:
        out.append(thumbnail_spec(spec))
    return out


def map_views(spec: ExpertSpec, fmap: FeatureMap) -> list[FeatureMap]:
    """The maps fusion sees for one expert's output (aligned with :func:`map_specs`)."""
    if spec.tiling is None or not spec.tiling.thumbnail:
        return [fmap]
    if fmap.thumbnail is None:
        raise ValueError(
            f"expert {spec.name!r} tiles with a thumbnail, but its map from {fmap.source!r} "
            "carries none (a cached map? tiled experts with thumbnails are never served from "
            "the feature cache)"
        )
    return [fmap, fmap.thumbnail]
