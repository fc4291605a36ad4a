"""Evaluation: greedy answers, VQA-style normalisation, accuracy per category.

:func:`evaluate` asks the model every question of a LLaVA-format file (the first human turn,
image placeholder included) with greedy decoding and scores the answer:

* records with a single reference (the first ``gpt`` turn, as the built-in benchmark writes)
  score 1 for an exact match after :func:`normalize_answer`, else 0;
* records with an ``"answers"`` list of several human references (VQAv2 style) score
  :func:`vqa_score`, ``min(#matching references / 3, 1)`` (Antol et al., *VQA: Visual Question
  Answering*, ICCV 2015; the official script additionally averages this over the 10 subsets
  of 9 references, which we do not).

:func:`normalize_answer` follows the VQA evaluation's answer processing: lowercase,
punctuation removed (a period between digits kept), number words to digits, articles
dropped, whitespace collapsed.

Answers do not depend on the batch size: prompts are left padded with an attention mask, and
position ids follow the mask (``tests/test_evaluate.py`` checks batch 1 against batch 16 for
every fusion strategy, each in a fresh process). :attr:`EvalResult.prompt_format` records the
chat template and the rendered prompt; ``moe-vision eval`` writes it into the run folder.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moe_vision.data.llava import resolve_data
from moe_vision.data.records import (
    BadRecordPolicy,
    DataError,
    RecordProblem,
    SkippedRecord,
    record_id,
)
from moe_vision.data.validation import RecordValidator, Sample
from moe_vision.features.cache import FeatureCache
from moe_vision.features.cached_maps import CachedMaps, generate_kwargs

logger = logging.getLogger(__name__)

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")


def normalize_answer(answer: str) -> str:
    """VQA-style answer normalisation (see the module docstring).

    >>> normalize_answer("  The Three Cats! ")
    '3 cats'
    """
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PERIOD.sub("", text)
    text = _PUNCT.sub(" ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """``min(#answers equal to prediction / 3, 1)`` after :func:`normalize_answer`."""
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return min(matches / 3.0, 1.0)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


@dataclass
class EvalItem:
    """One question to ask (``images``: one per placeholder of ``prompt``; empty: text-only)."""

    id: str
    images: list[Path]
    prompt: str
    answers: list[str]
    category: str

    @property
    def image(self) -> Path | None:
        """The first image (``None`` for a text-only question)."""
        return self.images[0] if self.images else None

    def generate_images(self) -> Path | list[Path] | None:
        """What ``model.generate`` takes for this question: one path, a list, or ``None``."""
        return self.images[0] if len(self.images) == 1 else (self.images or None)


@dataclass
class EvalResult:
    """Scores of one evaluation run.

    Attributes:
        per_category: mean score per category.
        overall: mean score over all questions (micro average).
        predictions: one dict per question: ``id``, ``category``, ``prompt``, ``prediction``,
            ``answers``, ``score`` and ``correct`` (full credit); the per-question record that
            paired comparisons (``moe_vision.results.compare``) read back.
        counts: questions per category.
        skipped: records left out under ``on_bad_record="skip"``.
        prompt_format: how each question was put to the model (:func:`prompt_format`).
    """

    per_category: dict[str, float]
    overall: float
    predictions: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedRecord] = field(default_factory=list)
    prompt_format: dict[str, str | None] = field(default_factory=dict)

    @property
    def macro(self) -> float:
        """Mean of the per-category scores."""
        return sum(self.per_category.values()) / max(len(self.per_category), 1)

    def to_metrics(self, prefix: str = "accuracy") -> dict[str, float]:
        """Flat metrics: ``{prefix}/{category}`` and ``{prefix}/overall``, each with its 95%
        interval ``{prefix}/{category}/lo`` and ``/hi`` and its question count ``n/{category}``
        (:func:`moe_vision.results.stats.interval_metrics`: Wilson for 0/1 scores)."""
        from moe_vision.results.stats import interval_metrics

        out = {f"{prefix}/{c}": v for c, v in sorted(self.per_category.items())}
        out[f"{prefix}/overall"] = self.overall
        out.update(interval_metrics(self.predictions, prefix))
        return out


