"""Bench section ``gpu``: the GPU path at real size (samples/s, MFU, peak memory, data pipeline).

An Eagle-like configuration (Shi et al., 2024, Eagle-X2: CLIP ViT-L at 448 px + ConvNeXt-XXL at
1024 px, channel concatenation on a 32x32 grid = 1024 visual tokens) with random weights and the
largest Llama/Qwen2 *shape* of :data:`LLM_SHAPES` that trains on this GPU (tried from the
largest down; a shape that runs out of memory is dropped). Every parameter trains (Eagle's SFT
stage), AdamW, bf16 autocast, gradient checkpointing in the LLM. Reported:

* ``samples_per_s`` and ``step_s`` of whole training steps (forward, backward, optimiser);
* ``mfu``: forward + backward FLOPs (``FlopCounterMode``) per second against the device's dense
  bf16 peak (:data:`BF16_PEAK` by device name; otherwise the measured bf16 matmul peak, said in
  the note); the measured matmul peak is reported too;
* ``peak_memory_gb``: ``torch.cuda.max_memory_allocated``;
* ``data_samples_per_s``: the data pipeline alone (built-in benchmark images through
  :class:`~moe_vision.data.llava.LlavaDataset`, each expert's preprocessing at its own size in
  the DataLoader workers), to compare with the training rate.

The anchor: Eagle-X5 fine-tunes 1.8M samples in about 24 h on 32 A100s, ~0.65 samples/s per
A100 for a 7B LLM. Without CUDA the section returns one row saying it was skipped.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from moe_vision.bench.batches import _to, benchmark_batch, instruct_dataset
from moe_vision.bench.harness import BenchConfig, bench_row, register_section
from moe_vision.bench.overhead import _mixture_loss

logger = logging.getLogger(__name__)

EAGLE_LIKE: dict[str, Any] = {
    "experts": ["clip-vit-l-336", "convnext-xxl-clip"],
    "expert_options": {"clip-vit-l-336": {"input_size": [448, 448]}},  # Eagle runs CLIP at 448
    "fusion": "channel_concat",  # on CLIP's 32x32 grid: 1024 visual tokens
}
"""The Eagle-like mixture (the LLM comes from :data:`LLM_SHAPES`)."""

LLM_SHAPES: list[tuple[str, str, dict[str, int]]] = [
    ("llama-2-7b", "tiny-llama", dict(hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32)),
    ("qwen2.5-3b", "tiny-qwen2", dict(hidden_size=2048, intermediate_size=11008,
                                      num_hidden_layers=36, num_attention_heads=16,
                                      num_key_value_heads=2)),
    ("qwen2-1.5b", "tiny-qwen2", dict(hidden_size=1536, intermediate_size=8960,
                                      num_hidden_layers=28, num_attention_heads=12,
                                      num_key_value_heads=2)),
    ("qwen2-0.5b", "tiny-qwen2", dict(hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14,
                                      num_key_value_heads=2)),
]  # fmt: skip
"""``(name, tiny preset whose architecture class is used, config of that model's shape)``,
largest first; the tokenizer stays the tiny one (random init: the vocabulary size barely
matters next to the transformer)."""

BF16_PEAK: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}
"""Dense bf16 tensor-core peak FLOP/s by a substring of the device name (vendor data sheets;
SXM parts for H100/H200)."""

GPU_BATCH = 4
GPU_STEPS = 5


def device_bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """The data-sheet dense bf16 peak of ``device`` (``None`` when unknown) and its source."""
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak, f"data sheet ({key})"
    return None, f"unknown device {name!r}"


def measure_bf16_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Best achieved FLOP/s of bf16 ``n x n`` matmuls on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def eagle_like_config(llm: str, options: dict[str, int]) -> dict[str, Any]:
    """:data:`EAGLE_LIKE` with the LLM ``llm`` (a tiny preset) at shape ``options``."""
    return {**EAGLE_LIKE, "llm": llm, "llm_options": {**options, "max_position_embeddings": 4096}}


def train_eagle_like(
    device: torch.device, work: Path, model_cfg: dict[str, Any], batch_size: int, steps: int
) -> dict[str, float]:
    """Time ``steps`` bf16 training steps of ``model_cfg`` (every parameter trains, AdamW,
    gradient checkpointing in the LLM) on ``device``."""
    from torch.utils.flop_counter import FlopCounterMode

    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        model = MoEVisionModel.from_config(model_cfg)
    model.train()
    model.llm.gradient_checkpointing_enable()
    batch = _to(benchmark_batch(model, batch_size, work), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return _mixture_loss(model, batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        loss().backward()
    flops = counter.get_total_flops()
    step()  # optimiser state allocated; warm-up
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    out = {
        "step_s": seconds,
        "flops_per_step": float(flops),
        "params": float(sum(p.numel() for p in model.parameters())),
        "visual_tokens": float(model.num_visual_tokens),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
    }
    return out  # the model and optimiser go with this frame; the caller frees the cache


def data_pipeline_rate(
    work: Path, batch_size: int, batches: int = 20, workers: int | None = None
) -> tuple[float, int]:
    """Samples/s of the Eagle-like model's data pipeline (per-expert preprocessing in
    ``workers`` DataLoader processes); returns ``(samples/s, workers)``."""
    from torch.utils.data import DataLoader

    from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
    from moe_vision.model.mllm import MoEVisionModel

    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    n = batch_size * batches
    with torch.device("meta"):  # preprocessors and tokenizer only: no weights needed
        model = MoEVisionModel.from_config(
            {**EAGLE_LIKE, "llm": "tiny-llama", "llm_options": {"max_position_embeddings": 4096}}
        )
    bench = generate_benchmark(
        work / "gpu-data", seed=0, sizes=BenchmarkSizes(align=6, instruct=n, val=6, test=6)
    )
    ds = instruct_dataset(model, bench)
    loader = DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=ds.collate, pin_memory=True
    )
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1:  # the first batch includes the workers' start-up
            start, seen = time.perf_counter(), 0
        seen += len(batch["ids"])
    if start is None:
        raise RuntimeError("data pipeline benchmark needs at least two batches")
    return seen / (time.perf_counter() - start), workers


@register_section("gpu")
def bench_gpu(cfg: BenchConfig, device: torch.device, work: Path) -> list[dict]:
    """The Eagle-like configuration on one GPU; one ``skipped`` row without CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        note = "no CUDA device: the GPU section did not run (see moe_vision.bench.gpu)"
        return [bench_row("gpu", "eagle-like", "skipped", 1.0, "flag", device, note)]
    found, chosen, tried = None, None, []
    for name, preset, options in LLM_SHAPES:
        try:
            model_cfg = eagle_like_config(preset, options)
            found = train_eagle_like(device, work, model_cfg, GPU_BATCH, GPU_STEPS)
            chosen = name
            _free()
            break
        except torch.cuda.OutOfMemoryError:
            tried.append(name)
            logger.info("bench gpu: %s does not train on this GPU (out of memory)", name)
            _free()
    if found is None:
        raise RuntimeError(f"no LLM shape of {[s[0] for s in LLM_SHAPES]} trains on this GPU")
    measured = measure_bf16_peak(device)
    peak, source = device_bf16_peak(device)
    if peak is None:
        peak, source = measured, f"{source}: measured bf16 matmul peak"
    achieved = found["flops_per_step"] / found["step_s"]
    config = f"eagle-like CLIP-L/448 + ConvNeXt-XXL/1024 channel_concat + {chosen} b{GPU_BATCH}"
    note = (
        f"{found['params'] / 1e9:.2f}B params, all trained, AdamW, bf16 autocast, gradient "
        f"checkpointing; {found['visual_tokens']:.0f} visual tokens; random init; peak: {source}; "
        f"out of memory: {tried or 'none'}"
    )
    data_rate, workers = data_pipeline_rate(work, GPU_BATCH)
    values = {
        "samples_per_s": (GPU_BATCH / found["step_s"], "samples/s"),
        "step_s": (found["step_s"], "s"),
        "flops_per_sample": (found["flops_per_step"] / GPU_BATCH, "FLOP"),
        "achieved_flops_per_s": (achieved, "FLOP/s"),
        "bf16_peak_flops_per_s": (peak, "FLOP/s"),
        "measured_bf16_matmul_flops_per_s": (measured, "FLOP/s"),
        "mfu": (achieved / peak, "x"),
        "peak_memory_gb": (found["peak_memory_gb"], "GiB"),
        "data_samples_per_s": (data_rate, "samples/s"),
    }
    rows = [bench_row("gpu", config, k, v, u, device, note) for k, (v, u) in values.items()]
    rows[-1]["note"] = f"DataLoader, {workers} workers, per-expert preprocessing in the workers"
    return rows
