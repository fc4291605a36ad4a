"""The metrics row of a finished run, and the costs it reports.

:func:`metrics_row` assembles the row :func:`~moe_vision.experiment.run.run_experiment` writes to
``metrics.json`` (its keys are listed in :mod:`moe_vision.experiment.run`): the evaluation's
accuracies, parameter counts, visual tokens, training time and throughput, peak memory
(:func:`peak_memory_mb`), forward FLOPs per sample (:func:`flops_per_sample`, counted without
running the experts the feature cache serves), the training loop's timings, skipped records,
cache hits and final losses.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys
from typing import TYPE_CHECKING, Any

import torch

from experts import FeatureMap
from moe_vision.data.llava import LlavaDataset
from moe_vision.features.cache import FeatureCache
from moe_vision.model import adapters
from moe_vision.model.mllm import MoEVisionModel
from moe_vision.training.trainer import Trainer
from moe_vision.training.units import UnitReport

if TYPE_CHECKING:
    from moe_vision.evaluation.evaluate import EvalResult
    from moe_vision.experiment.run_config import DatasetCache

logger = logging.getLogger(__name__)


def metrics_row(
    result: EvalResult,
    model: MoEVisionModel,
    trainer: Trainer,
    reports: list[UnitReport],
    datasets: DatasetCache,
    cache: FeatureCache | None,
    eval_time: float,
) -> dict[str, Any]:
    """The metrics row of a finished run (see :mod:`moe_vision.experiment.run` for its keys).

    Args:
        result: the evaluation of ``model`` on the run's evaluation split.
        model: the trained mixture.
        trainer: the trainer that trained it (its state, loop timings, recipe and device).
        reports: the trainer's unit reports.
        datasets: the run's datasets (the last stage's counts FLOPs; skipped records).
        cache: the run's feature cache (``None``: none).
        eval_time: seconds the evaluation took.
    """
    state = trainer.state
    flops_data = trainer.recipe.stages[-1].data
    metrics = dict(result.to_metrics())  # accuracies with 95% intervals and counts
    counts = adapters.count_parameters(model)  # LoRA adapters counted; 4-bit weights unpacked
    metrics["params_total"] = counts["total"]
    metrics["params_adapter"] = counts["adapter"]
    metrics["params_trainable"] = max(r.params_trainable for r in reports)
    for r in reports:
        metrics[f"params_trainable/{r.unit}"] = r.params_trainable
    metrics["visual_tokens"] = int(model.num_visual_tokens)
    metrics["train_time_s"] = round(state.train_time_s, 3)
    metrics["throughput_samples_s"] = (
        state.samples_seen / state.train_time_s if state.train_time_s > 0 else None
    )
    metrics["peak_memory_mb"] = round(peak_memory_mb(trainer.accelerator.device), 1)
    metrics["flops_per_sample"] = flops_per_sample(model, datasets(flops_data, model))
    metrics["eval_time_s"] = round(eval_time, 3)
    for name, seconds in dataclasses.asdict(trainer.timings).items():  # this process's loop
        metrics[f"time/{name}"] = round(seconds, 3)
    metrics["eval_samples"] = len(result.predictions)
    metrics["nonfinite_skipped"] = state.nonfinite_skipped
    metrics["skipped_records"] = datasets.skipped + len(result.skipped)
    metrics["skipped_records/train"] = datasets.skipped
    metrics["skipped_records/eval"] = len(result.skipped)
    metrics["cache_hits"] = cache.hits if cache is not None else 0
    metrics["cache_misses"] = cache.misses if cache is not None else 0
    for r in reports:
        metrics[f"final_loss/{r.unit}"] = r.final_loss
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def flops_per_sample(model: MoEVisionModel, dataset: LlavaDataset, n: int = 2) -> float | None:
    """Forward FLOPs of one sample (``torch.utils.flop_counter`` over ``n`` samples).

    The experts the fusion does not drive are counted on ``meta``-device twins (same spec, no
    weights, nothing computed), and the rest of the model reads zero maps of their shapes: a
    run whose experts are served from the feature cache never runs them for this metric.
    Attention is counted through PyTorch's math backend (the counter has no formula for the
    fused CPU kernel, so it would leave attention out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    try:
        batch = dataset.collate([dataset[i] for i in range(min(n, len(dataset)))])
        dev = model.device
        images = batch["images"]
        math = sdpa_kernel(SDPBackend.MATH)
        with torch.no_grad(), math, FlopCounterMode(display=False) as counter:
            precomputed = _meta_expert_maps(model, images, dev) if images is not None else None
            if images is not None:
                images = [
                    {} if i in precomputed else {k: v.to(dev) for k, v in x.items()}
                    for i, x in enumerate(images)
                ]
            model(
                input_ids=batch["input_ids"].to(dev),
                attention_mask=batch["attention_mask"].to(dev),
                images=images,
                precomputed=precomputed or None,
            )
        return counter.get_total_flops() / len(batch["ids"])
    except Exception as err:  # noqa: BLE001 - a metric must not fail a finished run
        logger.warning("could not count FLOPs: %s", err)
        return None


def _meta_expert_maps(
    model: MoEVisionModel, images: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[int, FeatureMap]:
    """Expert index -> zero map of the shape its ``meta`` twin outputs (FLOPs counted by the
    enclosing counter), for the experts the fusion does not drive."""
    staged = set(model.fusion.staged_experts())
    out = {}
    for i, expert in enumerate(model.experts):
        if i in staged:
            continue
        try:
            with torch.device("meta"):
                twin = type(expert)(expert.spec.replace(checkpoint=None))
            fmap = twin({k: v.to("meta") for k, v in images[i].items()})
        except (NotImplementedError, RuntimeError) as err:  # an op without a meta kernel
            logger.debug("FLOPs of %s counted on the expert itself: %s", expert.spec.name, err)
            continue
        if fmap.thumbnail is not None:  # tiled with a thumbnail: counted on the real expert
            continue
        out[i] = FeatureMap(
            torch.zeros(fmap.features.shape, device=device),
            fmap.stride,
            fmap.source,
            None if fmap.mask is None else torch.ones_like(fmap.mask, device=device),
        )
    return out
