"""Frozen experts during a unit: which ones the feature cache serves, and their maps.

An expert the stage leaves wholly frozen runs in ``eval`` mode (so that cached and uncached runs
compute the same thing); unless the fusion drives it itself, the
:class:`~moe_vision.features.cache.FeatureCache` serves its maps (:func:`cached_experts`). Before
the unit trains, the maps of every training image are stored (:func:`store_maps`, through
:mod:`~.precompute`), and each batch then reads them (:func:`served_maps`) instead of running
the experts. :class:`~moe_vision.training.trainer.Trainer` calls these per unit.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from moe_vision.data.llava import LlavaDataset
from moe_vision.features.cache import FeatureCache
from moe_vision.features.precompute import precompute_maps
from moe_vision.training.options import TrainOptions
from moe_vision.training.units import StepTimings


def cached_experts(model: nn.Module, cache: FeatureCache | None) -> list[int]:
    """Put ``model``'s frozen experts in ``eval`` mode; return the indices of those ``cache``
    serves (frozen and not driven by the fusion; none without a cache)."""
    staged = set(model.fusion.staged_experts())
    out = []
    for i, expert in enumerate(model.experts):
        frozen = not any(p.requires_grad for p in expert.parameters())
        if frozen:
            expert.eval()
            if cache is not None and i not in staged:
                out.append(i)
    return out


def store_maps(
    cache: FeatureCache | None,
    model: nn.Module,
    dataset: Any,
    cached: list[int],
    keys: dict[int, str],
    acc: Accelerator,
    options: TrainOptions,
    timings: StepTimings,
) -> None:
    """Store the frozen experts' maps of every training image before the unit trains
    (:mod:`~.precompute`), so the data path decodes no image the cache serves.

    ``cached`` are the served experts' indices and ``keys`` their cache keys; the main process
    describes each expert in the cache; the time spent storing is added to
    ``timings.precompute_s``.
    """
    if cache is None or not cached:
        return
    for i in cached:
        if acc.is_main_process:
            cache.describe(model.experts[i], keys[i])
    if not isinstance(dataset, LlavaDataset):
        return
    mark = time.perf_counter()
    precompute_maps(
        cache,
        dataset,
        {i: (model.experts[i], keys[i]) for i in cached},
        acc.device,
        rank=acc.process_index,
        world=acc.num_processes,
        barrier=acc.wait_for_everyone,
        num_workers=options.num_workers,
        progress=options.progress_bar and acc.is_local_main_process,
    )
    timings.add("precompute_s", mark)


def served_maps(
    cache: FeatureCache | None,
    model: nn.Module,
    cached: list[int],
    keys: dict[int, str],
    batch: dict[str, Any],
    device: torch.device,
) -> dict[int, Any]:
    """The served experts' maps of ``batch`` (a ``collate`` output) by expert index, read from
    ``cache`` (computed and stored on a miss); none for a text-only batch."""
    if batch["images"] is None:
        return {}
    return {
        i: cache.maps(  # type: ignore[union-attr]
            model.experts[i],
            keys[i],
            batch["images"][i],
            batch["image_keys"],
            device,
            rows=batch["input_rows"][i] if "input_rows" in batch else None,
        )
        for i in cached
    }
