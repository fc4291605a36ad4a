"""Feature cache: frozen experts' maps computed once, read back by every later stage and run.

When a stage keeps an expert frozen (and the fusion does not drive that expert itself, see
:meth:`fusion.base.Fusion.staged_experts`), its output map for an image depends only on

* the expert: its spec's :meth:`~experts.spec.ExpertSpec.cache_key` (architecture, checkpoint,
  input size, mean/std, ...: everything preprocessing and forward depend on) **and a
  fingerprint of its current weights** -- so an expert changed by an earlier stage (Eagle's
  pre-alignment) gets a new key, and
* the image: a content hash (``image_keys`` of :class:`moe_vision.data.llava.LlavaDataset`).

Storage: one safetensors file per *shard* of a dataset and expert,
``<root>/<expert key>/shard-<id>.safetensors``, holding ``features`` ``(N, C, H, W)`` (ragged
grids zero-padded), ``mask`` ``(N, H, W)`` when any grid is ragged, and in its metadata the
``N`` image keys (row order), the grids, the stride and the source. Maps computed during a run
are kept in memory and written as one shard when ``shard_bytes`` is reached or at
:meth:`FeatureCache.flush` (the trainer flushes at every unit end). Shards are read through a
memory map (``numpy.memmap`` of the file, viewed as tensors without copying), so a batch read is
one gather of ``B`` rows. Writes are atomic (temporary file + ``os.replace``) and file names are
unique, so concurrent runs and data-parallel ranks can share one cache folder (default
``~/.cache/moe-vision/features``). The shard files are written and read in
:mod:`.shards`, the expert keys computed in :mod:`.cache_keys`.

**Is the cache worth it?** A cache that costs more than it saves is not used. With
``policy="auto"`` (default) the cache times, per expert, computing a map (its forward on the
batch's misses) and reading one back (gather + copy to the device, on hits); once both are
known it keeps the cache only when a read is cheaper than a computation, says so once in the
log, and records the decision in ``<root>/<expert key>/decision-<device>.json`` so later runs
(and a resumed run) follow it without measuring. With tiny experts on a CPU the two are close;
with real-size experts (a CLIP ViT-L/336 forward is ~0.4 TFLOP per image) reading wins by orders
of magnitude (``moe-vision bench``, section ``feature_cache``). ``policy="always"`` keeps the
cache whatever it costs. This is what makes frozen-expert sweeps cheap (Cambrian-1 and Eagle
ablations freeze the encoders).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from experts.base import Expert
from experts.spec import ExpertInputs, FeatureMap
from moe_vision.features.shards import (
    Shard,
    atomic_text,
    read_shard,
    save_shard,
    shard_contents,
    shard_row,
    stack_maps,
    to_device,
)

logger = logging.getLogger(__name__)

CachePolicy = Literal["auto", "always"]
SHARD_BYTES = 256 * 2**20
"""Default size at which the maps computed in a run are written out as one shard."""


def default_cache_dir() -> Path:
    """``$MOE_VISION_CACHE/features`` or ``~/.cache/moe-vision/features``."""
    base = os.environ.get("MOE_VISION_CACHE") or Path.home() / ".cache" / "moe-vision"
    return Path(base) / "features"


def _select(inputs: ExpertInputs, index: torch.Tensor) -> ExpertInputs:
    return {k: v.index_select(0, index.to(v.device)) for k, v in inputs.items()}


@dataclass
class _Costs:
    """Seconds and rows timed per expert key (compute: forward on misses, the first batch left
    out as warm-up; read: batches that were all hits)."""

    warmed_up: bool = False
    compute_s: float = 0.0
    compute_rows: int = 0
    read_s: float = 0.0
    read_rows: int = 0
    decided: bool | None = None  # None: not yet; True: use the cache; False: bypass


class FeatureCache:
    """Maps of frozen experts on disk, keyed by ``(expert key, image key)`` (module docstring).

    Args:
        root: the cache folder (default :func:`default_cache_dir`).
        policy: ``"auto"`` (use the cache only where reading beats computing) or ``"always"``.
        shard_bytes: in-memory maps written out as one shard at this size.

    Attributes:
        hits / misses: maps read back / computed for the cache since construction.
        bypassed: maps computed because the cache was judged not worth it.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        policy: CachePolicy = "auto",
        shard_bytes: int = SHARD_BYTES,
    ) -> None:
        if policy not in ("auto", "always"):
            raise ValueError(f"feature cache policy must be 'auto' or 'always', got {policy!r}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self.shard_bytes = int(shard_bytes)
        self.hits = self.misses = self.bypassed = 0
        self._index: dict[str, dict[str, tuple[int, int]]] = {}  # key -> image -> (shard, row)
        self._shards: dict[str, list[Shard]] = {}
        self._seen_files: dict[str, set[str]] = {}
        self._pending: dict[str, dict[str, FeatureMap]] = {}  # computed, not written yet
        self._pending_bytes: dict[str, int] = {}
        self._costs: dict[str, _Costs] = {}

    # -------------------------------------------------------------- storage
    def folder(self, expert_key: str) -> Path:
        if not expert_key or "/" in expert_key or expert_key.startswith("."):
            raise ValueError(f"feature cache: invalid expert key {expert_key!r} (expected a hash)")
        return self.root / expert_key

    def describe(self, expert: Expert, expert_key: str) -> None:
        """Write ``<root>/<expert key>/spec.json`` so a cache folder can be read by people."""
        path = self.folder(expert_key) / "spec.json"
        if not path.exists():
            atomic_text(path, json.dumps(expert.spec.to_dict(), indent=1, default=str))

    def _scan(self, expert_key: str) -> None:
        """Index shards of ``expert_key`` written since the last scan (by any process)."""
        index = self._index.setdefault(expert_key, {})
        shards = self._shards.setdefault(expert_key, [])
        seen = self._seen_files.setdefault(expert_key, set())
        folder = self.folder(expert_key)
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("shard-*.safetensors")):
            if path.name in seen:
                continue
            seen.add(path.name)
            keys, shard = read_shard(path)
            shards.append(shard)
            for row, key in enumerate(keys):
                index.setdefault(key, (len(shards) - 1, row))

    def flush(self) -> list[Path]:
        """Write the maps computed so far as one shard per expert key; returns the files."""
        written = []
        for expert_key, maps in self._pending.items():
            if maps:
                written.append(self._write_shard(expert_key, maps))
        self._pending, self._pending_bytes = {}, {}
        return written

    def _write_shard(self, expert_key: str, maps: dict[str, FeatureMap]) -> Path:
        tensors, meta = shard_contents(maps)
        folder = self.folder(expert_key)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        path = save_shard(folder, tensors, meta)
        logger.debug(
            "feature cache: wrote %s (%d maps, %.2fs)", path, len(maps), time.perf_counter() - start
        )
        return path

    def contains(self, expert_key: str, image_key: str) -> bool:
        """Whether the map of ``image_key`` is stored (written or pending)."""
        if image_key in self._pending.get(expert_key, {}):
            return True
        self._scan(expert_key)
        return image_key in self._index.get(expert_key, {})

    def get(self, expert_key: str, image_key: str, scan: bool = True) -> FeatureMap | None:
        """The stored map as a batch of one ``(1, C, H, W)``, or ``None`` when absent.

        ``scan``: look for shards written by other processes when the key is not indexed yet.
        """
        if not image_key or "/" in image_key:
            raise ValueError(f"feature cache: invalid image key {image_key!r} (expected a hash)")
        pending = self._pending.get(expert_key, {})
        if image_key in pending:
            return pending[image_key]
        where = self._index.get(expert_key, {}).get(image_key)
        if where is None and scan:
            self._scan(expert_key)
            where = self._index[expert_key].get(image_key)
        if where is None:
            return None
        shard = self._shards[expert_key][where[0]]
        return shard_row(shard, where[1])

    def put(self, expert_key: str, image_key: str, fmap: FeatureMap, index: int = 0) -> None:
        """Keep row ``index`` of ``fmap`` (``features (B, C, H, W)``) for the next shard."""
        if not image_key or "/" in image_key:
            raise ValueError(f"feature cache: invalid image key {image_key!r} (expected a hash)")
        valid = None if fmap.mask is None else fmap.mask[index : index + 1].cpu()
        row = FeatureMap(
            fmap.features[index : index + 1].detach().cpu(), fmap.stride, fmap.source, valid
        )
        pending = self._pending.setdefault(expert_key, {})
        if image_key not in pending:
            size = row.features.numel() * row.features.element_size()
            self._pending_bytes[expert_key] = self._pending_bytes.get(expert_key, 0) + size
        pending[image_key] = row
        if self._pending_bytes[expert_key] >= self.shard_bytes:
            self._write_shard(expert_key, pending)
            self._pending[expert_key], self._pending_bytes[expert_key] = {}, 0

    def known_keys(self, expert_key: str) -> frozenset[str]:
        """The image keys whose map is stored for ``expert_key`` (written by any process, or
        pending here)."""
        self._scan(expert_key)
        return frozenset(self._index.get(expert_key, {})) | frozenset(
            self._pending.get(expert_key, {})
        )

    def store(
        self,
        expert: Expert,
        expert_key: str,
        inputs: ExpertInputs,
        image_keys: Sequence[str],
        rows: Sequence[int] | None = None,
    ) -> int:
        """Compute and keep the maps of ``image_keys`` not stored yet (nothing is read back);
        returns how many were computed. ``inputs`` holds the rows ``rows`` of ``image_keys``
        (``None``: all); a missing map must have its row there."""
        rows = list(range(len(image_keys))) if rows is None else list(rows)
        position = {r: p for p, r in enumerate(rows)}
        self._scan(expert_key)  # once per batch
        index, pending = self._index.get(expert_key, {}), self._pending.get(expert_key, {})
        first = {}  # image key -> its first row: an image twice in a batch is computed once
        for r, k in enumerate(image_keys):
            if k not in index and k not in pending:
                first.setdefault(k, r)
        missing = list(first.values())
        if not missing:
            return 0
        absent = [image_keys[r] for r in missing if r not in position]
        if absent:
            raise FeatureCacheError(
                f"feature cache: no inputs for {len(absent)} image(s) without a stored map of "
                f"{expert.spec.name} (first: {absent[0]})"
            )
        costs = self._costs.setdefault(expert_key, _Costs())
        t0 = time.perf_counter()
        select = torch.tensor([position[r] for r in missing], dtype=torch.long)
        with torch.no_grad():
            computed = expert(_select(inputs, select))
        if costs.warmed_up:
            costs.compute_s += time.perf_counter() - t0
            costs.compute_rows += len(missing)
        costs.warmed_up = True
        for j, r in enumerate(missing):
            self.put(expert_key, image_keys[r], computed, j)
        self.misses += len(missing)
        return len(missing)

    def decide(
        self,
        expert: Expert,
        expert_key: str,
        image_keys: Sequence[str],
        device=None,  # noqa: ANN001
    ) -> bool:
        """Settle the read-vs-compute decision for ``expert_key`` once its maps are stored:
        time reading ``image_keys`` back against the compute time :meth:`store` measured.
        With no compute measured (every map was stored by an earlier run, or only one batch was
        computed: the first is warm-up), the cache is used."""
        decided = self.use_cache(expert, expert_key, device)
        if decided is not None:
            return decided
        costs = self._costs.setdefault(expert_key, _Costs())
        if not costs.compute_rows:
            costs.decided = True
            logger.info(
                "feature cache on for %s (compute cost not measured: maps stored earlier, or one "
                "batch computed)",
                expert.spec.name,
            )
            return True
        start = time.perf_counter()
        stack_maps([self.get(expert_key, k) for k in image_keys], device)  # type: ignore[misc]
        costs.read_s += time.perf_counter() - start
        costs.read_rows += len(image_keys)
        self._decide(expert, expert_key, device)
        return bool(costs.decided)

    # -------------------------------------------------------------- policy
    def decision_path(self, expert_key: str, device: torch.device | str | None) -> Path:
        kind = torch.device(device).type if device is not None else "cpu"
        return self.folder(expert_key) / f"decision-{kind}.json"

    def use_cache(self, expert: Expert, expert_key: str, device=None) -> bool | None:  # noqa: ANN001
        """``True``/``False`` once decided (or ``policy="always"``), ``None`` while measuring."""
        if self.policy == "always":
            return True
        costs = self._costs.setdefault(expert_key, _Costs())
        if costs.decided is None:
            path = self.decision_path(expert_key, device)
            if path.is_file():
                record = json.loads(path.read_text())
                costs.decided = bool(record["use_cache"])
                logger.info(
                    "feature cache %s for %s (decided earlier, %s)",
                    "on" if costs.decided else "off",
                    expert.spec.name,
                    path,
                )
        return costs.decided

    def _decide(self, expert: Expert, expert_key: str, device) -> None:  # noqa: ANN001
        costs = self._costs[expert_key]
        if costs.decided is not None or not (costs.compute_rows and costs.read_rows):
            return
        compute = costs.compute_s / costs.compute_rows
        read = costs.read_s / costs.read_rows
        costs.decided = read < compute
        record = {"use_cache": costs.decided, "compute_ms": 1e3 * compute, "read_ms": 1e3 * read}
        atomic_text(self.decision_path(expert_key, device), json.dumps(record, indent=1))
        logger.info(
            "feature cache %s for expert %s: reading a map costs %.3f ms, computing it %.3f ms "
            "per image (%.1fx)%s",
            "on" if costs.decided else "OFF",
            expert.spec.name,
            1e3 * read,
            1e3 * compute,
            compute / max(read, 1e-12),
            "" if costs.decided else "; it runs every step (decision kept in the cache folder)",
        )

    # -------------------------------------------------------------- the batch
    def maps(
        self,
        expert: Expert,
        expert_key: str,
        inputs: ExpertInputs,
        image_keys: Sequence[str],
        device: torch.device | str | None = None,
        rows: Sequence[int] | None = None,
    ) -> FeatureMap:
        """The batch's maps: cached rows read back, missing rows computed by ``expert`` and
        kept. Returns ``features (B, C, H, W)`` on ``device`` (ragged grids padded, masked).

        Args:
            expert: the frozen expert (run only on misses or when bypassed, under ``no_grad``).
            expert_key: :func:`expert_cache_key` of ``expert``.
            inputs: the batch's inputs of this expert: ``B`` rows, or the rows ``rows`` of the
                batch (images served from the cache have none; see
                :attr:`moe_vision.data.llava.LlavaDataset.cached_keys`).
            image_keys: ``B`` image content hashes.
            rows: which of the ``B`` images ``inputs`` holds (``None``: all, in order).
        """
        if rows is not None:
            return self._partial(expert, expert_key, inputs, image_keys, rows, device)
        use = self.use_cache(expert, expert_key, device)
        if use is False:
            with torch.no_grad():
                out = expert(inputs)
            self.bypassed += len(image_keys)
            return out if device is None else to_device(out, device)
        costs = self._costs.setdefault(expert_key, _Costs())
        start = time.perf_counter()
        found = [self.get(expert_key, k, scan=False) for k in image_keys]
        if any(m is None for m in found):  # one folder scan per batch, not per image
            self._scan(expert_key)
            found = [m or self.get(expert_key, k, scan=False) for m, k in zip(found, image_keys)]
        missing = [i for i, m in enumerate(found) if m is None]
        if missing:
            t0 = time.perf_counter()
            index = torch.tensor(missing, dtype=torch.long)
            with torch.no_grad():
                computed = expert(_select(inputs, index))
            if computed.thumbnail is not None:  # tiled expert: its thumbnail is not stored
                return self._never_cache(expert, expert_key, inputs, image_keys, device)
            if use is None and costs.warmed_up:
                costs.compute_s += time.perf_counter() - t0
                costs.compute_rows += len(missing)
            costs.warmed_up = True
            for j, i in enumerate(missing):
                self.put(expert_key, image_keys[i], computed, j)
                found[i] = self.get(expert_key, image_keys[i], scan=False)
        out = stack_maps([m for m in found if m is not None], device)
        if use is None and not missing:
            costs.read_s += time.perf_counter() - start
            costs.read_rows += len(image_keys)
            self._decide(expert, expert_key, device)
        self.hits += len(image_keys) - len(missing)
        self.misses += len(missing)
        return out

    def _partial(
        self,
        expert: Expert,
        expert_key: str,
        inputs: ExpertInputs,
        image_keys: Sequence[str],
        rows: Sequence[int],
        device: torch.device | str | None,
    ) -> FeatureMap:
        """:meth:`maps` when ``inputs`` holds only ``rows``: store what is missing, read all."""
        computed = self.store(expert, expert_key, inputs, image_keys, rows)
        found = [self.get(expert_key, k) for k in image_keys]
        self.hits += len(image_keys) - computed
        return stack_maps(found, device)  # type: ignore[arg-type]

    def _never_cache(
        self,
        expert: Expert,
        expert_key: str,
        inputs: ExpertInputs,
        image_keys: Sequence[str],
        device: torch.device | str | None,
    ) -> FeatureMap:
        """Run ``expert`` on the whole batch from now on (maps with a thumbnail)."""
        self._costs.setdefault(expert_key, _Costs()).decided = False
        logger.info("feature cache off for %s: its maps carry a thumbnail", expert.spec.name)
        with torch.no_grad():
            out = expert(inputs)
        self.bypassed += len(image_keys)
        return out if device is None else to_device(out, device)


class FeatureCacheError(RuntimeError):
    """The cache cannot give a map it was asked for (no stored map and no inputs to compute it)."""
