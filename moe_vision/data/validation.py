"""One validation path for training, evaluation and ``moe-vision data check``.

:class:`RecordValidator` turns one parsed record into a :class:`Sample` or raises a
:class:`~moe_vision.data.records.RecordProblem` with its kind. Checks, in order (cheap first):

1. the conversation (roles, answers) and its layout: placeholders must match the images
   (:func:`~moe_vision.data.records.to_messages`);
2. image paths stay inside the image root: absolute paths and ``..`` that leave the root are
   refused (``outside_root``) unless ``allow_outside_root=True``; nothing outside the root is
   opened. A symbolic link inside the root that resolves outside it is refused too
   (``outside_root``: "resolves outside the image root");
3. tokenisation with the chat template, the length limit (text tokens + visual tokens of every
   image, ``over_length``), and that something is left to train on;
4. every image is opened and fully decoded (``missing_image``, ``corrupt_image`` for corrupt
   or truncated files, ``image_too_large`` for more pixels than the limit, checked before
   decoding; see :mod:`experts.images`).

The training dataset (:class:`~moe_vision.data.llava.LlavaDataset`), the evaluation
(:func:`moe_vision.evaluation.evaluate.load_eval_items`) and ``moe-vision data check`` all call
:meth:`RecordValidator.validate`, so the same record is accepted or refused the same way
everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import PreTrainedTokenizerBase

from experts.images import ImageError, ImageNotFoundError, ImageTooLargeError, load_image
from moe_vision.data.records import (
    DEFAULT_CATEGORY,
    IGNORE_INDEX,
    RecordProblem,
    record_id,
    record_images,
    single_token_id,
    to_messages,
    tokenize_conversation,
)


@dataclass
class Sample:
    """A validated, tokenised record.

    Attributes:
        id: the record's id.
        category: its ``category`` (:data:`~moe_vision.data.records.DEFAULT_CATEGORY` if none).
        messages: chat-template messages.
        image_paths: resolved image files, in placeholder order (empty: text-only).
        input_ids, labels: ``T`` token ids and labels (``-100`` where not trained).
        images: the decoded RGB images (when the validator decodes them).
        record: the parsed record.
    """

    id: str
    category: str
    messages: list[dict[str, str]]
    image_paths: list[Path]
    input_ids: list[int]
    labels: list[int]
    images: list[Image.Image] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def resolve_image_path(root: Path, image: str, allow_outside_root: bool = False) -> Path:
    """``root / image``, refusing paths that leave ``root`` (see the module docstring).

    Raises:
        RecordProblem: ``outside_root``, naming the path, the root and how to allow it.
    """
    if "\x00" in image:
        raise RecordProblem("outside_root", f"image path {image!r} holds a NUL byte")
    normal = os.path.normpath(image)
    leaves = os.path.isabs(image) or normal == ".." or normal.startswith(".." + os.sep)
    if leaves and not allow_outside_root:
        raise RecordProblem(
            "outside_root",
            f"image path {image!r} leaves the image root {root} (absolute paths and '..' are "
            "refused; set allow_outside_root: true in the data config to allow them)",
        )
    path = root / image
    if not allow_outside_root:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise RecordProblem(
                "outside_root",
                f"image path {image!r} resolves outside the image root {root} (to {real}, through "
                "a symbolic link); set allow_outside_root: true in the data config to allow it",
            )
    return path


class RecordValidator:
    """The checks of the module docstring for one model's tokenizer and visual tokens.

    Args:
        tokenizer: the LLM's tokenizer (the placeholder one special token, a chat template).
        image_token: the placeholder string.
        max_length: longest sequence (text + visual tokens); ``None``: the tokenizer's
            ``model_max_length`` (ignored when unset).
        num_visual_tokens: tokens one image becomes.
        max_image_pixels: pixel limit of image files (``None``:
            :data:`experts.images.MAX_IMAGE_PIXELS`).
        allow_outside_root: accept absolute and ``..`` image paths.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = "<image>",
        max_length: int | None = None,
        num_visual_tokens: int = 0,
        max_image_pixels: int | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = single_token_id(tokenizer, image_token)
        limit = max_length if max_length is not None else tokenizer.model_max_length
        self.max_length = int(limit) if limit is not None and limit < 10**8 else None
        self.num_visual_tokens = int(num_visual_tokens)
        self.max_image_pixels = max_image_pixels
        self.allow_outside_root = allow_outside_root

    def validate(self, record: Any, index: int, root: Path, decode: bool = True) -> Sample:
        """Check ``record`` (position ``index`` in its file) against ``root``.

        Args:
            decode: open and fully decode the images (they are returned in ``Sample.images``).

        Raises:
            RecordProblem: the first problem found, with its kind.
        """
        if not isinstance(record, dict):
            raise RecordProblem(
                "malformed", f"record must be a JSON object, got {type(record).__name__}"
            )
        names = record_images(record)
        messages = to_messages(record, self.image_token, len(names))
        paths = [resolve_image_path(root, n, self.allow_outside_root) for n in names]
        try:
            ids, labels = tokenize_conversation(self.tokenizer, messages)
        except ValueError as err:
            raise RecordProblem("bad_conversation", str(err)) from err
        found = ids.count(self.image_token_id)
        if found != len(names):
            raise RecordProblem(
                "placeholder_mismatch",
                f"tokenised prompt holds {found} image tokens (id {self.image_token_id}), expected "
                f"{len(names)}; is the placeholder a special token of the tokenizer?",
            )
        length = len(ids) + len(names) * (self.num_visual_tokens - 1)
        if self.max_length is not None and length > self.max_length:
            raise RecordProblem(
                "over_length",
                f"sequence too long: {len(ids)} text tokens + {len(names)} x "
                f"{self.num_visual_tokens} visual tokens - {len(names)} placeholders = {length} > "
                f"max_length {self.max_length}",
            )
        if all(v == IGNORE_INDEX for v in labels):
            raise RecordProblem("no_answer", "no answer tokens to train on after tokenisation")
        images = [self.open(p) for p in paths] if decode else []
        category = str(record.get("category", DEFAULT_CATEGORY))
        return Sample(
            record_id(record, index), category, messages, paths, ids, labels, images, record
        )

    def open(self, path: Path) -> Image.Image:
        """Decode one image to RGB under the pixel limit; problems become ``RecordProblem``."""
        try:
            return load_image(path, max_pixels=self.max_image_pixels)
        except ImageNotFoundError as err:
            raise RecordProblem("missing_image", str(err)) from err
        except ImageTooLargeError as err:
            raise RecordProblem("image_too_large", str(err)) from err
        except ImageError as err:
            raise RecordProblem("corrupt_image", str(err)) from err