def load_eval_items(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None,
    validator: RecordValidator,
    on_bad_record: BadRecordPolicy = "error",
    limit: int | None = None,
    seed: int = 0,
    stored: Callable[[Path], bool] | None = None,
) -> tuple[list[EvalItem], list[SkippedRecord]]:
    """The questions of a LLaVA file or mixture, validated by the same
    :class:`~moe_vision.data.validation.RecordValidator` as training data (images fully decoded,
    paths inside the image root, length limit), plus the evaluation's own checks (a first human
    question and its answer, well-formed ``answers``).

    Args:
        limit: stop after this many good questions (``None``: all).
        stored: an image for which this is true is not decoded here (the feature cache holds
            every map of it, which proves the same bytes decoded before).

    Raises:
        DataError: under ``on_bad_record="error"``, the first bad record (file, record, problem).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    index, roots, _ = resolve_data(json_path, image_root, seed)
    items: list[EvalItem] = []
    skipped: list[SkippedRecord] = []
    asked: dict[str, str] = {}  # id -> where its question is (questions are paired by id)
    for i in range(len(index)):
        if limit is not None and len(items) >= limit:
            break
        position = int(index.position[i])
        rid = f"#{position}"
        try:
            record = index.read(i)
            rid = record_id(record, position)
            if rid in asked:
                raise RecordProblem(
                    "duplicate_id", f"id {rid!r} is already the id of {asked[rid]} (must be unique)"
                )
            sample = validator.validate(record, position, roots[int(index.file_id[i])], False)
            for path in sample.image_paths:  # decoded last, as validate(decode=True) does
                if stored is None or not _stored(stored, path):
                    validator.open(path)
            items.append(_eval_item(sample, validator.image_token))
            asked[rid] = index.where(i)
        except RecordProblem as err:
            message = f"{index.where(i)} (id {rid!r}): {err}"
            if on_bad_record == "error":
                raise DataError(message) from err
            logger.warning("skipping %s", message)
            skipped.append(SkippedRecord(position, rid, str(err), index.file(i), err.kind))
    if skipped:
        logger.warning("%s: skipped %d records", json_path, len(skipped))
    return items, skipped


def _stored(stored: Callable[[Path], bool], path: Path) -> bool:
    try:
        return stored(path)
    except OSError:  # unreadable: the validator names the problem
        return False


def _eval_item(sample: Sample, image_token: str) -> EvalItem:
    messages = sample.messages
    if messages[0]["role"] == "system":
        messages = messages[1:]
    if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
        raise RecordProblem(
            "bad_conversation",
            "an evaluation record must start with a human question and an answer",
        )
    if messages[0]["content"].count(image_token) != len(sample.image_paths):
        raise RecordProblem(
            "placeholder_mismatch",
            f"the first question must hold every {image_token!r} placeholder (the evaluation "
            "asks only the first turn)",
        )
    answers = sample.record.get("answers", [messages[1]["content"]])
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise RecordProblem(
            "bad_conversation",
            f"'answers' must be a non-empty list of non-empty strings, got {answers!r}",
        )
    return EvalItem(sample.id, sample.image_paths, messages[0]["content"], answers, sample.category)


QUESTION_FIELD = "{question}"
"""Stands for the question in :func:`prompt_format`'s ``"prompt"``."""


def prompt_format(tokenizer: Any) -> dict[str, str | None]:
    """How a question reaches the LLM, for the record (evaluations differ by prompt format):
    the tokenizer's ``chat_template`` (Jinja) and ``prompt``, a question rendered with it,
    :data:`QUESTION_FIELD` in the question's place (``None`` without a template)."""
    template = getattr(tokenizer, "chat_template", None)
    rendered = None
    if template is not None:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION_FIELD}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return {"chat_template": template, "prompt": rendered}


def score(prediction: str, answers: Sequence[str]) -> float:
    """Exact match for a single reference, :func:`vqa_score` for several."""
    return (
        exact_match(prediction, answers[0]) if len(answers) == 1 else vqa_score(prediction, answers)
    )


