"""Feature cache: frozen experts' maps computed once, read back by every later stage and run.

When a stage keeps an expert frozen (and the fusion does not drive that expert itself, see
:meth:`fusion.base.Fusion.staged_experts`), its output map for an image depends only on

* the expert: its spec's :meth:`~experts.spec.ExpertSpec.cache_key` (architecture, checkpoint,
  input size, mean/std, ...: everything preprocessing and forward depend on) **and a
  fingerprint of its current weights** -- so an expert changed by an earlier stage (Eagle's
  pre-alignment) gets a new key, and
* the image: a content hash (``image_key`` from :class:`moe_vision.data.llava.LlavaDataset`).

Every ``(expert key, image key)`` map is one safetensors file
``<root>/<expert key>/<image key[:2]>/<image key>.safetensors`` holding ``features``
``(C, H, W)`` and, for ragged grids, ``mask`` ``(H, W)``; the stride and source are metadata.
Writes are atomic (temporary file + ``os.replace``), so concurrent runs and data-parallel ranks
can share one cache folder (default ``~/.cache/moe-vision/features``). This is what makes
frozen-expert sweeps cheap (Cambrian-1 and Eagle ablations freeze the encoders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from experts.base import Expert, ExpertInputs
from experts.spec import FeatureMap

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MOE_VISION_CACHE/features`` or ``~/.cache/moe-vision/features``."""
    base = os.environ.get("MOE_VISION_CACHE") or Path.home() / ".cache" / "moe-vision"
    return Path(base) / "features"


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer of ``module`` (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def expert_cache_key(expert: Expert) -> str:
    """Key of an expert's maps: its spec's cache key plus its weights fingerprint."""
    spec = json.dumps(expert.spec.cache_key(), sort_keys=True, default=str)
    h = hashlib.sha256(spec.encode())
    h.update(weights_fingerprint(expert).encode())
    return h.hexdigest()[:32]


def _select(inputs: ExpertInputs, index: torch.Tensor) -> ExpertInputs:
    return {k: v.index_select(0, index.to(v.device)) for k, v in inputs.items()}


class FeatureCache:
    """Maps of frozen experts on disk, keyed by ``(expert key, image key)``.

    Attributes:
        root: the cache folder.
        hits / misses: maps read back / computed since construction.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, expert_key: str, image_key: str) -> Path:
        if not image_key or "/" in image_key or image_key.startswith("."):
            raise ValueError(f"feature cache: invalid image key {image_key!r} (expected a hash)")
        return self.root / expert_key / image_key[:2] / f"{image_key}.safetensors"

    def describe(self, expert: Expert, expert_key: str) -> None:
        """Write ``<root>/<expert key>/spec.json`` so a cache folder can be read by people."""
        path = self.root / expert_key / "spec.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".spec.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(expert.spec.to_dict(), indent=1, default=str))
            os.replace(tmp, path)

    def contains(self, expert_key: str, image_key: str) -> bool:
        return self._path(expert_key, image_key).is_file()

    def put(self, expert_key: str, image_key: str, fmap: FeatureMap, index: int = 0) -> None:
        """Store row ``index`` of ``fmap`` (``features (B, C, H, W)``) atomically."""
        path = self._path(expert_key, image_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": fmap.features[index].detach().contiguous().cpu()}
        if fmap.mask is not None:
            tensors["mask"] = fmap.mask[index].detach().contiguous().cpu()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"stride": str(fmap.stride), "source": fmap.source})
        os.replace(tmp, path)

    def get(self, expert_key: str, image_key: str) -> FeatureMap | None:
        """The stored map as a batch of one ``(1, C, H, W)``, or ``None`` when absent."""
        path = self._path(expert_key, image_key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats = f.get_tensor("features")[None]
            mask = f.get_tensor("mask")[None] if "mask" in f.keys() else None
        return FeatureMap(feats, int(meta.get("stride", 1)), meta.get("source", ""), mask)

    def maps(
        self,
        expert: Expert,
        expert_key: str,
        inputs: ExpertInputs,
        image_keys: Sequence[str],
        device: torch.device | str | None = None,
    ) -> FeatureMap:
        """The batch's maps: cached rows read back, missing rows computed by ``expert`` and
        stored. Returns ``features (B, C, H, W)`` on ``device`` (ragged grids padded, masked).

        Args:
            expert: the frozen expert (run only on cache misses, under ``no_grad``).
            expert_key: :func:`expert_cache_key` of ``expert``.
            inputs: the batch's inputs of this expert, ``B`` rows.
            image_keys: ``B`` image content hashes, aligned with the rows of ``inputs``.
        """
        found = [self.get(expert_key, k) for k in image_keys]
        missing = [i for i, m in enumerate(found) if m is None]
        if missing:
            index = torch.tensor(missing, dtype=torch.long)
            with torch.no_grad():
                computed = expert(_select(inputs, index))
            for j, i in enumerate(missing):
                self.put(expert_key, image_keys[i], computed, j)
                found[i] = FeatureMap(
                    computed.features[j : j + 1].detach(),
                    computed.stride,
                    computed.source,
                    None if computed.mask is None else computed.mask[j : j + 1],
                )
        self.hits += len(image_keys) - len(missing)
        self.misses += len(missing)
        return stack_maps([m for m in found if m is not None], device)


def stack_maps(maps: Sequence[FeatureMap], device: torch.device | str | None = None) -> FeatureMap:
    """Concatenate batch-of-one maps; maps of different grids are zero-padded and masked."""
    h = max(m.grid[0] for m in maps)
    w = max(m.grid[1] for m in maps)
    ragged = any(m.grid != (h, w) for m in maps) or any(m.mask is not None for m in maps)
    feats, masks = [], []
    for m in maps:
        f = m.features.to(device)
        pad = (0, w - m.grid[1], 0, h - m.grid[0])
        feats.append(F.pad(f, pad))
        if ragged:
            masks.append(F.pad(m.valid().to(device), pad, value=False))
    mask = torch.cat(masks) if ragged else None
    return FeatureMap(torch.cat(feats), maps[0].stride, maps[0].source, mask)
