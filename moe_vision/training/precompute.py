"""Store every image's map of the frozen experts before a unit trains, then train from the cache.

Without this, a frozen expert served by the :class:`~moe_vision.training.cache.FeatureCache`
still costs every epoch the decoding and preprocessing of every image (the data layer cannot
know the map is stored), and its maps are computed a batch at a time during the first epoch.
:func:`precompute_maps` walks the unit's dataset once before training:

1. the dataset is told which image keys each cached expert already holds
   (:attr:`~moe_vision.data.llava.LlavaDataset.cached_keys`), so only images without a stored
   map are decoded and preprocessed, and only for the experts that lack them;
2. the missing maps are computed (``no_grad``) and written as shards; in a data-parallel run
   each process takes every ``world``-th record and all wait for each other before reading;
3. the read-vs-compute decision of the cache (``policy="auto"``) is settled from the compute
   time just measured and the time to read a batch back; an expert whose maps are cheaper to
   compute than to read is not served (it runs every step, as before);
4. the dataset is told the complete key sets, so during training no image with a stored map is
   decoded or preprocessed for the served experts. An image that is not covered (a record that
   failed validation here and was replaced, or a file changed since) still gets its inputs and
   its map is computed on the fly.

Bad records found by the walk are reported (and, under ``on_bad_record="skip"``, skipped)
exactly as in an epoch: the walk goes through the dataset's own ``__getitem__``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from experts.base import Expert
from moe_vision.data.llava import LlavaDataset
from moe_vision.training.cache import FeatureCache

logger = logging.getLogger(__name__)

PRECOMPUTE_BATCH = 64
"""Images per forward of the walk (inference only, so larger than a training batch)."""


def precompute_maps(
    cache: FeatureCache,
    dataset: LlavaDataset,
    experts: Mapping[int, tuple[Expert, str]],
    device: torch.device | str,
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    num_workers: int = 0,
    batch_size: int = PRECOMPUTE_BATCH,
    progress: bool = False,
) -> dict[int, frozenset[str]]:
    """Store the maps of every image of ``dataset`` for ``experts`` and serve them from now on.

    Args:
        cache: the feature cache.
        dataset: the unit's training data; its ``cached_keys`` are set on return.
        experts: expert index -> ``(frozen expert, its cache key)``.
        device: where the experts run.
        rank, world: this process and the number of processes (each walks ``rank::world``).
        barrier: called after this process's shards are written (``wait_for_everyone``).
        num_workers: DataLoader workers of the walk.
        batch_size: images per forward.
        progress: show a progress bar.

    Returns:
        expert index -> image keys stored, for the experts served from the cache (the others
        are run every step).
    """
    wanted = {
        i: ek for i, ek in experts.items() if cache.use_cache(ek[0], ek[1], device) is not False
    }
    dataset.cached_keys = {i: cache.known_keys(key) for i, (_, key) in wanted.items()}
    computed = _walk(cache, dataset, wanted, device, rank, world, num_workers, batch_size, progress)
    cache.flush()
    if barrier is not None:
        barrier()
    served: dict[int, frozenset[str]] = {}
    for i, (expert, key) in wanted.items():
        keys = cache.known_keys(key)
        sample = list(itertools.islice(keys, batch_size))  # to time a read
        if sample and cache.decide(expert, key, sample, device):
            served[i] = keys
    dataset.cached_keys = served
    logger.info(
        "precomputed %s maps for experts %s; served from the cache: %s",
        computed,
        sorted(wanted),
        sorted(served) or "none",
    )
    return served


def _walk(
    cache: FeatureCache,
    dataset: LlavaDataset,
    experts: Mapping[int, tuple[Expert, str]],
    device: torch.device | str,
    rank: int,
    world: int,
    num_workers: int,
    batch_size: int,
    progress: bool,
) -> int:
    """One pass over this process's records, computing and keeping the missing maps."""
    if not experts:
        return 0
    part = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(  # own generator: the walk leaves the global RNG as it was
        part,
        batch_size=batch_size,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        generator=torch.Generator(),
    )
    computed = 0
    for batch in tqdm(loader, desc="precompute maps", disable=not progress):
        if batch["images"] is None:  # text-only batch
            continue
        for i, (expert, key) in experts.items():
            inputs = {k: v.to(device) for k, v in batch["images"][i].items()}
            rows = batch["input_rows"][i]
            computed += cache.store(expert, key, inputs, batch["image_keys"], rows)
    return computed
