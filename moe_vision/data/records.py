"""LLaVA-family record layouts: what a record is, its images, its conversation, its tokens.

Every layout the LLaVA family trains on (Liu et al., *Visual Instruction Tuning*, 2023;
LLaVA-OneVision, Li et al., arXiv 2408.03326; Cambrian-1; Eagle)::

    single image   {"id": ..., "image": "a.png", "conversations": [human, gpt, ...]}
    text-only      no "image" key, or "image" in ("", "None", "none", "nan")   (ShareGPT, Cambrian)
    multi-image    {"image": ["a.png", "b.png"], ...}: one <image> placeholder per image, in order

Eagle 2 / 2.5 ``sft_jsonl`` records (Li et al., arXiv 2501.14818; 2504.15271) name their images
under ``"data": [{"type": "image", "image_list": ["a.png", ...]}, ...]``; the images of every
``image`` entry, in order, are the record's images (as ``"image": [...]`` would be).

Video is refused by name (kind ``video``: "video records are not supported"), never read as
text: a ``"video"`` key (LLaVA-Video, InternVL), a ``<video>`` placeholder in any turn, or an
Eagle 2.5 ``{"type": "video"}`` entry.

Layouts of a whole file (:data:`LAYOUTS`): ``llava`` (default) takes the placeholders as
written, and a single-image record without ``<image>`` is an error. ``internvl`` (InternVL
``meta.json`` and Eagle 2 recipe sources, or ``layout: internvl`` in a mixture) does what
InternVL's loader does: a single-image record with no ``<image>`` gets ``"<image>\\n"`` put in
front of its first human turn (:func:`apply_layout`).

``<image>`` may stand anywhere in a human turn ("Describe the photo.\\n<image>", LLaVA-558K) and
conversations may have many turns. The number of placeholders must equal the number of images;
otherwise the error says what the record is ("text-only record", "multi-image record with 3
images") and how many placeholders it holds.

Prompts are rendered with the tokenizer's own chat template; labels are ``-100`` on every token
except the assistant answers (and their end-of-turn token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

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

TEXT_ONLY_MARKERS: frozenset[str] = frozenset({"", "None", "none", "nan", "null"})
"""``image`` values that mean "no image" (Cambrian-7M writes these for text-only records)."""

BadRecordPolicy = Literal["error", "skip"]

LAYOUTS = ("llava", "internvl")
"""File layouts (see the module docstring)."""

IMAGE_PLACEHOLDER = "<image>"
"""The placeholder the LLaVA, InternVL and Eagle formats write (what ``internvl`` prepends)."""

VIDEO_PLACEHOLDER = "<video>"
"""The video placeholder of LLaVA-Video / InternVL records (refused)."""


class DataError(ValueError):
    """A data file or record that cannot be used; names the file, the record and the problem.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's
    traceback as its message; the message is cut back to the original one line here.
    """

    def __init__(self, message: str = "") -> None:
        if message.startswith("Caught DataError") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class RecordProblem(ValueError):
    """What is wrong with one record, with a machine-readable ``kind`` (the caller adds where).

    Kinds: ``malformed`` (not JSON / not an object), ``not_utf8``, ``video`` (a video record:
    not supported), ``duplicate_id``, ``bad_conversation``,
    ``placeholder_mismatch``, ``missing_image``, ``corrupt_image``, ``image_too_large``,
    ``outside_root``, ``over_length``, ``no_answer``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out under ``on_bad_record="skip"``.

    Attributes:
        index: position in its data file (records, counting from 0).
        id: the record's ``id`` (``#index`` without one).
        reason: the problem, in words.
        file: the data file ("" when unknown).
        kind: the problem's :class:`RecordProblem` kind.
    """

    index: int
    id: str
    reason: str
    file: str = ""
    kind: str = "invalid"


def record_id(record: Any, index: int) -> str:
    """The record's ``id`` (or ``#index`` when it has none)."""
    if isinstance(record, dict) and "id" in record:
        return str(record["id"])
    return f"#{index}"


def video_problem(what: str) -> RecordProblem:
    """The refusal of a video record (kind ``video``)."""
    return RecordProblem(
        "video", f"video records are not supported ({what}); moe-vision trains on images only"
    )


def record_images(record: dict[str, Any]) -> list[str]:
    """The record's image paths, in placeholder order (``[]`` for a text-only record).

    Raises:
        RecordProblem: ``video`` for a video record; ``bad_conversation`` when ``image`` is
            neither a path, a text-only marker nor a list of paths, or Eagle's ``data`` list is
            not a list of ``{"type": "image", "image_list": [...]}`` entries.
    """
    if record.get("video") not in (None, "", []):
        raise video_problem(f"'video' key {record['video']!r}")
    if "data" in record:
        if record.get("image") not in (None, "", []):
            raise RecordProblem(
                "bad_conversation", "record has both 'image' and Eagle's 'data' list; expected one"
            )
        return _eagle_images(record["data"])
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, float) and math.isnan(image):
        return []
    if isinstance(image, str):
        return [] if image.strip() in TEXT_ONLY_MARKERS else [image]
    if isinstance(image, list) and all(isinstance(p, str) and p.strip() for p in image):
        return list(image)
    raise RecordProblem(
        "bad_conversation",
        f"'image' must be a path, a list of paths or absent, got {image!r}",
    )


