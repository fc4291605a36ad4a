"""Store every image's map of the frozen experts before a unit trains, then train from the cache.

Without this, a frozen expert served by the :class:`~moe_vision.features.cache.FeatureCache`
still costs every epoch the decoding and preprocessing of every image (the data layer cannot
know the map is stored), and its maps are computed a batch at a time during the first epoch.
Maps are keyed by image, not by record, so :func:`precompute_maps` works on the *distinct*
images of the unit's dataset (LLaVA-style data uses an image in many records: 1M records over a
few hundred images decode a few hundred images, not a million):

1. the records are scanned once for the image paths they name (parsed, not validated or
   tokenised; in DataLoader workers, :func:`image_files`); the result is kept for the dataset,
   so a later unit on the same data does not scan again;
2. each distinct path is hashed once (:func:`experts.images.image_content_key`, remembered per
   path, size and modification time) and the paths are deduplicated by content key; in a
   data-parallel run each process takes every ``world``-th path and all wait for each other
   before reading;
3. only images without a stored map are decoded, once each, and preprocessed for the experts
   that lack their map; the maps are computed (``no_grad``) and written as shards. When every
   image's map is stored already (a later stage, a later run), nothing is decoded at all;
4. the read-vs-compute decision of the cache (``policy="auto"``) is settled from the compute
   time just measured and the time to read a batch back; an expert whose maps are cheaper to
   compute than to read is not served (it runs every step, as before);
5. the dataset is told the complete key sets
   (:attr:`~moe_vision.data.llava.LlavaDataset.cached_keys`), so during training no image with
   a stored map is decoded or preprocessed for the served experts. An image that is not covered
   (a file changed since) still gets its inputs and its map is computed on the fly.

An image that cannot be used (missing, not a regular file, corrupt, too large) is reported
through the dataset's own ``__getitem__`` on the first record that names it, so under
``on_bad_record="error"`` the run stops before training, naming the record, and under
``"skip"`` the record is logged and skipped as in an epoch. Records that are bad in other ways
(malformed JSON, a bad conversation, over-long) are found when training reaches them, as they
would be without a cache (``moe-vision data check`` finds them all up front).
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from experts.base import Expert, collate_inputs
from experts.images import ImageError, image_content_key
from experts.spec import ExpertInputs
from moe_vision.data.llava import LlavaDataset
from moe_vision.data.records import RecordProblem, record_images
from moe_vision.data.validation import resolve_image_path
from moe_vision.features.cache import FeatureCache

logger = logging.getLogger(__name__)

PRECOMPUTE_BATCH = 64
"""Images per forward of the walk (inference only, so larger than a training batch)."""

SCAN_CHUNK = 8192
"""Records per work item of the scan for image paths."""

HASH_THREADS = 8
"""Threads hashing image files (file reads and sha256 release the GIL)."""

_FILES: weakref.WeakKeyDictionary[LlavaDataset, dict[Path, int]] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------- scan
class _RecordChunks(Dataset):
    """Chunk ``c`` of a dataset's records -> ``{(file id, image name): first record}``."""

    def __init__(self, dataset: LlavaDataset, chunk: int) -> None:
        self.index, self.chunk = dataset.index, chunk

    def __len__(self) -> int:
        return -(-len(self.index) // self.chunk)

    def __getitem__(self, c: int) -> dict[tuple[int, str], int]:
        found: dict[tuple[int, str], int] = {}
        file_id = self.index.file_id
        for i in range(c * self.chunk, min((c + 1) * self.chunk, len(self.index))):
            try:
                record = self.index.read(i)
                names = record_images(record) if isinstance(record, dict) else []
            except RecordProblem:
                continue  # a bad record: reported when training reaches it
            for name in names:
                found.setdefault((int(file_id[i]), name), i)
        return found


def image_files(
    dataset: LlavaDataset, num_workers: int = 0, progress: bool = False
) -> dict[Path, int]:
    """Every distinct image file the records of ``dataset`` name -> the first record naming it.

    Records are parsed, not validated (a path that leaves the image root is left out: its record
    is refused when it is read). Computed once per dataset object and kept while it lives.
    """
    known = _FILES.get(dataset)
    if known is not None:
        return known
    chunks = _RecordChunks(dataset, SCAN_CHUNK)
    loader = DataLoader(
        chunks,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator(),  # the scan leaves the global RNG as it was
    )
    names: dict[tuple[int, str], int] = {}
    for part in tqdm(loader, desc="scan records for images", disable=not progress):
        for k, i in part.items():
            if k not in names or i < names[k]:
                names[k] = i
    files: dict[Path, int] = {}
    allow = dataset.validator.allow_outside_root
    for (f, name), i in sorted(names.items(), key=lambda kv: kv[1]):
        try:
            path = resolve_image_path(dataset.roots[f], name, allow)
        except RecordProblem:
            continue
        files.setdefault(path, i)
    _FILES[dataset] = files
    return files


def _content_key(path: Path) -> str | None:
    try:
        return image_content_key(path)
    except (ImageError, OSError):
        return None  # reported through the dataset (see the module docstring)


# ---------------------------------------------------------------------------- decode
@dataclass
class _Decoded:
    """One image decoded and preprocessed for the experts that lack its map (``inputs``:
    expert index -> inputs without batch dim), or the problem that stopped it."""

    key: str
    path: Path
    inputs: dict[int, ExpertInputs]
    problem: str | None = None


class _Images(Dataset):
    """Image ``k`` of ``items`` (path, key, experts that need it) decoded and preprocessed."""

    def __init__(
        self, dataset: LlavaDataset, items: Sequence[tuple[Path, str, tuple[int, ...]]]
    ) -> None:
        self.validator, self.preprocessors, self.items = (
            dataset.validator,
            dataset.preprocessors,
            items,
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> _Decoded:
        path, key, needs = self.items[k]
        try:
            image = self.validator.open(path)
            return _Decoded(key, path, {e: self.preprocessors[e](image) for e in needs})
        except (RecordProblem, ImageError) as err:
            return _Decoded(key, path, {}, str(err))


def _as_list(batch: list[_Decoded]) -> list[_Decoded]:
    return batch


# ---------------------------------------------------------------------------- the walk
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
        rank, world: this process and the number of processes (each takes every
            ``world``-th distinct image, from ``rank``).
        barrier: called after this process's shards are written (``wait_for_everyone``).
        num_workers: DataLoader workers of the scan and of the decoding.
        batch_size: images per forward.
        progress: show progress bars.

    Returns:
        expert index -> image keys stored, for the experts served from the cache (the others
        are run every step).
    """
    wanted = {
        i: ek for i, ek in experts.items() if cache.use_cache(ek[0], ek[1], device) is not False
    }
    computed = 0
    if wanted:
        computed = _walk(
            cache, dataset, wanted, device, rank, world, num_workers, batch_size, progress
        )
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
    """Hash this process's share of the distinct images, decode those without a stored map
    once each, compute and keep their maps; returns how many maps were computed."""
    files = image_files(dataset, num_workers, progress)
    paths = sorted(files)[rank::world]
    threads = max(1, min(HASH_THREADS, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(threads) as pool:
        keys = list(pool.map(_content_key, paths))
    known = {i: cache.known_keys(key) for i, (_, key) in experts.items()}
    todo: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # one entry per distinct content
    bad = [p for p, k in zip(paths, keys) if k is None]
    for path, key in zip(paths, keys):
        if key is None or key in todo:
            continue
        needs = tuple(i for i in experts if key not in known[i])
        if needs:
            todo[key] = (path, key, needs)
    logger.info(
        "precompute: %d records name %d image files (%d here, %d distinct contents); %d images "
        "lack a stored map",
        len(dataset),
        len(files),
        len(paths),
        len({k for k in keys if k is not None}),
        len(todo),
    )
    computed = 0
    if todo:
        loader = DataLoader(
            _Images(dataset, list(todo.values())),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_as_list,
            generator=torch.Generator(),  # the walk leaves the global RNG as it was
        )
        for batch in tqdm(loader, desc="precompute maps", disable=not progress):
            bad += [d.path for d in batch if d.problem is not None]
            for i, (expert, key) in experts.items():
                rows = [d for d in batch if i in d.inputs]
                if rows:
                    inputs = collate_inputs([d.inputs[i] for d in rows])
                    inputs = {k: v.to(device) for k, v in inputs.items()}
                    computed += cache.store(expert, key, inputs, [d.key for d in rows])
    for path in bad:
        dataset[files[path]]  # names the record: raises under "error", skips under "skip"
    return computed
