"""LLaVA-format data: records, validation, tokenisation with label masking, and batching.

A LLaVA record (Liu et al., *Visual Instruction Tuning*, 2023) is::

    {"id": "...", "image": "relative/path.png", "category": "color",      # category optional
     "conversations": [{"from": "human", "value": "<image>\\nQuestion?"},
                       {"from": "gpt", "value": "answer"}, ...]}

:class:`LlavaDataset` validates every record when it is built, so bad data fails (or is
skipped) before training starts, never deep inside torch: malformed JSON (file, line and
column), a record that is not an object or lacks ``conversations``/``image``, unknown roles,
empty answers, no or several ``<image>`` placeholders, a missing or corrupt image file, a
sequence longer than the LLM allows. With ``on_bad_record="error"`` (default) the first one
raises :class:`DataError` naming the file, the record and the problem; with ``"skip"`` it is
logged, counted and kept in :attr:`LlavaDataset.skipped` — never silently dropped.

Prompts are rendered with the tokenizer's own chat template; labels are ``-100`` on every
token except the assistant answers (and their end-of-turn token). Each expert's
preprocessing runs in ``__getitem__`` (so in DataLoader workers); :meth:`LlavaDataset.collate`
pads and stacks a batch.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from experts.base import ExpertInputs, collate_inputs
from experts.images import ImageError, load_image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value of tokens that are not trained (prompt, image, padding)."""

ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
"""LLaVA ``from`` values to chat-template roles."""

DEFAULT_CATEGORY = "default"
"""Category of records that do not name one."""

BadRecordPolicy = Literal["error", "skip"]


class DataError(ValueError):
    """A data file or record that cannot be used; names the file, the record and the problem."""


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out under ``on_bad_record="skip"``."""

    index: int
    id: str
    reason: str


@dataclass(frozen=True)
class Sample:
    """A validated, tokenised record."""

    id: str
    image_path: Path
    category: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


# ---------------------------------------------------------------------------- reading
def load_records(json_path: str | os.PathLike[str]) -> list[Any]:
    """Read a LLaVA JSON list (``.json``) or one record per line (``.jsonl``).

    Raises:
        DataError: missing file, malformed JSON (with line and column), top level not a list.
    """
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: malformed JSON on line {lineno} column {err.colno}: {err.msg}"
                ) from err
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(records, list):
        raise DataError(
            f"{path}: expected a JSON list of LLaVA records, got a {type(records).__name__}"
        )
    return records


def record_id(record: Any, index: int) -> str:
    """The record's ``id`` (or ``#index`` when it has none)."""
    if isinstance(record, dict) and "id" in record:
        return str(record["id"])
    return f"#{index}"


def to_messages(record: Any, image_token: str) -> list[dict[str, str]]:
    """Validate a record's conversation and turn it into chat-template messages.

    Raises:
        ValueError: the problem, in words (the caller adds file and record).
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError(f"record has no 'conversations' (keys: {sorted(record)})")
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list of turns")
    messages = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {t} must be an object with a string 'value', got {turn!r}")
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            raise ValueError(
                f"turn {t} has 'from' = {turn.get('from')!r}; expected one of {sorted(ROLES)}"
            )
        if role == "assistant" and not turn["value"].strip():
            raise ValueError(f"turn {t} is an empty answer")
        messages.append({"role": role, "content": turn["value"]})
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise ValueError(f"conversation must start with a human turn, starts with {first!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no answer (no 'gpt' turn)")
    counts = [m["content"].count(image_token) for m in messages]
    if sum(counts) != 1:
        raise ValueError(
            f"conversation must hold exactly one {image_token!r} placeholder, found {sum(counts)}"
        )
    if messages[counts.index(1)]["role"] != "user":
        raise ValueError(f"the {image_token!r} placeholder must be in a human turn")
    return messages


def check_image(path: Path, verify: bool) -> None:
    """Raise :class:`~experts.images.ImageError` if ``path`` is missing or (``verify``) corrupt."""
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    if verify:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for corrupt files
            raise ImageError(f"cannot read image {path}: {err} (is the file corrupt?)") from err


# ---------------------------------------------------------------------------- tokenising
def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation rendered with the tokenizer's chat template.

    The rendered text is cut at turn boundaries (the template must render a conversation as
    an extension of its prefixes, as ChatML, Llama and Qwen templates do); each piece is
    tokenised on its own. Labels copy the ids of assistant answers (including the template's
    end-of-turn text) and are :data:`IGNORE_INDEX` elsewhere.

    Returns:
        ``(input_ids, labels)``, two lists of equal length ``T``.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""

    def add(text: str, train: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:j], generation=True)
        full = _render(tokenizer, messages[: j + 1], generation=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as an extension "
                "of its prefixes; cannot locate the answers to train on"
            )
        add(prompt[len(done) :], train=False)
        add(full[len(prompt) :], train=True)
        done = full
    tail = _render(tokenizer, messages, generation=False)[len(done) :]
    if tail:
        add(tail, train=False)
    return ids, labels


def image_content_key(path: str | os.PathLike[str]) -> str:
    """Stable content hash of an image file (sha256 of its bytes): the feature-cache key."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- dataset
