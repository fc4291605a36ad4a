"""lmms-eval adapter: evaluate a trained run on lmms-eval's benchmarks (TextVQA, DocVQA, MME...).

`lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ (Zhang et al., "LMMs-Eval: Reality
Check on the Evaluation of Large Multimodal Models", 2024) finds model classes through the
entry-point group ``lmms_eval.models``; ``pyproject.toml`` registers :class:`MoEVisionLMM` there
as ``moe_vision`` (:func:`manifest`), so after ``pip install 'moe-vision[eval]'``::

    lmms-eval --model moe_vision --model_args run=runs/x,device=cuda \\
        --tasks textvqa_val --batch_size 16

``run`` is a run folder written by ``moe-vision train`` (its ``model/`` is loaded with
:meth:`~moe_vision.model.mllm.MoEVisionModel.from_pretrained`: safetensors and JSON only) or a
``model/`` folder itself.

* ``generate_until``: greedy answers (beam search via ``num_beams``; a task that asks for
  sampling is refused), cut at the task's ``until`` strings. Requests are batched in the order
  lmms-eval gives them (consecutive requests with the same generation settings share a batch),
  which is also :func:`~moe_vision.evaluation.evaluate.evaluate`'s order, so the two ask the
  model identical batches. A prompt without ``<image>`` gets one placeholder per image in
  front, as lmms-eval's LLaVA models do.
* ``loglikelihood`` (multiple-choice tasks): ``log p(continuation | prompt, images)`` from one
  batched forward, the prompt rendered by the chat template as in generation; ``is_greedy``
  when every continuation token is the argmax.
* ``generate_until_multi_round`` is not implemented (use the tasks' single-round variants).

Images only: a task that hands over video or audio gets a ``NotImplementedError`` naming it.
One process: under ``accelerate launch`` with several processes this class refuses to start.

:func:`write_task` turns any LLaVA-format evaluation file (the built-in benchmark's test split
included) into a local lmms-eval task folder for ``--include_path``, asking exactly the
questions :func:`~moe_vision.evaluation.evaluate.evaluate` asks, with the same answer budget
and the same scoring (:func:`process_results`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "moe_vision.evaluation.lmms_eval needs lmms-eval: pip install 'moe-vision[eval]'"
    ) from err

from experts.base import collate_inputs
from experts.images import load_image
from moe_vision.data.records import BadRecordPolicy
from moe_vision.data.validation import RecordValidator
from moe_vision.evaluation.evaluate import answer_budget, load_eval_items, score
from moe_vision.io import atomic_write
from moe_vision.model.mllm import MoEVisionModel

logger = logging.getLogger(__name__)

MODEL_NAME = "moe_vision"
IGNORE_INDEX = -100


def manifest() -> Any:
    """The entry point of group ``lmms_eval.models``: ``moe_vision`` -> :class:`MoEVisionLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME, simple_class_path=f"{__name__}.{MoEVisionLMM.__name__}"
    )


def model_dir(run: str | os.PathLike[str]) -> Path:
    """The ``model/`` folder of a run folder (or ``run`` itself when it is one)."""
    root = Path(run)
    for candidate in (root / "model", root):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(
        f"{root} is neither a run folder with model/ nor a model folder (looked for "
        f"{root / 'model' / 'config.json'} and {root / 'config.json'} with model.safetensors)"
    )


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


class MoEVisionLMM(lmms):
    """A trained mixture-of-vision-experts run as an lmms-eval model (see the module docstring).

    Args:
        run: run folder (or its ``model/`` folder).
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available).
        batch_size: requests per ``generate`` / forward call.
        max_new_tokens: answer budget when a task does not set one.
    """

    def __init__(
        self,
        run: str,
        device: str | None = None,
        batch_size: int | str | None = 8,
        max_new_tokens: int = 128,
        max_batch_size: int | None = None,  # passed by lmms-eval for --batch_size auto
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError(
                "moe_vision runs lmms-eval in one process; launch without several processes"
            )
        if batch_size is None:
            batch_size = 8
        if str(batch_size).startswith("auto"):
            raise ValueError("moe_vision needs a numeric --batch_size, got 'auto'")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MoEVisionModel.from_pretrained(model_dir(run), device=device).eval()
        self.image_token = self.model.config.image_token
        logger.info("lmms-eval model %s from %s on %s", MODEL_NAME, run, device)

    # ------------------------------------------------------------------ requests
    def _doc_visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(
                    f"task {task!r} gives a {type(v).__name__} visual; moe_vision takes images "
                    "only (no video or audio)"
                )
        return visuals

    def _prompt(self, context: str, num_images: int) -> str:
        """The user turn: the task's text, with one placeholder per image in front if it has
        none (benchmarks like MME do not place them)."""
        if num_images and self.image_token not in context:
            return "\n".join([self.image_token] * num_images + [context])
        return context

    def _generation(self, gen_kwargs: dict[str, Any]) -> tuple[int, list[str], dict[str, Any]]:
        """``(max_new_tokens, until, extra generate kwargs)``; sampling is refused."""
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = gen.pop("do_sample", None)
        temperature = float(gen.pop("temperature", 0) or 0)
        if do_sample or (do_sample is None and temperature > 0):
            raise ValueError(
                f"moe_vision decodes greedily; the task asks for sampling (do_sample={do_sample}, "
                f"temperature={temperature})"
            )
        gen.pop("top_p", None)
        gen.pop("top_k", None)
        max_new = int(gen.pop("max_new_tokens", None) or self.max_new_tokens)
        extra = {}
        beams = int(gen.pop("num_beams", 1) or 1)
        if beams > 1:
            extra["num_beams"] = beams
        if gen:
            logger.warning("moe_vision ignores generation settings %s", sorted(gen))
        return max_new, until, extra

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> str:
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched in request order (see the module docstring)."""
        answers: list[str] = []
        args = [r.args for r in requests]
        bar = tqdm(total=len(args), desc="moe_vision generate", disable=self.rank != 0)
        start = 0
        while start < len(args):
            key = json.dumps(args[start][1], sort_keys=True, default=str)
            end = start + 1
            while (
                end < len(args)
                and end - start < self.batch_size
                and json.dumps(args[end][1], sort_keys=True, default=str) == key
            ):
                end += 1
            chunk = args[start:end]
            max_new, until, extra = self._generation(chunk[0][1])
            images, prompts = [], []
            for context, _, doc_to_visual, doc_id, task, split in chunk:
                visuals = self._doc_visuals(doc_to_visual, doc_id, task, split)
                images.append(visuals[0] if len(visuals) == 1 else (visuals or None))
                prompts.append(self._prompt(context, len(visuals)))
            outs = self.model.generate(images, prompts, max_new_tokens=max_new, **extra)
            for (context, gen_kwargs, *_), out in zip(chunk, outs):
                out = self._cut(out, until)
                answers.append(out)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out)
            bar.update(len(chunk))
            start = end
        bar.close()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt, images), is_greedy)`` per request, batched."""
        rows = []
        for req in requests:
            if len(req.args) == 2:  # unconditional ("", continuation)
                context, target, visuals = req.args[0], req.args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                target = target if isinstance(target, str) else target(doc)
                visuals = self._doc_visuals(doc_to_visual, doc_id, task, split)
            rows.append((self._prompt(context, len(visuals)), target, visuals))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(rows), desc="moe_vision loglikelihood", disable=self.rank != 0)
        for start in range(0, len(rows), self.batch_size):
            results.extend(self._loglikelihood_batch(rows[start : start + self.batch_size]))
            bar.update(min(self.batch_size, len(rows) - start))
        bar.close()
        return results

    def _loglikelihood_batch(
        self, rows: list[tuple[str, str, list[Image.Image]]]
    ) -> list[tuple[float, bool]]:
        model, tok = self.model, self.model.tokenizer
        ids, labels = [], []
        for prompt, continuation, visuals in rows:
            prefix = model.prompt_ids(prompt, len(visuals))
            cont = list(tok(continuation, add_special_tokens=False)["input_ids"])
            ids.append(prefix + cont)
            labels.append([IGNORE_INDEX] * len(prefix) + cont)
        width = max(len(x) for x in ids)
        pad = int(tok.pad_token_id)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # (B, T)
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        label_ids = torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels])
        pil = [load_image(im) for _, _, visuals in rows for im in visuals]
        device = model.device
        visual = None
        if pil:
            inputs = [
                {k: v.to(device) for k, v in collate_inputs([pre(im) for im in pil]).items()}
                for pre in model.preprocessors
            ]
            visual = model.encode_images(inputs)  # (M, N, D)
        embeds, mask, spliced = model.splice(
            input_ids.to(device), visual, attention.to(device), label_ids.to(device)
        )
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits.float()  # (B, L, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = spliced[:, 1:]  # token at position p+1 is predicted at p
        out = []
        for i in range(len(rows)):
            where = targets[i] != IGNORE_INDEX
            if not bool(where.any()):
                out.append((0.0, True))
                continue
            tokens = targets[i][where]
            lp = logprobs[i][where].gather(-1, tokens[:, None]).sum()
            greedy = bool((logprobs[i][where].argmax(-1) == tokens).all())
            out.append((float(lp), greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "moe_vision implements generate_until and loglikelihood; multi-round tasks are not "
            "supported (use their single-round variants)"
        )


# ------------------------------------------------------------------ local tasks
def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The images of a :func:`write_task` row (RGB, checked like every image of the platform)."""
    return [load_image(path) for path in doc["images"]]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The question, placeholders included (as :func:`~.evaluate.evaluate` asks it)."""
    return doc["prompt"]


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answers"][0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match or VQA score, exactly as :func:`~.evaluate.evaluate` scores."""
    return {"accuracy": score(results[0], doc["answers"])}


_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: []
  do_sample: false
  num_beams: 1
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
"""

_TASK_UTILS = '''"""lmms-eval task functions of a moe-vision evaluation file (from write_task)."""

from moe_vision.evaluation.lmms_eval import (  # noqa: F401
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    process_results,
)
'''


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def write_task(
    model: MoEVisionModel,
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    task: str = "moe_vision_eval",
    on_bad_record: BadRecordPolicy = "error",
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> Path:
    """Write a local lmms-eval task (``<task>.yaml``, ``utils.py``, ``<task>.jsonl``) that asks
    the questions of ``json_path`` as :func:`~moe_vision.evaluation.evaluate.evaluate` would.

    The records go through the same validation as evaluation (``model``'s tokenizer and
    visual tokens), and ``max_new_tokens`` defaults to evaluate's
    (:func:`~moe_vision.evaluation.evaluate.answer_budget`). Use it with
    ``lmms-eval --include_path out_dir --tasks task``. Returns the folder.
    """
    validator = RecordValidator(
        model.tokenizer,
        model.config.image_token,
        getattr(model, "max_length", None),
        getattr(model, "num_visual_tokens", 0),
    )
    items, _ = load_eval_items(json_path, image_root, validator, on_bad_record, limit)
    if max_new_tokens is None:
        max_new_tokens = answer_budget(model.tokenizer, items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task}.jsonl"
    rows = [
        {
            "id": it.id,
            "images": [str(Path(p).resolve()) for p in it.images],
            "prompt": it.prompt,
            "answers": it.answers,
            "category": it.category,
        }
        for it in items
    ]
    _write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
    _write_text(out / "utils.py", _TASK_UTILS)
    yaml_text = _TASK_YAML.format(
        task=task,
        data=json.dumps(str(data.resolve())),
        max_new_tokens=int(max_new_tokens),
        source=json.dumps(str(json_path)),
    )
    _write_text(out / f"{task}.yaml", yaml_text)
    logger.info("lmms-eval task %r: %d questions in %s", task, len(rows), out)
    return out
