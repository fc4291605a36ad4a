"""Bench section ``gpu``: an Eagle-like training step at real size on one GPU.

What it measures, and how a reader can check each number from this file:

* **The configuration**: Eagle-X2's mixture (Shi et al., 2024: CLIP ViT-L at 448 px +
  ConvNeXt-XXL at 1024 px, channel concatenation on a 32x32 grid = 1024 visual tokens), random
  init, and the largest LLM *shape* of :data:`LLM_SHAPES` whose training state fits the device
  (:func:`plan_shape`). Everything is held in **pure bf16**: weights, gradients and both AdamW
  moments (:data:`BYTES_PER_PARAM` = 8 bytes per parameter, so a 7B LLM plus the 1.2B experts
  needs ~66 GiB before activations), because fp32 weights with fp32 AdamW (16 bytes per
  parameter, ~125 GiB) fit neither an H100 nor an H200. Activation checkpointing runs in the LLM
  *and* in both experts (the experts' activations at 1024 px dominate otherwise). A shape whose
  estimate leaves less than :data:`ACTIVATION_RESERVE` of the memory free is not tried; one that
  still runs out of memory is recorded as an ``out_of_memory`` row and the next smaller is tried.
* **Text**: the LLM's real vocabulary (its ``vocab_size``, so the LM head costs what it costs)
  and :data:`TEXT_TOKENS` text tokens per sample, half of them trained answers.
* **Model FLOPs** (:func:`model_flops`): the forward pass counted by ``FlopCounterMode`` without
  gradients, times 3 (backward = 2x forward, the convention of PaLM's MFU). The forward that
  checkpointing recomputes is *not* counted: this is model FLOPs utilisation, not hardware.
* **Peak** (:func:`device_bf16_peak`): the dense bf16 tensor-core peak of the device's exact
  part, from its name (H100 SXM / PCIe / NVL, H200 / H200 NVL, A100, ...), data-sheet values;
  the measured bf16 matmul peak is reported beside it.
* **Timing** (:func:`time_steps`): :data:`WARMUP_STEPS` untimed steps, then :data:`TIMED_STEPS`
  steps timed one by one with CUDA events; the median, the 10th and 90th percentiles, and
  samples/s and tokens/s (visual + text) from the median.

Each row is yielded the moment it is measured, so the CSV (see :mod:`moe_vision.bench.harness`)
keeps what a killed run measured. Every allocation failure becomes a row. Without CUDA the
section yields one ``skipped`` row and the plan: which shape it would train on an 80 GiB and a
141 GiB device, from parameter counts on the meta device.

The anchor: Eagle-X5 fine-tunes 1.8M samples in about 24 h on 32 A100s, ~0.65 samples/s per
A100 for a 7B LLM (in mixed precision under DeepSpeed, so not the same memory regime).
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_vision.bench.batches import benchmark_batch, to_device
from moe_vision.bench.harness import BenchConfig, bench_row, register_section

logger = logging.getLogger(__name__)

EAGLE_LIKE: dict[str, Any] = {
    "experts": ["clip-vit-l-336", "convnext-xxl-clip"],
    "expert_options": {"clip-vit-l-336": {"input_size": [448, 448]}},  # Eagle runs CLIP at 448
    "fusion": "channel_concat",  # on CLIP's 32x32 grid: 1024 visual tokens
}
"""The Eagle-like mixture (the LLM comes from :data:`LLM_SHAPES`)."""


@dataclass(frozen=True)
class LLMShape:
    """A published LLM's shape, built from a tiny preset's architecture class.

    Attributes:
        name: the model whose shape this is.
        preset: the tiny LLM preset whose transformers class is used (``tiny-llama``, ...).
        options: config fields of that model (width, depth, heads, vocabulary).
    """

    name: str
    preset: str
    options: dict[str, int] = field(default_factory=dict)


LLM_SHAPES: list[LLMShape] = [
    LLMShape("llama-2-7b", "tiny-llama", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    LLMShape("qwen2.5-3b", "tiny-qwen2", dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936)),
    LLMShape("qwen2-1.5b", "tiny-qwen2", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936)),
    LLMShape("qwen2-0.5b", "tiny-qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
]  # fmt: skip
"""Largest first. Llama-2-7B is Vicuna-7B's shape, the LLM of Eagle's and LLaVA-1.5's 7B runs."""

