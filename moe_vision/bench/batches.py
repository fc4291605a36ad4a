"""Training batches for the bench sections, from the built-in benchmark.

:func:`benchmark_batch` generates a small benchmark and reads the first instruction samples of
it for a model (its preprocessors, tokenizer and length limit), :func:`instruct_batch` does the
reading for a benchmark already generated, and :func:`to_device` moves a collated batch to a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def benchmark_batch(model: Any, batch_size: int, data_root: Path, seed: int = 0) -> dict:
    """A training batch of ``batch_size`` instruction samples from the built-in benchmark."""
    from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark

    n = max(batch_size, 6)
    sizes = BenchmarkSizes(align=n, instruct=n, val=6, test=6)
    bench = generate_benchmark(data_root / f"bench-{seed}-{n}", seed=seed, sizes=sizes)
    return instruct_batch(model, bench, batch_size)


def instruct_dataset(model: Any, bench: Any) -> Any:
    """``bench``'s instruct split as a ``LlavaDataset`` read for ``model`` (its preprocessors,
    tokenizer and length limit)."""
    from moe_vision.data.llava import LlavaDataset

    return LlavaDataset.for_model(bench.split("instruct"), bench.images, model)


def instruct_batch(model: Any, bench: Any, batch_size: int) -> dict:
    """The first ``batch_size`` records of ``bench``'s instruct split, read for ``model`` and
    collated."""
    ds = instruct_dataset(model, bench)
    return ds.collate([ds[i] for i in range(batch_size)])


def to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key].to(device)
    out["images"] = [{k: v.to(device) for k, v in x.items()} for x in batch["images"]]
    return out
