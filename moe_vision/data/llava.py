"""LLaVA-format training data: an indexed dataset, validated per record in the workers, batched.

:class:`LlavaDataset` is a :class:`~moe_vision.data.index.RecordIndex` (file, byte offset,
length per record) over one ``.json``/``.jsonl`` file or a mixture YAML
(:mod:`moe_vision.data.mixture`), plus a policy. Building it reads no record and opens no
image; ``__getitem__`` (so the DataLoader workers) parses the record, validates it with the
shared :class:`~moe_vision.data.validation.RecordValidator`, tokenises it with label masking,
decodes its images and runs every expert's preprocessing on every image -- except for experts
served from the feature cache (:attr:`LlavaDataset.cached_keys`, set by the trainer once it has
stored every image's map): a record whose images all have a stored map skips their decoding and
preprocessing for those experts (a stored map proves the same bytes decoded before).

A bad record (malformed JSON, non-UTF-8, bad conversation, placeholders that do not match the
images, missing/corrupt/oversized image, path outside the image root, over-long sequence):

* ``on_bad_record="error"`` (default): :class:`~moe_vision.data.records.DataError` naming the
  file, the record (position, line, id) and the problem;
* ``"skip"``: logged, kept in :attr:`LlavaDataset.skipped` and appended to ``skip_log`` (a
  JSONL file in the run folder, written from whichever process found it), and replaced by the
  next good record (``(i + 1) % n``, ``(i + 2) % n``, ...): deterministic, so the data order
  stays a function of the seed, and the run goes on.

Record layouts: see :mod:`moe_vision.data.records` (text-only, single- and multi-image,
``<image>`` anywhere in a human turn, multi-turn). :func:`collate` flattens a batch's images in
row order: ``images`` holds ``M = sum(image_counts)`` rows per expert (``None`` when the batch
has no image; ``{}`` for an expert served from the cache, or only the rows listed in
``input_rows``), and the model splices image ``m`` at the ``m``-th placeholder.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from experts.base import collate_inputs
from experts.images import ImageError, image_content_key
from experts.spec import ExpertInputs
from moe_vision.data.index import RecordIndex, index_file
from moe_vision.data.mixture import Mixture, is_mixture
from moe_vision.data.records import (
    IGNORE_INDEX,
    BadRecordPolicy,
    DataError,
    RecordProblem,
    SkippedRecord,
    record_id,
)
from moe_vision.data.validation import RecordValidator, Sample

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- files
def load_records(json_path: str | os.PathLike[str]) -> list[Any]:
    """Every record of a ``.json`` list or ``.jsonl`` file, parsed (small files; tests, tools).

    Raises:
        DataError: missing file, malformed JSON or non-UTF-8 bytes (file and line named), top
            level not a list.
    """
    index = index_file(json_path)
    out = []
    for i in range(len(index)):
        try:
            out.append(index.read(i))
        except RecordProblem as err:
            raise DataError(f"{json_path}: {err}") from err
    return out


def append_skips(path: str | os.PathLike[str], skipped: Sequence[SkippedRecord]) -> None:
    """Append skipped records to a JSONL skip list (one short ``O_APPEND`` write per record, so
    DataLoader workers and ranks can share the file)."""
    if not skipped:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(dataclasses.asdict(s)) + "\n")
            f.flush()


def read_skips(path: str | os.PathLike[str]) -> list[SkippedRecord]:
    """The distinct skipped records of a skip list (first report of each ``(file, index)``)."""
    p = Path(path)
    if not p.is_file():
        return []
    seen: dict[tuple[str, int], SkippedRecord] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            s = SkippedRecord(**json.loads(line))
            seen.setdefault((s.file, s.index), s)
    return list(seen.values())


# ---------------------------------------------------------------------------- dataset
class LlavaDataset(Dataset):
    """LLaVA-format records, indexed, validated lazily (see the module docstring).

    Args:
        json_path: ``.json`` / ``.jsonl`` file of records, or a mixture ``.yaml``.
        image_root: folder of the images (a mixture's default for sources that name none).
        preprocessors: one picklable ``PIL.Image -> ExpertInputs`` per expert
            (``MoEVisionModel.preprocessors``).
        tokenizer: tokenizer with the image placeholder as one special token and a chat
            template (``MoEVisionModel.tokenizer``).
        image_token: the placeholder string.
        max_length: longest sequence, visual tokens included (``None``: the tokenizer's).
        num_visual_tokens: tokens one image becomes (``MoEVisionModel.num_visual_tokens``).
        on_bad_record: ``"error"`` or ``"skip"``.
        seed: draws of a mixture's random sampling strategies.
        allow_outside_root: accept absolute and ``..`` image paths.
        max_image_pixels: pixel limit of image files (``None``: the platform default).
        skip_log: JSONL file to append skipped records to.
        max_replacements: consecutive bad records tolerated when replacing one.
        memo_records: records whose tokens are kept in memory after their first visit (per
            process; about 1 KB each for short conversations; ``messages`` are not kept).

    Attributes:
        index: the :class:`~moe_vision.data.index.RecordIndex`.
        roots: image root of each file of the index.
        source_counts: per-source counts of a mixture (one entry for a plain file).
        skipped: records skipped in this process.
        cached_keys: expert index -> image keys whose map that expert's feature cache holds. For
            these experts an image with a stored map is neither decoded nor preprocessed (its
            inputs are ``None`` in the item). Empty by default: every expert gets its inputs.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None,
        preprocessors: Sequence[Callable[[Image.Image], ExpertInputs]],
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = "<image>",
        max_length: int | None = None,
        num_visual_tokens: int = 0,
        on_bad_record: BadRecordPolicy = "error",
        seed: int = 0,
        allow_outside_root: bool = False,
        max_image_pixels: int | None = None,
        skip_log: str | os.PathLike[str] | None = None,
        max_replacements: int = 64,
        memo_records: int = 50_000,
    ) -> None:
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if not preprocessors:
            raise ValueError("LlavaDataset needs one preprocessor per expert, got none")
        self.json_path = Path(json_path)
        self.index, self.roots, self.source_counts = resolve_data(json_path, image_root, seed)
        for root in set(self.roots):
            if not root.is_dir():
                raise DataError(f"image root is not a folder: {root}")
        if len(self.index) == 0:
            raise DataError(f"{self.json_path}: no records")
        self.preprocessors = list(preprocessors)
        self.validator = RecordValidator(
            tokenizer,
            image_token,
            max_length,
            num_visual_tokens,
            max_image_pixels=max_image_pixels,
            allow_outside_root=allow_outside_root,
        )
        self.image_token = image_token
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.on_bad_record = on_bad_record
        self.skip_log = Path(skip_log) if skip_log is not None else None
        self.max_replacements = int(max_replacements)
        self.skipped: list[SkippedRecord] = []
        self._seen: set[int] = set()
        self.memo_records = int(memo_records)
        self._memo: dict[int, tuple] = {}
        self.cached_keys: dict[int, frozenset[str]] = {}

    # -------------------------------------------------------------- access
    @classmethod
    def for_model(
        cls,
        json_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None,
        model: Any,
        **options: Any,
    ) -> LlavaDataset:
        """Records read for ``model`` (a :class:`~moe_vision.model.mllm.MoEVisionModel`): its
        experts' preprocessors, its tokenizer, image token, length limit and visual-token
        count; ``options`` are the other ``__init__`` arguments."""
        return cls(
            json_path,
            image_root,
            model.preprocessors,
            model.tokenizer,
            image_token=model.config.image_token,
            max_length=model.max_length,
            num_visual_tokens=model.num_visual_tokens,
            **options,
        )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        """``(N,)`` byte length of every record: a free proxy of its token length."""
        return self.index.length

    def sample(self, i: int, decode: bool = True) -> Sample:
        """Record ``i`` validated (no replacement; raises ``RecordProblem``).

        The text side of a record that passed (tokens, labels, image paths) is memoised in this
        process for the first ``memo_records`` records seen, so later epochs only decode and
        preprocess the images (every time, unless the feature cache serves them)."""
        memo = self._memo.get(i)
        if memo is not None:
            rid, category, paths, ids, labels = memo
            images = [self.validator.open(p) for p in paths] if decode else []
            return Sample(rid, category, [], list(paths), ids.tolist(), labels.tolist(), images)
        record = self.index.read(i)
        root = self.roots[int(self.index.file_id[i])]
        s = self.validator.validate(record, int(self.index.position[i]), root, decode=decode)
        if len(self._memo) < self.memo_records:
            ids, labels = np.asarray(s.input_ids, np.int32), np.asarray(s.labels, np.int32)
            self._memo[i] = (s.id, s.category, tuple(s.image_paths), ids, labels)
        return s

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One sample (record ``i``, or its replacement under ``skip``): ``input_ids`` and
        ``labels`` ``(T,)``, ``expert_inputs`` (per expert, a list of per-image inputs without
        batch dim, or ``None`` when the feature cache serves that expert's maps of these images),
        ``image_keys`` (one content hash per image), ``id``, ``category``."""
        n = len(self)
        for attempt in range(self.max_replacements + 1):
            j = (int(i) + attempt) % n
            try:
                return self._item(j)
            except RecordProblem as err:
                self._bad(j, err)
        raise DataError(
            f"{self.index.where(i)} and the {self.max_replacements} records after it are all bad; "
            f"check the data with `moe-vision data check {self.json_path}`"
        )

    def _item(self, j: int) -> dict[str, Any]:
        s = self.sample(j, decode=False)
        keys = [self._content_key(p) for p in s.image_paths]
        needs = [
            e not in self.cached_keys or not self.cached_keys[e].issuperset(keys)
            for e in range(len(self.preprocessors))
        ]
        images = [self.validator.open(p) for p in s.image_paths] if any(needs) else []
        try:
            inputs = [
                [p(im) for im in images] if need else None
                for p, need in zip(self.preprocessors, needs)
            ]
        except ImageError as err:
            raise RecordProblem("corrupt_image", str(err)) from err
        return {
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
            "expert_inputs": inputs,
            "image_keys": keys,
            "id": s.id,
            "category": s.category,
        }

    def _content_key(self, path: Path) -> str:
        """The image's cache key; an unreadable file is the validator's problem to name."""
        try:
            return image_content_key(path)  # checks the file type and size before reading
        except (OSError, ImageError) as err:
            self.validator.open(path)  # raises RecordProblem (missing_image, ...)
            raise RecordProblem("corrupt_image", f"cannot read {path}: {err}") from err

    def _bad(self, j: int, err: RecordProblem) -> None:
        rid = f"#{int(self.index.position[j])}"
        if j in self._memo:
            rid = self._memo[j][0]
        else:
            try:
                rid = record_id(self.index.read(j), int(self.index.position[j]))
            except RecordProblem:
                pass
        message = f"{self.index.where(j)} (id {rid!r}): {err}"
        if self.on_bad_record == "error":
            raise DataError(message) from err
        if j in self._seen:
            return
        self._seen.add(j)
        logger.warning("skipping %s", message)
        skipped = SkippedRecord(
            int(self.index.position[j]), rid, str(err), self.index.file(j), err.kind
        )
        self.skipped.append(skipped)
        if self.skip_log is not None:
            append_skips(self.skip_log, [skipped])

    def skipped_reasons(self) -> collections.Counter[str]:
        """Skipped records of this process by problem kind."""
        return collections.Counter(s.kind for s in self.skipped)

    @property
    def collate(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        """Picklable collate function padding with this tokenizer's pad id."""
        return functools.partial(collate, pad_token_id=self.pad_token_id)


def resolve_data(
    json_path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None, seed: int = 0
) -> tuple[RecordIndex, list[Path], list[dict[str, Any]]]:
    """``(index, roots, source counts)`` of a data file or mixture YAML (see :class:`Mixture`)."""
    if is_mixture(json_path):
        return Mixture.from_file(json_path).resolve(seed, image_root)
    if image_root is None:
        raise DataError(f"{json_path}: no image root given")
    index = index_file(json_path)
    counts = {"json_path": str(json_path), "image_root": str(image_root)}
    counts.update(sampling_strategy="all", weight=1.0, available=len(index), selected=len(index))
    return index, [Path(image_root)], [counts]


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Pad and stack samples from :class:`LlavaDataset` (right padding).

    Returns:
        ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``, ``labels`` ``(B, T)`` (-100 on
        padding), ``images`` (one batched :data:`ExpertInputs` per expert with ``M`` rows: the
        batch's images in row order; ``None`` when ``M = 0``), ``image_counts`` (``B`` ints),
        ``input_rows`` (per expert, the image rows its inputs hold, ``None`` for all; ``None``
        when ``M = 0``), ``image_keys`` (``M`` hashes), ``ids``, ``categories``.
    """
    if not batch:
        raise ValueError("collate needs at least one sample")
    length = max(int(b["input_ids"].numel()) for b in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for r, b in enumerate(batch):
        n = int(b["input_ids"].numel())
        input_ids[r, :n] = b["input_ids"]
        labels[r, :n] = b["labels"]
        attention[r, :n] = 1
    counts = [len(b["image_keys"]) for b in batch]
    n_experts = len(batch[0]["expert_inputs"])
    images = input_rows = None
    if sum(counts):
        per_expert = [_expert_rows(batch, e) for e in range(n_experts)]
        images = [x for x, _ in per_expert]
        input_rows = [rows for _, rows in per_expert]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "images": images,
        "input_rows": input_rows,
        "image_counts": counts,
        "image_keys": [k for b in batch for k in b["image_keys"]],
        "ids": [b["id"] for b in batch],
        "categories": [b["category"] for b in batch],
    }


def _expert_rows(batch: Sequence[dict[str, Any]], e: int) -> tuple[ExpertInputs, list[int] | None]:
    """Expert ``e``'s batched inputs and the image rows they are (``None``: all ``M`` rows; an
    item whose inputs are ``None`` is served from the feature cache)."""
    rows: list[int] = []
    xs: list[ExpertInputs] = []
    start = 0
    for b in batch:
        n, inputs = len(b["image_keys"]), b["expert_inputs"][e]
        if inputs is not None:
            xs.extend(inputs)
            rows.extend(range(start, start + n))
        start += n
    if len(rows) == start:
        return collate_inputs(xs), None
    return (collate_inputs(xs) if xs else {}), rows
