"""Shard files of the feature cache: feature maps written, memory-mapped and read back by row.

A shard is one safetensors file ``shard-<id>.safetensors`` holding ``features`` ``(N, C, H, W)``
(ragged grids zero-padded), ``mask`` ``(N, H, W)`` when any grid is ragged, and in its metadata
the ``N`` image keys (row order), the grids, the stride and the source. Writes are atomic
(temporary file + ``os.replace``) and names unique, so processes can share a folder. A shard is
read through a copy-on-write memory map (nothing is read until a row is used), and batch-of-one
maps are stacked into a batch here. :class:`moe_vision.features.cache.FeatureCache` decides what
goes into which shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from experts.spec import FeatureMap

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "BOOL": torch.bool,
    "U8": torch.uint8,
}


def mmap_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a safetensors file as views of a copy-on-write memory map (nothing is
    read until a row is used), and its metadata."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    buf = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    tensors = {}
    for name, info in header.items():
        start, end = (8 + n + o for o in info["data_offsets"])
        dtype = _DTYPES[info["dtype"]]
        tensors[name] = buf[start:end].view(dtype).reshape(info["shape"])
    return tensors, meta


@dataclass
class Shard:
    """A written shard, memory-mapped: ``features (N, C, H, W)``, optional ``mask (N, H, W)``,
    per-row grids ``(N, 2)``."""

    features: torch.Tensor
    mask: torch.Tensor | None
    grids: list[tuple[int, int]]
    stride: int
    source: str


def read_shard(path: Path) -> tuple[list[str], Shard]:
    """The image keys (row order) and the memory-mapped :class:`Shard` of the file ``path``."""
    tensors, meta = mmap_safetensors(path)
    keys = json.loads(meta["image_keys"])
    grids = [tuple(g) for g in json.loads(meta["grids"])]
    shard = Shard(
        tensors["features"],
        tensors.get("mask"),
        grids,
        int(meta.get("stride", 1)),
        meta.get("source", ""),
    )
    return keys, shard


def shard_row(shard: Shard, row: int) -> FeatureMap:
    """Row ``row`` of ``shard`` as a batch of one ``(1, C, h, w)`` cut to its own grid."""
    h, w = shard.grids[row]
    feats = shard.features[row : row + 1, :, :h, :w]
    mask = None if shard.mask is None else shard.mask[row : row + 1, :h, :w]
    return FeatureMap(feats, shard.stride, shard.source, mask)


def shard_contents(maps: Mapping[str, FeatureMap]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (on the CPU) and metadata of a shard of ``maps`` (image key -> batch-of-one
    map, in row order)."""
    keys = list(maps)
    stacked = stack_maps([maps[k] for k in keys])
    tensors = {"features": stacked.features.detach().cpu().contiguous()}
    if stacked.mask is not None:
        tensors["mask"] = stacked.mask.cpu().contiguous()
    first = maps[keys[0]]
    meta = {
        "image_keys": json.dumps(keys),
        "grids": json.dumps([list(maps[k].grid) for k in keys]),
        "stride": str(first.stride),
        "source": first.source,
    }
    return tensors, meta


def save_shard(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a new uniquely named shard into ``folder`` (which exists) atomically."""
    path = folder / f"shard-{uuid.uuid4().hex[:16]}.safetensors"
    tmp = folder / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (readers never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_device(fmap: FeatureMap, device: torch.device | str) -> FeatureMap:
    """``fmap`` (features, mask and thumbnail) moved to ``device``."""
    return dataclasses.replace(
        fmap,
        features=fmap.features.to(device),
        mask=None if fmap.mask is None else fmap.mask.to(device),
        thumbnail=None if fmap.thumbnail is None else to_device(fmap.thumbnail, device),
    )


def stack_maps(maps: Sequence[FeatureMap], device: torch.device | str | None = None) -> FeatureMap:
    """Concatenate batch-of-one maps; maps of different grids are zero-padded and masked."""
    h = max(m.grid[0] for m in maps)
    w = max(m.grid[1] for m in maps)
    ragged = any(m.grid != (h, w) for m in maps) or any(m.mask is not None for m in maps)
    feats, masks = [], []
    for m in maps:
        f = m.features.to(device)
        pad = (0, w - m.grid[1], 0, h - m.grid[0])
        feats.append(F.pad(f, pad) if any(pad) else f)
        if ragged:
            masks.append(F.pad(m.valid().to(device), pad, value=False))
    mask = torch.cat(masks) if ragged else None
    return FeatureMap(torch.cat(feats), maps[0].stride, maps[0].source, mask)