def _eagle_images(data: Any) -> list[str]:
    """The images of an Eagle 2 / 2.5 ``data`` list, in order."""
    if not isinstance(data, list):
        raise RecordProblem("bad_conversation", f"Eagle 'data' must be a list, got {data!r:.80}")
    images: list[str] = []
    for k, entry in enumerate(data):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "video":
            raise video_problem(f"Eagle 'data' entry {k} has type 'video'")
        paths = entry.get("image_list") if isinstance(entry, dict) else None
        if kind != "image" or not isinstance(paths, list):
            raise RecordProblem(
                "bad_conversation",
                f"Eagle 'data' entry {k} must be {{'type': 'image', 'image_list': [paths]}}, "
                f"got {entry!r:.120}",
            )
        if not all(isinstance(p, str) and p.strip() for p in paths):
            raise RecordProblem(
                "bad_conversation", f"Eagle 'data' entry {k}: image_list holds a non-path"
            )
        images.extend(paths)
    return images


def apply_layout(record: Any, layout: str) -> Any:
    """``record`` as the file's layout reads it (see the module docstring; a record the layout
    does not change, or cannot read, is returned as is, for the validator to judge)."""
    if layout == "llava" or not isinstance(record, dict):
        return record
    if layout != "internvl":
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    conv = record.get("conversations")
    try:
        single = len(record_images(record)) == 1
    except RecordProblem:
        return record
    if not single or not isinstance(conv, list):
        return record
    turns = [t for t in conv if isinstance(t, dict) and isinstance(t.get("value"), str)]
    if len(turns) != len(conv) or any(IMAGE_PLACEHOLDER in t["value"] for t in turns):
        return record
    first = next((k for k, t in enumerate(turns) if ROLES.get(str(t.get("from"))) == "user"), None)
    if first is None:
        return record
    conv = list(conv)
    conv[first] = {**conv[first], "value": IMAGE_PLACEHOLDER + "\n" + conv[first]["value"]}
    return {**record, "conversations": conv}


def describe(n_images: int) -> str:
    """What a record with ``n_images`` images is, in words."""
    if n_images == 0:
        return "text-only record"
    if n_images == 1:
        return "single-image record"
    return f"multi-image record with {n_images} images"


def to_messages(record: Any, image_token: str, n_images: int | None = None) -> list[dict[str, str]]:
    """Validate a record's conversation and turn it into chat-template messages.

    Args:
        record: the parsed record.
        image_token: the placeholder string.
        n_images: images the record holds (``None``: from :func:`record_images`).

    Raises:
        RecordProblem: the problem, in words (the caller adds file and record).
    """
    if not isinstance(record, dict):
        raise RecordProblem(
            "malformed", f"record must be a JSON object, got {type(record).__name__}"
        )
    if "conversations" not in record:
        raise RecordProblem(
            "bad_conversation", f"record has no 'conversations' (keys: {sorted(record)})"
        )
    if n_images is None:
        n_images = len(record_images(record))
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv:
        raise RecordProblem("bad_conversation", "'conversations' must be a non-empty list of turns")
    messages = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordProblem(
                "bad_conversation",
                f"turn {t} must be an object with a string 'value', got {turn!r}",
            )
        if VIDEO_PLACEHOLDER in turn["value"]:
            raise video_problem(f"{VIDEO_PLACEHOLDER!r} placeholder in turn {t}")
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            raise RecordProblem(
                "bad_conversation",
                f"turn {t} has 'from' = {turn.get('from')!r}; expected one of {sorted(ROLES)}",
            )
        if role == "assistant" and not turn["value"].strip():
            raise RecordProblem("bad_conversation", f"turn {t} is an empty answer")
        messages.append({"role": role, "content": turn["value"]})
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise RecordProblem(
            "bad_conversation", f"conversation must start with a human turn, starts with {first!r}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordProblem("bad_conversation", "conversation has no answer (no 'gpt' turn)")
    counts = [m["content"].count(image_token) for m in messages]
    if sum(counts) != n_images:
        raise RecordProblem(
            "placeholder_mismatch",
            f"{describe(n_images)} needs exactly {'one' if n_images == 1 else n_images} "
            f"{image_token!r} placeholder{'s' if n_images != 1 else ''}, found {sum(counts)}",
        )
    misplaced = [t for t, (m, c) in enumerate(zip(messages, counts)) if c and m["role"] != "user"]
    if misplaced:
        raise RecordProblem(
            "placeholder_mismatch",
            f"the {image_token!r} placeholder must be in a human turn "
            f"(found in turn {misplaced[0]})",
        )
    return messages


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


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of ``token``, which must be one special token of ``tokenizer``."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"the image placeholder {token!r} is {len(ids)} tokens for this tokenizer, "
            "expected one special token (build the LLM with moe_vision.model.llm.create_llm)"
        )
    return int(ids[0])