DEVICE_PEAKS: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
]
"""Dense bf16 tensor-core peak FLOP/s by a substring of ``torch.cuda.get_device_name``, most
specific first (NVIDIA data sheets list these with sparsity at twice the value)."""

BYTES_PER_PARAM = 8
"""Pure bf16 training state: weights 2 + gradients 2 + AdamW's two moments 2 + 2 bytes."""
ACTIVATION_RESERVE = 0.25
"""Fraction of the device's memory a shape must leave free for activations and workspaces."""
TEXT_TOKENS = 256
"""Text tokens per sample (prompt + answer). Our assumption for a LLaVA-665K-like conversation:
the dataset could not be read here (no hub access); set it from your data's token lengths."""
GPU_BATCH = 4
WARMUP_STEPS = 3
TIMED_STEPS = 10


def device_bf16_peak(name: str) -> tuple[float | None, str]:
    """The dense bf16 peak of the device called ``name`` (``None`` when unknown) and its source."""
    for key, peak in DEVICE_PEAKS:
        if key in name:
            return peak, f"data sheet ({key})"
    return None, f"unknown device {name!r}"


def eagle_like_config(shape: LLMShape) -> dict[str, Any]:
    """:data:`EAGLE_LIKE` with ``shape``'s LLM."""
    options = {**shape.options, "max_position_embeddings": 4096}
    return {**EAGLE_LIKE, "llm": shape.preset, "llm_options": options}


def count_params(model_cfg: dict[str, Any]) -> int:
    """Parameters of ``model_cfg``, counted on the meta device (no memory, no weights)."""
    from moe_vision.model.mllm import MoEVisionModel

    with torch.device("meta"):
        model = MoEVisionModel.from_config(model_cfg)
    return sum(p.numel() for p in model.parameters())


def plan_shape(
    memory_bytes: float, params: dict[str, int]
) -> tuple[str | None, dict[str, float]]:
    """The first (largest) shape whose bf16 training state fits ``memory_bytes`` with
    :data:`ACTIVATION_RESERVE` left over; also every shape's state in bytes."""
    need = {name: n * BYTES_PER_PARAM for name, n in params.items()}
    budget = memory_bytes * (1 - ACTIVATION_RESERVE)
    return next((name for name, b in need.items() if b <= budget), None), need


def text_batch(model: Any, images: list, batch_size: int, text_tokens: int, seed: int = 0) -> dict:
    """A training batch of ``batch_size`` samples: one image placeholder, then ``text_tokens - 1``
    random text tokens, the second half of them trained; ``images`` as collated."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.llm.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, text_tokens), generator=gen)
    ids[ids == model.image_token_id] = 0
    ids[:, 0] = model.image_token_id
    labels = ids.clone()
    labels[:, : text_tokens // 2] = -100
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images}


def model_flops(model: Any, batch: dict) -> float:
    """Model FLOPs of one training step on ``batch``: 3 x the forward's (counted without
    gradients, so no checkpointing recomputation enters)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    return 3.0 * counter.get_total_flops()


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones (CUDA events
    on a GPU, the wall clock otherwise)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def build_bf16(model_cfg: dict[str, Any], device: torch.device) -> Any:
    """``model_cfg`` built directly in bf16 on ``device`` (no fp32 copy ever exists)."""
    from moe_vision.model.mllm import MoEVisionModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MoEVisionModel.from_config(model_cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16)