class LlavaDataset(Dataset):
    """LLaVA-format records with per-expert preprocessing (see the module docstring).

    Args:
        json_path: ``.json`` list or ``.jsonl`` file of LLaVA records.
        image_root: folder the records' ``image`` paths are relative to.
        preprocessors: one picklable ``PIL.Image -> ExpertInputs`` per expert
            (``MoEVisionModel.preprocessors``).
        tokenizer: tokenizer with the image placeholder as one special token and a chat
            template (``MoEVisionModel.tokenizer``).
        image_token: the placeholder string.
        max_length: longest sequence the LLM takes, visual tokens included (``None``: the
            tokenizer's ``model_max_length``).
        num_visual_tokens: tokens the placeholder expands to (``MoEVisionModel.num_visual_tokens``).
        on_bad_record: ``"error"`` raises on the first bad record; ``"skip"`` logs, counts and
            records it in :attr:`skipped`.
        verify_images: check every image file's integrity up front (PIL ``verify``); missing
            files are always checked.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        preprocessors: Sequence[Callable[[Image.Image], ExpertInputs]],
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = "<image>",
        max_length: int | None = None,
        num_visual_tokens: int = 0,
        on_bad_record: BadRecordPolicy = "error",
        verify_images: bool = True,
    ) -> None:
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if not preprocessors:
            raise ValueError("LlavaDataset needs one preprocessor per expert, got none")
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"image root is not a folder: {self.image_root}")
        self.preprocessors = list(preprocessors)
        self.image_token = image_token
        self.image_token_id = _single_token_id(tokenizer, image_token)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        limit = max_length if max_length is not None else tokenizer.model_max_length
        self.max_length = int(limit) if limit is not None and limit < 10**8 else None
        self.num_visual_tokens = int(num_visual_tokens)
        self.on_bad_record = on_bad_record
        self.skipped: list[SkippedRecord] = []
        self.samples: list[Sample] = []
        records = load_records(self.json_path)
        for index, record in enumerate(records):
            try:
                self.samples.append(self._prepare(record, index, tokenizer, verify_images))
            except (ValueError, OSError) as err:
                self._bad(index, record_id(record, index), str(err))
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d records: %s",
                self.json_path,
                len(self.skipped),
                len(records),
                dict(self.skipped_reasons()),
            )
        if not self.samples:
            raise DataError(f"{self.json_path}: no usable records (of {len(records)})")

    # -------------------------------------------------------------- validation
    def _bad(self, index: int, rid: str, reason: str) -> None:
        message = f"{self.json_path} record {index} (id {rid!r}): {reason}"
        if self.on_bad_record == "error":
            raise DataError(message)
        logger.warning("skipping %s", message)
        self.skipped.append(SkippedRecord(index, rid, reason))

    def _prepare(
        self, record: Any, index: int, tokenizer: PreTrainedTokenizerBase, verify: bool
    ) -> Sample:
        messages = to_messages(record, self.image_token)
        image = record.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"record needs an 'image' path, got {image!r}")
        path = self.image_root / image
        check_image(path, verify)
        ids, labels = tokenize_conversation(tokenizer, messages)
        found = ids.count(self.image_token_id)
        if found != 1:
            raise ValueError(
                f"tokenised prompt holds {found} image tokens (id {self.image_token_id}), "
                "expected 1; is the placeholder a special token of the tokenizer?"
            )
        length = len(ids) - 1 + self.num_visual_tokens
        if self.max_length is not None and length > self.max_length:
            raise ValueError(
                f"sequence too long: {len(ids)} text tokens + {self.num_visual_tokens} visual "
                f"tokens - 1 placeholder = {length} > max_length {self.max_length}"
            )
        if all(v == IGNORE_INDEX for v in labels):
            raise ValueError("no answer tokens to train on after tokenisation")
        category = str(record.get("category", DEFAULT_CATEGORY))
        return Sample(record_id(record, index), path, category, tuple(ids), tuple(labels))

    def skipped_reasons(self) -> collections.Counter[str]:
        """How many records were skipped, by reason (the text before the first colon)."""
        return collections.Counter(s.reason.split(":")[0] for s in self.skipped)

    # -------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One sample: ``input_ids`` and ``labels`` ``(T,)``, ``expert_inputs`` (one dict per
        expert, no batch dim), ``image_key``, ``id``, ``category``."""
        s = self.samples[i]
        try:
            image = load_image(s.image_path)
        except ImageError as err:
            raise DataError(f"{self.json_path} record id {s.id!r}: {err}") from err
        return {
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
            "expert_inputs": [p(image) for p in self.preprocessors],
            "image_key": image_content_key(s.image_path),
            "id": s.id,
            "category": s.category,
        }

    @property
    def collate(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        """Picklable collate function padding with this tokenizer's pad id."""
        return functools.partial(collate, pad_token_id=self.pad_token_id)


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"the image placeholder {token!r} is {len(ids)} tokens for this tokenizer, "
            "expected one special token (build the LLM with moe_vision.model.llm.create_llm)"
        )
    return int(ids[0])


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Pad and stack samples from :class:`LlavaDataset` (right padding).

    Returns:
        ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``, ``labels`` ``(B, T)`` (-100 on
        padding), ``images`` (one batched :data:`ExpertInputs` per expert), ``image_keys``,
        ``ids``, ``categories``.
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
    n_experts = len(batch[0]["expert_inputs"])
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "images": [
            collate_inputs([b["expert_inputs"][e] for b in batch]) for e in range(n_experts)
        ],
        "image_keys": [b["image_key"] for b in batch],
        "ids": [b["id"] for b in batch],
        "categories": [b["category"] for b in batch],
    }