def answer_budget(tokenizer: Any, items: Sequence[EvalItem]) -> int:
    """The default ``max_new_tokens`` of a question set: its longest reference answer in tokens
    (without special tokens) + 2, so the longest right answer and its end token fit.

    :func:`evaluate` and the lmms-eval task of :mod:`moe_vision.evaluation.lmms_eval` both use
    it, so the two ask with the same budget.
    """
    longest = max(
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) for it in items for a in it.answers
    )
    return longest + 2


def evaluate(
    model: Any,
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    on_bad_record: BadRecordPolicy = "error",
    limit: int | None = None,
    progress: bool = False,
    allow_outside_root: bool = False,
    max_image_pixels: int | None = None,
    cache: FeatureCache | None = None,
) -> EvalResult:
    """Greedy answers of ``model`` to every question of ``json_path``, scored per category.

    Args:
        model: a :class:`~moe_vision.model.mllm.MoEVisionModel` (anything with ``generate(images,
            prompts, max_new_tokens)``, ``tokenizer`` and ``config.image_token``).
        json_path: LLaVA-format file (the benchmark's ``test.json``, or a VQA-style file with
            ``"answers"`` lists) or a mixture YAML; text-only and multi-image questions too.
        image_root: folder of the images.
        batch_size: questions per ``generate`` call.
        max_new_tokens: answer budget; ``None``: :func:`answer_budget` of the questions.
        on_bad_record: ``"error"`` or ``"skip"`` (logged and counted in ``result.skipped``).
        limit: only the first ``limit`` questions.
        progress: show a progress bar.
        allow_outside_root: accept absolute and ``..`` image paths.
        max_image_pixels: pixel limit of image files (``None``: the platform default).
        cache: serve the frozen experts' maps from this feature cache
            (:mod:`~moe_vision.features.cached_maps`; needs a ``MoEVisionModel``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    validator = RecordValidator(
        model.tokenizer,
        model.config.image_token,
        getattr(model, "max_length", None),
        getattr(model, "num_visual_tokens", 0),
        max_image_pixels=max_image_pixels,
        allow_outside_root=allow_outside_root,
    )
    server = CachedMaps(model, cache) if cache is not None else None
    stored = server.is_stored if server is not None and server.serves_every_expert else None
    items, skipped = load_eval_items(
        json_path, image_root, validator, on_bad_record, limit, stored=stored
    )
    if not items:
        raise DataError(f"{json_path}: no questions to evaluate")
    if max_new_tokens is None:
        max_new_tokens = answer_budget(model.tokenizer, items)
    predictions: list[dict[str, Any]] = []
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc=f"eval {Path(json_path).name}", disable=not progress):
        batch = items[start : start + batch_size]
        answers = model.generate(
            [it.generate_images() for it in batch],
            [it.prompt for it in batch],
            max_new_tokens=max_new_tokens,
            **generate_kwargs(server, [p for it in batch for p in it.images]),
        )
        for it, pred in zip(batch, answers):
            predictions.append(
                {
                    "id": it.id,
                    "category": it.category,
                    "prompt": it.prompt,
                    "prediction": pred,
                    "answers": it.answers,
                    "score": (value := score(pred, it.answers)),
                    "correct": value == 1.0,
                }
            )
    if server is not None:
        server.flush()
    result = summarize(predictions, skipped)
    result.prompt_format = prompt_format(model.tokenizer)
    return result


def summarize(
    predictions: list[dict[str, Any]], skipped: list[SkippedRecord] | None = None
) -> EvalResult:
    """Per-category and overall means of the ``score`` of each prediction dict."""
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for p in predictions:
        totals[p["category"]] += p["score"]
        counts[p["category"]] += 1
    per_category = {c: totals[c] / counts[c] for c in sorted(counts)}
    overall = sum(p["score"] for p in predictions) / max(len(predictions), 1)
    result = EvalResult(per_category, overall, predictions, dict(counts), list(skipped or []))
    logger.info("evaluation: overall %.3f, per category %s", overall, per_category)
    return result
