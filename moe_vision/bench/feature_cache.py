"""Bench section ``feature_cache``: frozen-expert sweeps, cached against uncached, in one run.

Section 2 of ``moe-vision bench`` (see :mod:`moe_vision.bench`). A frozen-expert sweep
(``llava`` recipe: experts frozen in every stage) over several fusion strategies runs twice in this
process, without and with the feature cache (:mod:`moe_vision.features.cache`, a fresh folder the
cached sweep fills). Ratios (:func:`cache_ratios`), uncached time over cached time:

* ``speedup``: the whole sweep's wall time (training, the cache fill, evaluation, everything);
* ``train_speedup_with_fill``: the cells' training time with the cache fill counted (the
  precompute walks before each stage, ``time/precompute_s``, added to the cached cells'
  ``train_time_s``): what a user waits for;
* ``train_speedup_fill_excluded``: the cells' training time alone, the cached clock started
  after the fill (an upper bound: with ``u`` uses per map and a fill that costs one use it
  cannot pass ``u``, the fill-counted ratio can).

Twice: with the default tiny experts, where the LLM dominates a step
and the cache can win little, and with real-size randomly initialised experts (CLIP ViT-L/336 +
ConvNeXt-L/320 by default) on 24 training images, where the experts are >99% of a frozen-expert
step's FLOPs. With the cache, every image's maps are computed once (before the first stage
that needs them, :mod:`moe_vision.features.precompute`; the test images' at the first
evaluation, :mod:`moe_vision.features.cached_maps`) and read back by every later stage, epoch,
fusion and evaluation; without it, every step and every evaluation runs the experts.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_vision import results
from moe_vision.bench.harness import BenchConfig, bench_row, register_section

logger = logging.getLogger(__name__)


def frozen_expert_sweep(
    model_cfg: dict[str, Any],
    fusions: Sequence[Any],
    sizes: dict[str, int],
    run_options: dict[str, Any],
    device: torch.device,
    work: Path,
    seed: int = 0,
) -> list[dict]:
    """One frozen-expert sweep (``llava`` recipe: experts frozen in every stage) over
    ``fusions``, run uncached then cached (a fresh cache that the cached sweep fills), in this
    process; rows: both wall times, their ratio, and the ratio of the cells' training times."""
    from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
    from moe_vision.sweeps.spec import SweepSpec
    from moe_vision.sweeps.sweep import run_sweep

    tag = "-".join(model_cfg["experts"])
    data_dir = work / f"cache-bench-data-{tag}"
    generate_benchmark(data_dir, seed=seed, sizes=BenchmarkSizes(**sizes))
    walls, frames = {}, {}
    for mode, use_cache in (("uncached", False), ("cached", True)):
        run = copy.deepcopy(run_options)
        data = {"benchmark_dir": str(data_dir), "benchmark_sizes": sizes, **run.pop("data", {})}
        run.setdefault("train", {})["use_feature_cache"] = use_cache
        run["cache_dir"] = str(work / f"features-{tag}-{mode}")  # fresh: the cached sweep fills it
        spec = SweepSpec.from_dict(
            {
                "name": f"cache-{mode}",
                "experts": [model_cfg["experts"]],
                "fusions": list(fusions),
                "recipes": ["llava"],  # experts frozen in every stage
                "seeds": [seed],
                "model": {k: v for k, v in model_cfg.items() if k not in ("experts", "fusion")},
                "data": data,
                "run": run,
                "executor": {"kind": "inline"},
            }
        )
        start = time.perf_counter()
        df = run_sweep(spec, work / f"sweep-{tag}-{mode}", progress=False)
        walls[mode] = time.perf_counter() - start
        failed = df[df["status"] != results.STATUS_OK]
        if len(failed):
            raise RuntimeError(f"feature-cache benchmark: cells failed: {list(failed['error'])}")
        frames[mode] = df
    cached = frames["cached"]
    hits = int(cached["cache_hits"].sum()) if "cache_hits" in cached else 0
    misses = int(cached["cache_misses"].sum()) if "cache_misses" in cached else 0
    name = f"{'+'.join(model_cfg['experts'])} x {len(fusions)} fusions, llava"
    note = (
        f"fusions {list(fusions)}; sizes {sizes}; stages {run_options.get('overrides')}; "
        f"cache hits {hits}/{hits + misses}; sweep: evaluation included (cached in the cached "
        "sweep); train: the cells' train_time_s, plus the cache fill (precompute_s) where named"
    )
    return [
        bench_row("feature_cache", name, metric, value, unit, device, note)
        for metric, (value, unit) in cache_ratios(frames, walls).items()
    ]


