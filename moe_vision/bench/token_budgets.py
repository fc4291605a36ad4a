"""Bench section ``token_budgets``: what a visual-token budget saves in the LLM's prefill.

The bench's default tiny configuration (``BenchConfig.model``) with ``model.token_budget``
(:mod:`fusion.reducers.budget`) at 100% (no budget), 50%, 25% and 12.5% of its visual tokens,
for each reducer in :data:`REDUCERS`, on one batch of the built-in benchmark. Per budget:
``visual_tokens`` (per image), ``prefill_flops_per_sample`` (the inference forward, experts to
logits, ``FlopCounterMode``), ``prefill_time_per_sample_s`` and ``train_step_time_per_sample_s``
(medians of ``cfg.repeats`` after ``cfg.warmup``; forward + backward for the step). Rows are
yielded as they are measured.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_vision.bench.batches import benchmark_batch
from moe_vision.bench.harness import BenchConfig, bench_row, register_section

logger = logging.getLogger(__name__)

FRACTIONS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
REDUCERS: tuple[str, ...] = ("tome", "visionzip", "text_guided", "in_order")


def _median_seconds(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int
) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _on(batch: dict, device: torch.device) -> dict:
    out = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    out["images"] = [{k: v.to(device) for k, v in x.items()} for x in batch["images"]]
    return out


def budget_rows(
    reducer: str, fraction: float, cfg: BenchConfig, device: torch.device, work: Path
) -> list[dict]:
    """The rows of one budget (module docstring)."""
    from moe_vision.model.mllm import MoEVisionModel

    model_cfg = copy.deepcopy(cfg.model)
    if fraction < 1:
        model_cfg["token_budget"] = {"reducer": reducer, "fraction": fraction}
    torch.manual_seed(cfg.seed)
    model = MoEVisionModel.from_config(model_cfg).to(device)
    b = cfg.batch_size
    batch = _on(benchmark_batch(model, b, work, cfg.seed), device)

    def prefill() -> None:
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"], images=batch["images"])

    def step() -> None:
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        prefill()
    prefill_s = _median_seconds(prefill, device, cfg.repeats, cfg.warmup)
    model.train()
    step_s = _median_seconds(step, device, cfg.repeats, cfg.warmup)
    name = f"{reducer} {fraction:g}" if fraction < 1 else "full"
    note = f"{'+'.join(model.config.experts)} {model.config.fusion}; batch {b}"
    return [
        bench_row(
            "token_budgets", name, "visual_tokens", model.num_visual_tokens, "tokens", device, note
        ),
        bench_row(
            "token_budgets",
            name,
            "prefill_flops_per_sample",
            counter.get_total_flops() / b,
            "FLOP",
            device,
            note,
        ),
        bench_row(
            "token_budgets", name, "prefill_time_per_sample_s", prefill_s / b, "s", device, note
        ),
        bench_row(
            "token_budgets", name, "train_step_time_per_sample_s", step_s / b, "s", device, note
        ),
    ]


@register_section("token_budgets")
def bench_token_budgets(cfg: BenchConfig, device: torch.device, work: Path) -> Iterator[dict]:
    """Visual tokens, prefill FLOPs and times per budget and reducer (100% once)."""
    for reducer in REDUCERS:
        for fraction in FRACTIONS:
            if fraction == 1.0 and reducer != REDUCERS[0]:
                continue  # 100% is the same model for every reducer
            logger.info("bench: token_budgets, %s at %g", reducer, fraction)
            yield from budget_rows(reducer, fraction, cfg, device, work)
