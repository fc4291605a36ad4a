"""Evaluation through the feature cache: frozen experts' maps of the questions' images.

At evaluation every expert is frozen, so its map of an image depends only on the expert (its
spec and weights: :func:`~moe_vision.features.cache_keys.expert_cache_key`) and the image
bytes. In a sweep the experts are the same in many cells and every cell asks the same test
questions, so the test images' maps are computed once per expert and read back by every later
cell.

:class:`CachedMaps` serves the experts the fusion does not drive itself and whose cache
decision is not "off". An image whose map is stored for every served expert is not decoded
(see :func:`moe_vision.evaluation.evaluate.load_eval_items`); the others are decoded, their
maps computed and stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experts import FeatureMap, collate_inputs, load_image
from experts.images import ImageError, image_content_key
from moe_vision.features.cache import FeatureCache
from moe_vision.features.cache_keys import expert_cache_key


class CachedMaps:
    """The served experts' maps of evaluation images, from (and into) ``cache``.

    Args:
        model: the trained :class:`~moe_vision.model.mllm.MoEVisionModel`.
        cache: the feature cache.

    Attributes:
        served: expert index -> ``(expert, cache key)``.
    """

    def __init__(self, model: Any, cache: FeatureCache) -> None:
        self.model, self.cache = model, cache
        staged = set(model.fusion.staged_experts())
        self.served = {}
        for i, expert in enumerate(model.experts):
            if i in staged:
                continue
            key = expert_cache_key(expert)
            if cache.use_cache(expert, key, model.device) is not False:
                self.served[i] = (expert, key)
        self._keys: dict[Path, str] = {}
        self._stored = [cache.known_keys(ek) for _, ek in self.served.values()]  # before eval

    def key(self, path: Path) -> str:
        """The image's content key (hashed once per evaluation)."""
        if path not in self._keys:
            self._keys[path] = image_content_key(path)
        return self._keys[path]

    @property
    def serves_every_expert(self) -> bool:
        return len(self.served) == len(self.model.experts)

    def is_stored(self, path: Path) -> bool:
        """Whether every served expert's map of ``path`` was stored when the evaluation began
        (``False`` for a file that cannot be hashed: the validator names its problem)."""
        try:
            key = self.key(path)
        except ImageError:  # missing, not a regular file, over the size limit
            return False
        return all(key in keys for keys in self._stored)

    def maps(self, paths: Sequence[Path]) -> dict[int, FeatureMap]:
        """Expert index -> ``FeatureMap (M, C, H, W)`` of ``paths`` on the model's device,
        computing (and storing) the maps not stored yet."""
        keys = [self.key(p) for p in paths]
        out = {}
        for i, (expert, ek) in self.served.items():
            missing = [j for j, k in enumerate(keys) if not self.cache.contains(ek, k)]
            pre = self.model.preprocessors[i]
            inputs = collate_inputs([pre(load_image(paths[j])) for j in missing]) if missing else {}
            was_training = expert.training
            expert.eval()
            out[i] = self.cache.maps(  # stores what is missing, reads every row back
                expert,
                ek,
                {k: v.to(self.model.device) for k, v in inputs.items()},
                keys,
                self.model.device,
                rows=missing,
            )
            expert.train(was_training)
        return out

    def flush(self) -> None:
        """Write the maps computed here, for later evaluations."""
        self.cache.flush()


def generate_kwargs(server: CachedMaps | None, images: Sequence[Path]) -> dict[str, Any]:
    """``precomputed=`` for ``model.generate`` on a batch's images (flat, in prompt order)."""
    if server is None or not images or not server.served:
        return {}
    with torch.no_grad():
        return {"precomputed": server.maps(images)}