def cache_ratios(
    frames: dict[str, pd.DataFrame], walls: dict[str, float]
) -> dict[str, tuple[float, str]]:
    """Times and ratios of an uncached and a cached sweep (see the module docstring).

    Args:
        frames: ``"uncached"`` / ``"cached"`` -> the sweep's results (``train_time_s`` and,
            where a cell filled the cache, ``time/precompute_s`` per cell).
        walls: ``"uncached"`` / ``"cached"`` -> the sweep's wall time.

    Returns:
        metric -> ``(value, unit)``.
    """

    def total(mode: str, column: str) -> float:
        df = frames[mode]
        return float(df[column].fillna(0).sum()) if column in df else 0.0

    train = {m: total(m, "train_time_s") for m in frames}
    fill = {m: total(m, "time/precompute_s") for m in frames}
    with_fill = {m: train[m] + fill[m] for m in frames}
    return {
        "uncached_sweep_s": (walls["uncached"], "s"),
        "cached_sweep_s": (walls["cached"], "s"),
        "speedup": (walls["uncached"] / walls["cached"], "x"),
        "uncached_train_s": (with_fill["uncached"], "s"),
        "cache_fill_s": (fill["cached"], "s"),
        "cached_train_with_fill_s": (with_fill["cached"], "s"),
        "cached_train_fill_excluded_s": (train["cached"], "s"),
        "train_speedup_with_fill": (with_fill["uncached"] / max(with_fill["cached"], 1e-9), "x"),
        "train_speedup_fill_excluded": (with_fill["uncached"] / max(train["cached"], 1e-9), "x"),
    }


def read_vs_compute(
    model_cfg: dict[str, Any], device: torch.device, work: Path, reads: int = 20
) -> list[dict]:
    """Per image and expert of ``model_cfg``: the frozen expert's forward against reading its
    map back from a written, memory-mapped cache shard (``FeatureCache.maps`` on hits).

    The first forward is warm-up; the second is timed. This is the cache's per-use saving; a
    sweep's ratio follows from how often each map is used (fusions x stages x epochs).
    """
    from PIL import Image

    import experts
    from moe_vision.features.cache import FeatureCache
    from moe_vision.features.cache_keys import expert_cache_key

    image = Image.new("RGB", (640, 480), (120, 30, 200))
    rows = []
    for name in model_cfg["experts"]:
        torch.manual_seed(0)
        options = (model_cfg.get("expert_options") or {}).get(name, {})
        expert = experts.create_expert(name, **options).to(device).eval()
        inputs = {k: v.to(device) for k, v in expert.preprocess([image]).items()}
        key = expert_cache_key(expert)
        with torch.no_grad():
            expert(inputs)
            start = time.perf_counter()
            fmap = expert(inputs)
            compute = time.perf_counter() - start
        writer = FeatureCache(work / f"read-vs-compute-{name}", policy="always")
        writer.put(key, "image-0", fmap)
        writer.flush()
        reader = FeatureCache(work / f"read-vs-compute-{name}", policy="always")
        reader.maps(expert, key, inputs, ["image-0"], device)  # opens the shard (memory map)
        start = time.perf_counter()
        for _ in range(reads):
            reader.maps(expert, key, inputs, ["image-0"], device)
        read = (time.perf_counter() - start) / reads
        note = (
            f"{name}: one image, grid {tuple(fmap.features.shape[1:])}; forward (second call) vs "
            f"FeatureCache.maps on a hit from a memory-mapped shard, mean of {reads}"
        )

        def row(metric: str, value: float, unit: str, note: str = note, name: str = name) -> dict:
            return bench_row("feature_cache", f"{name} (frozen)", metric, value, unit, device, note)

        rows += [
            row("expert_forward_s_per_image", compute, "s"),
            row("cache_read_s_per_image", read, "s"),
            row("read_speedup", compute / read, "x"),
        ]
    return rows


@register_section("feature_cache")
def bench_feature_cache(cfg: BenchConfig, device: torch.device, work: Path) -> list[dict]:
    """Section 2: frozen-expert sweeps, cached vs uncached: the default (tiny) experts over
    ``cfg.cache_fusions``, and real-size randomly initialised experts
    (``cfg.cache_real_model``) over ``cfg.cache_real_fusions`` on a few dozen images, with their
    per-image forward against a cache read (:func:`read_vs_compute`)."""
    rows = frozen_expert_sweep(
        cfg.model, cfg.cache_fusions, cfg.cache_sizes, cfg.cache_run, device, work, cfg.seed
    )
    if cfg.cache_real_model is not None:
        logger.info("bench: real-size feature cache (%s)", cfg.cache_real_model["experts"])
        rows += read_vs_compute(cfg.cache_real_model, device, work)
    if cfg.cache_real_model is not None and cfg.cache_real_sweep:
        rows += frozen_expert_sweep(
            cfg.cache_real_model,
            cfg.cache_real_fusions,
            cfg.cache_real_sizes,
            cfg.cache_real_run,
            device,
            work,
            cfg.seed,
        )
    return rows