def is_out_of_memory(error: BaseException) -> bool:
    """True for every allocation failure a CUDA run raises (not only ``OutOfMemoryError``)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC")
    )


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_bf16_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Best achieved FLOP/s of bf16 ``n x n`` matmuls on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = time_steps(lambda: torch.mm(a, b), 2, repeats, device)
    return 2 * n**3 / min(times)


def _train_rows(
    shape: LLMShape, device: torch.device, work: Path, row: Callable[..., dict]
) -> Iterator[dict]:
    """Build ``shape``'s model, count its FLOPs and time its steps; yields rows as measured."""
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats(device)
    model = build_bf16(eagle_like_config(shape), device)
    model.train()
    switched = model.gradient_checkpointing_enable()
    images = to_device(benchmark_batch(model, GPU_BATCH, work), device)["images"]
    images = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
              for x in images]  # fmt: skip
    batch = to_device(text_batch(model, images, GPU_BATCH, TEXT_TOKENS), device)
    params = sum(p.numel() for p in model.parameters())
    yield row("params", params, "count", f"checkpointing in {switched}")
    flops = model_flops(model, batch)
    yield row("model_flops_per_sample", flops / GPU_BATCH, "FLOP", "3 x forward, no recompute")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch, logits="labels").loss.backward()
        optimizer.step()

    times = time_steps(step, WARMUP_STEPS, TIMED_STEPS, device)
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10)
    tokens = model.num_visual_tokens + TEXT_TOKENS
    spread = f"{TIMED_STEPS} steps after {WARMUP_STEPS} warm-up, CUDA events"
    yield row("step_s_median", median, "s", spread)
    yield row("step_s_p10", deciles[0], "s", spread)
    yield row("step_s_p90", deciles[-1], "s", spread)
    yield row("samples_per_s", GPU_BATCH / median, "samples/s", "from the median step")
    yield row("tokens_per_s", GPU_BATCH * tokens / median, "tokens/s",
              f"{model.num_visual_tokens} visual + {TEXT_TOKENS} text tokens per sample")
    peak, source = device_bf16_peak(torch.cuda.get_device_name(device))
    measured = measure_bf16_peak(device)
    if peak is None:
        peak, source = measured, f"{source}: measured bf16 matmul peak"
    yield row("bf16_peak_flops_per_s", peak, "FLOP/s", source)
    yield row("measured_bf16_matmul_flops_per_s", measured, "FLOP/s", "8192^3 bf16 mm, best of 10")
    yield row("mfu", flops / median / peak, "x", f"model FLOPs / step time / peak ({source})")
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    yield row("peak_memory_gb", gib, "GiB", "torch.cuda.max_memory_allocated")


def _plan_rows(device: torch.device) -> Iterator[dict]:
    """Parameter counts and the shape each device size would train (meta device, no GPU)."""
    params = {s.name: count_params(eagle_like_config(s)) for s in LLM_SHAPES}
    for name, n in params.items():
        note = f"{BYTES_PER_PARAM} bytes/param pure bf16: {n * BYTES_PER_PARAM / 2**30:.1f} GiB"
        yield bench_row("gpu", f"eagle-like + {name}", "plan_params", n, "count", device, note)
    for gib in (80, 141):
        chosen, _ = plan_shape(gib * 2**30, params)
        note = f"largest shape that fits {gib} GiB with {ACTIVATION_RESERVE:.0%} left: {chosen}"
        value = params[chosen] if chosen else float("nan")
        yield bench_row("gpu", f"plan {gib} GiB", "plan_shape_params", value, "count", device, note)


@register_section("gpu")
def bench_gpu(cfg: BenchConfig, device: torch.device, work: Path) -> Iterator[dict]:
    """The Eagle-like configuration on one GPU, rows yielded as measured; without CUDA one
    ``skipped`` row and the plan."""
    if device.type != "cuda" or not torch.cuda.is_available():
        note = "no CUDA device: the GPU section did not run (see moe_vision.bench.gpu)"
        yield bench_row("gpu", "eagle-like", "skipped", 1.0, "flag", device, note)
        yield from _plan_rows(device)
        return
    free, total = torch.cuda.mem_get_info(device)
    params = {s.name: count_params(eagle_like_config(s)) for s in LLM_SHAPES}
    chosen, need = plan_shape(total, params)
    start = [s.name for s in LLM_SHAPES].index(chosen) if chosen else len(LLM_SHAPES) - 1
    yield bench_row("gpu", "device", "memory_gb", total / 2**30, "GiB", device,
                    f"plan: {chosen or 'none fits'}; state per shape (GiB): "
                    + ", ".join(f"{k} {v / 2**30:.0f}" for k, v in need.items()))  # fmt: skip
    for shape in LLM_SHAPES[start:]:
        config = f"eagle-like CLIP-L/448 + ConvNeXt-XXL/1024 + {shape.name} bf16 b{GPU_BATCH}"

        def row(metric: str, value: float, unit: str, note: str, config: str = config) -> dict:
            return bench_row("gpu", config, metric, value, unit, device, note)

        try:
            yield from _train_rows(shape, device, work, row)
            return
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            logger.info("bench gpu: %s ran out of memory: %s", shape.name, error)
            yield row("out_of_memory", 1.0, "flag", str(error).splitlines()[0][:300])
        finally:
            _free()
