"""The frozen teachers of a distillation and their maps, served from the feature cache.

Each teacher runs at its own resolution with its own preprocessing. Its map of an image is
computed once and kept in the feature cache (:class:`moe_vision.features.cache.FeatureCache`,
keyed by the teacher's spec + weights and by the image's content hash), so a second run on the
same images (another student, balancing, a resumed run, :func:`fill_cache` beforehand) costs the
student only: a batch whose maps are all stored is not even preprocessed for the teachers.

A ragged teacher map (Pix2Struct: the image's patches in the top-left corner of its fixed grid)
is resampled so that its content covers the whole grid (:func:`experts.align.fill_content`),
i.e. the target is in register with the student's map, which covers the whole image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

import experts
from experts import Expert, FeatureMap
from experts.align import content_boxes, fill_content
from moe_vision.features.cache import FeatureCache
from moe_vision.features.cache_keys import expert_cache_key


def image_key(image: Image.Image) -> str:
    """Content hash of a PIL image (mode, size and pixels): the cache's image key."""
    h = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


def whole_grid(fmap: FeatureMap, grid: tuple[int, int]) -> FeatureMap:
    """``fmap`` on ``grid`` covering the whole image: a ragged map's valid top-left rectangle
    is resampled to the whole grid (no mask); other masks are kept."""
    if fmap.mask is None:
        return fmap if fmap.grid == tuple(grid) else experts.align_to_grid(fmap, grid)
    boxes = content_boxes(fmap.mask)
    if boxes is None:
        return fmap
    return fill_content(fmap, grid, boxes, "auto")


class Teachers:
    """Frozen teacher experts; :meth:`maps` gives their maps of a batch of images.

    Args:
        names: teacher presets.
        pretrained: load each preset's own weights (False only in tests).
        cache: feature-cache folder, ``None`` for the default (``~/.cache/moe-vision/
            features``) or ``"off"`` to run the teachers on every batch.
    """

    def __init__(
        self, names: Sequence[str], pretrained: bool = True, cache: str | Path | None = None
    ) -> None:
        self.names = list(names)
        self.experts: dict[str, Expert] = {}
        for name in self.names:
            teacher = experts.create_expert(name, pretrained=pretrained).eval()
            self.experts[name] = teacher.requires_grad_(False)
        self.grids = {n: tuple(e.spec.grid) for n, e in self.experts.items()}
        self.cache = None if cache == "off" else FeatureCache(cache, policy="always")
        self.keys = {n: expert_cache_key(e) for n, e in self.experts.items()}
        if self.cache is not None:
            for n, e in self.experts.items():
                self.cache.describe(e, self.keys[n])

    @torch.no_grad()
    def maps(self, images: Sequence[Image.Image]) -> dict[str, FeatureMap]:
        """Each teacher's map of ``images``: ``(B, C_t, H_t, W_t)`` on its own grid, content
        over the whole grid (:func:`whole_grid`)."""
        out = {}
        image_keys = [image_key(im) for im in images] if self.cache is not None else []
        for name, teacher in self.experts.items():
            if self.cache is None:
                fmap = teacher(teacher.preprocess(list(images)))
            else:
                known = self.cache.known_keys(self.keys[name])
                rows = [i for i, k in enumerate(image_keys) if k not in known]
                inputs = teacher.preprocess([images[i] for i in rows]) if rows else {}
                fmap = self.cache.maps(teacher, self.keys[name], inputs, image_keys, rows=rows)
            out[name] = whole_grid(fmap, self.grids[name])
        return out

    def flush(self) -> None:
        """Write the maps computed so far into the cache folder."""
        if self.cache is not None:
            self.cache.flush()
