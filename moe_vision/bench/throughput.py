"""Bench section ``throughput``: training speed as a fraction of this machine's peak.

Samples/s of full training steps (forward, backward, AdamW), the achieved FLOP/s (FLOPs of one
forward + backward counted with ``torch.utils.flop_counter.FlopCounterMode``) against this
machine's measured fp32 matmul peak, and peak memory (CUDA: peak allocated; CPU: peak resident
set size), for the default configuration and for one real-size configuration (e.g. CLIP
ViT-L/336 + ConvNeXt-L, random init, batch 1). Each configuration also gets the FLOP share of
the experts' forward in a frozen-expert step and the speed-up bound it implies for the feature
cache, ``1 / (1 - share)`` (rows of section ``feature_cache``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moe_vision.bench.batches import benchmark_batch, to_device
from moe_vision.bench.harness import BenchConfig, bench_row, config_name, register_section
from moe_vision.bench.measure import (
    measure_matmul_peak,
    median_time,
    peak_memory_mb,
    reset_peak_memory,
)
from moe_vision.bench.overhead import mixture_loss

logger = logging.getLogger(__name__)


def train_step_flops(model: Any, batch: dict) -> int:
    """FLOPs of one forward + backward on ``batch`` (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        mixture_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def frozen_expert_flops_share(model: Any, batch: dict) -> float:
    """Share of a frozen-expert training step's FLOPs spent in the experts' forward: what the
    feature cache removes (strategies that drive an expert themselves keep running it)."""
    from torch.utils.flop_counter import FlopCounterMode

    cacheable = [i for i in range(len(model.experts)) if i not in model.fusion.staged_experts()]
    with torch.no_grad(), FlopCounterMode(display=False) as experts_counter:
        maps = {i: model.experts[i](batch["images"][i]) for i in cacheable}
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as rest_counter:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            images=batch["images"],
            precomputed=maps,
        ).loss.backward()
    model.zero_grad(set_to_none=True)
    experts, rest = experts_counter.get_total_flops(), rest_counter.get_total_flops()
    return experts / (experts + rest)


def bench_throughput(
    model_cfg: dict[str, Any],
    batch_size: int,
    steps: int,
    warmup: int,
    peak_flops: float,
    device: torch.device,
    data_root: Path,
    seed: int = 0,
) -> list[dict]:
    """Section 3 for one configuration: every parameter trains (AdamW), ``steps`` timed."""
    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(seed)
    reset_peak_memory(device)
    model = MoEVisionModel.from_config(model_cfg).to(device).train()
    batch = to_device(benchmark_batch(model, batch_size, data_root, seed), device)
    flops = train_step_flops(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        mixture_loss(model, batch).backward()
        optimizer.step()

    share = frozen_expert_flops_share(model, batch)
    seconds = median_time(step, device, steps, warmup)
    achieved = flops / seconds
    name = config_name(model_cfg, batch_size)
    params = sum(p.numel() for p in model.parameters())
    note = (
        f"{params / 1e6:.1f}M params, all trained; {model.num_visual_tokens} visual tokens; "
        f"FLOPs of forward+backward (optimizer not counted)"
    )
    share_note = (
        "FLOP share of the experts' forward in a frozen-expert training step (experts forward "
        "+ fusion/projector/LLM forward and backward); the cache removes it: bound 1/(1-share)"
    )
    rows = [
        bench_row(
            "throughput", name, "samples_per_s", batch_size / seconds, "samples/s", device, note
        ),
        bench_row("throughput", name, "step_s", seconds, "s", device, note),
        bench_row("throughput", name, "flops_per_sample", flops / batch_size, "FLOP", device, note),
        bench_row("throughput", name, "achieved_flops_per_s", achieved, "FLOP/s", device, note),
        bench_row(
            "throughput", name, "matmul_peak_flops_per_s", peak_flops, "FLOP/s", device, note
        ),
        bench_row("throughput", name, "fraction_of_peak", achieved / peak_flops, "x", device, note),
        bench_row(
            "throughput", name, "peak_memory_mb", peak_memory_mb(device), "MiB", device, note
        ),
        bench_row(
            "feature_cache", name, "frozen_expert_flops_share", share, "x", device, share_note
        ),
        bench_row(
            "feature_cache", name, "cache_speedup_bound", 1 / (1 - share), "x", device, share_note
        ),
    ]
    return rows


# ---------------------------------------------------------------------------- the section
def _rescale_to_peak(rows: list[dict], peak: float) -> list[dict]:
    """Set every row's matmul peak to ``peak`` and recompute its fraction of peak."""
    achieved = {r["config"]: r["value"] for r in rows if r["metric"] == "achieved_flops_per_s"}
    for r in rows:
        if r["metric"] == "matmul_peak_flops_per_s":
            r["value"] = float(peak)
        elif r["metric"] == "fraction_of_peak":
            r["value"] = achieved[r["config"]] / peak
    return rows


@register_section("throughput")
def bench_throughput_section(cfg: BenchConfig, dev: torch.device, work: Path) -> list[dict]:
    """Training throughput of the default and the real-size configuration, as a fraction of
    this device's measured matmul peak."""
    peak = measure_matmul_peak(cfg.matmul_size, dev)
    configs = [(cfg.model, cfg.batch_size, cfg.repeats)]
    if cfg.real_model is not None:
        configs.append((cfg.real_model, cfg.real_batch_size, cfg.real_steps))
    found = []
    for model_cfg, batch, steps in configs:
        logger.info("bench: throughput of %s", config_name(model_cfg, batch))
        found += bench_throughput(model_cfg, batch, steps, 1, peak, dev, work, cfg.seed)
    # The peak is the best of a measurement before and one after the runs (a shared
    # machine's load drifts); the fractions are recomputed against it.
    peak = max(peak, measure_matmul_peak(cfg.matmul_size, dev))
    return _rescale_to_peak(found, peak)
