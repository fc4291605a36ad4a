"""Which expert computed a feature map: the key under which the feature cache files its maps.

A frozen expert's map of an image depends on the expert's spec (architecture, checkpoint, input
size, mean/std, ...: :meth:`~experts.spec.ExpertSpec.cache_key`) and on its current weights. The
key hashes both, plus the scaling of any LoRA adapters, so an expert changed by an earlier stage
(Eagle's pre-alignment, a LoRA stage) gets a new key and never reads stale maps. Used by
:class:`moe_vision.features.cache.FeatureCache` (``<root>/<expert key>/``).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from experts.base import Expert


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
    h.update(weights_fingerprint(expert).encode())  # LoRA adapter tensors included
    from moe_vision.model.adapters import adapter_fingerprint  # lora imports recipes

    h.update(adapter_fingerprint(expert).encode())  # their scaling; "" (no change) without LoRA
    return h.hexdigest()[:32]
