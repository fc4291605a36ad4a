"""Greedy answers of the multimodal LLM to a batch of single-turn prompts with images.

Each prompt is rendered with the chat template, the batch is left padded, its images are loaded
and preprocessed for the experts that are not served by cached maps, and the LLM generates from
the spliced embeddings (:func:`moe_vision.model.image_tokens.splice_visual_tokens`), stopping at
the tokenizer's and the generation config's end-of-sequence ids. The model's entry point is
:meth:`moe_vision.model.mllm.MoEVisionModel.generate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from experts import ExpertInputs, FeatureMap, collate_inputs

if TYPE_CHECKING:
    from moe_vision.model.mllm import MoEVisionModel

ImageLike = Image.Image | str | os.PathLike
"""One image for :meth:`MoEVisionModel.generate`: a PIL image or a path."""


def image_list(images: Any) -> list:
    """A prompt's images as a list (``None``: none; a path or PIL image: one)."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor)):
        return [images]
    return list(images)


def left_padded(ids: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``B`` prompts padded on the left to the longest, ``T``: ``input_ids (B, T)``
    and ``attention_mask (B, T)`` (0 on the padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, attention


def stop_token_ids(model: MoEVisionModel) -> list[int]:
    """The tokenizer's end-of-sequence id and those of the LLM's generation config, sorted."""
    eos = {int(model.tokenizer.eos_token_id)}
    configured = model.llm.generation_config.eos_token_id
    eos |= set(
        configured
        if isinstance(configured, list)
        else [configured]
        if configured is not None
        else []
    )
    return sorted(eos)


def expert_inputs(
    model: MoEVisionModel, images: list, run: list[int], load: Callable[[Any], Image.Image]
) -> list[ExpertInputs]:
    """One batched input dict per expert on the model's device for the ``M`` ``images``:
    ``(M, ...)`` tensors for the experts in ``run``, ``{}`` for the others (no image is loaded
    when ``run`` is empty). ``load``: path or PIL image to a PIL image."""
    pil = [load(im) for im in images] if run else []
    return [
        {k: v.to(model.device) for k, v in collate_inputs([pre(im) for im in pil]).items()}
        if i in run
        else {}
        for i, pre in enumerate(model.preprocessors)
    ]


def greedy_answers(
    model: MoEVisionModel,
    images: Sequence[ImageLike | Sequence[ImageLike] | None],
    prompts: Sequence[str],
    max_new_tokens: int,
    precomputed: Mapping[int, FeatureMap] | None,
    load: Callable[[Any], Image.Image],
    **generate_kwargs: Any,
) -> list[str]:
    """:meth:`MoEVisionModel.generate <moe_vision.model.mllm.MoEVisionModel.generate>` (see
    there for the arguments); ``load`` reads one image (a path or a PIL image)."""
    if len(images) != len(prompts):
        raise ValueError(f"generate: {len(images)} images but {len(prompts)} prompts")
    if not prompts:
        return []
    per_prompt = [image_list(im) for im in images]
    ids = [model.prompt_ids(p, len(ims)) for p, ims in zip(prompts, per_prompt)]
    pad = int(model.tokenizer.pad_token_id)
    input_ids, attention = left_padded(ids, pad)
    flat = [im for ims in per_prompt for im in ims]
    precomputed = dict(precomputed or {})
    run = [i for i in range(len(model.experts)) if i not in precomputed]
    inputs = expert_inputs(model, flat, run, load)
    was_training = model.training
    model.eval()
    try:
        embeds, mask, _ = model.embed_inputs(
            input_ids.to(model.device),
            attention.to(model.device),
            images=inputs if run else None,
            precomputed=precomputed,
            pad_left=True,
        )
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop_token_ids(model),
            **generate_kwargs,
        )
    finally:
        model.train(was_training)
    return [s.strip() for s in model.tokenizer.batch_decode(out, skip_special_tokens=True)]
