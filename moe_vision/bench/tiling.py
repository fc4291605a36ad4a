"""Bench section ``tiling``: what tiling costs in visual tokens, FLOPs and time per sample.

Three tiny configurations of Eagle 2's layout (Li et al., arXiv 2501.14818: a tiled SigLIP with
a thumbnail next to an untiled ConvNeXt, tokens appended per map), measured on one batch of the
built-in benchmark's opt-in tiling categories (:mod:`moe_vision.data.benchmark_tiling`: wide
text strips and 3:1 canvases, which tile into 2 tiles; square images take 1):

* ``untiled``: SigLIP squashes every image to its native size;
* ``tiled``: SigLIP cuts images into up to 2 x 2 tiles (+ thumbnail), one batch per step;
* ``tiled+pixel_shuffle``: the same with Eagle 2's 2 x 2 pixel shuffle before the projector.

Per configuration: ``visual_tokens`` (the LLM's sequence share, padding of the stitched canvas
included), ``encoder_passes_per_sample`` (tiles + thumbnail, mean over the batch),
``vision_flops_per_sample`` (experts + fusion + compressor + projector forward),
``flops_per_sample`` (the whole inference forward, LLM included; both counted with
``torch.utils.flop_counter.FlopCounterMode``) and ``time_per_sample_s`` (median inference
forward). A real-size row counts, on the ``meta`` device (shapes only, nothing allocated), the
vision FLOPs of Eagle 2's published configuration for a 12-tile image: SigLIP-so400m at 448 on
12 tiles + thumbnail and ConvNeXt-XXL at 1024, and its (tiles + 1) x 256 SigLIP tokens after
pixel shuffle, against the same experts untiled.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_vision.bench.batches import instruct_batch, to_device
from moe_vision.bench.harness import BenchConfig, bench_row, register_section
from moe_vision.bench.measure import median_time

logger = logging.getLogger(__name__)

_TILED = {"tiling": {"grids": [[1, 1], [1, 2], [2, 1], [2, 2]], "thumbnail": True}}
_LAYOUT: dict[str, Any] = {
    "experts": ["siglip-tiny", "convnext-tiny"],
    "fusion": "sequence_append",
    "fusion_options": {"per_expert_grid": True},
}
TILING_MODELS: dict[str, dict[str, Any]] = {
    "untiled": _LAYOUT,
    "tiled": {**_LAYOUT, "expert_options": {"siglip-tiny": _TILED}},
    "tiled+pixel_shuffle": {
        **_LAYOUT,
        "expert_options": {"siglip-tiny": _TILED},
        "compressor": "pixel_shuffle",
    },
}
"""ModelConfig dicts of the tiny configurations, by row name."""


def tiling_batch(model: Any, batch_size: int, data_root: Path, seed: int = 0) -> dict:
    """An instruction batch of the opt-in tiling categories (strips and wide canvases)."""
    from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
    from moe_vision.data.benchmark_tiling import TILING_CATEGORIES

    n = max(batch_size, 2)
    sizes = BenchmarkSizes(align=0, instruct=n, val=0, test=0, categories=TILING_CATEGORIES)
    bench = generate_benchmark(data_root / f"tiling-{seed}-{n}", seed=seed, sizes=sizes)
    return instruct_batch(model, bench, batch_size)


def _flops(fn: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _encoder_passes(model: Any, batch: dict) -> float:
    """Mean expert forward passes per sample: tiles (+ thumbnail) of tiled experts, else 1."""
    total = 0.0
    for expert, inputs in zip(model.experts, batch["images"]):
        policy = expert.spec.tiling
        if policy is None:
            total += 1.0
        else:
            tiles = inputs["tile_grid"].prod(1).float().mean().item()
            total += tiles + float(policy.thumbnail)
    return total


def bench_tiling_config(
    name: str, model_cfg: dict[str, Any], cfg: BenchConfig, device: torch.device, work: Path
) -> list[dict]:
    """The rows of one tiny configuration (module docstring)."""
    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(cfg.seed)
    model = MoEVisionModel.from_config(copy.deepcopy(model_cfg)).to(device).eval()
    b = cfg.batch_size
    batch = to_device(tiling_batch(model, b, work, cfg.seed), device)

    def forward() -> None:
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"], images=batch["images"])

    vision = _flops(lambda: model.encode_images(batch["images"]))
    total = _flops(forward)
    seconds = median_time(forward, device, cfg.repeats, cfg.warmup)
    note = f"{'+'.join(model.config.experts)} {model.config.fusion}; batch {b}, inference"
    return [
        bench_row("tiling", name, "visual_tokens", model.num_visual_tokens, "tokens", device, note),
        bench_row(
            "tiling",
            name,
            "encoder_passes_per_sample",
            _encoder_passes(model, batch),
            "passes",
            device,
            note,
        ),
        bench_row("tiling", name, "vision_flops_per_sample", vision / b, "FLOP", device, note),
        bench_row("tiling", name, "flops_per_sample", total / b, "FLOP", device, note),
        bench_row("tiling", name, "time_per_sample_s", seconds / b, "s", device, note),
    ]


def eagle2_real_size_rows(device: torch.device) -> list[dict]:
    """Vision FLOPs and tokens per sample of Eagle 2's configuration at real size (meta)."""
    import experts
    from experts.tiling_policy import TilingPolicy

    policy = TilingPolicy(max_tiles=12, thumbnail=True)
    rows, cols = policy.select_grid(1344, 1792, (448, 448))  # a 3:4 image: 3 x 4 tiles
    siglip = experts.create_expert("siglip-so400m-384", device="meta", input_size=(448, 448))
    convnext = experts.create_expert("convnext-xxl-clip", device="meta", input_size=(1024, 1024))

    def vision(passes: int) -> int:
        tiles = {"pixel_values": torch.empty(passes, 3, 448, 448, device="meta")}
        image = {"pixel_values": torch.empty(1, 3, 1024, 1024, device="meta")}
        return _flops(lambda: (siglip.forward_map(tiles), convnext.forward_map(image)))

    passes = rows * cols + 1
    tiled, untiled = vision(passes), vision(1)
    note = (
        "meta device (shapes only): SigLIP-so400m @448 + ConvNeXt-XXL @1024, expert forwards; "
        f"a 1344x1792 image -> {rows}x{cols} tiles + thumbnail; tokens after 2x2 pixel shuffle"
    )
    siglip_tokens = (siglip.spec.grid[0] // 2) * (siglip.spec.grid[1] // 2)
    conv_tokens = (convnext.spec.grid[0] // 2) * (convnext.spec.grid[1] // 2)
    out = []
    for name, flops, n in [("eagle2-real tiled", tiled, passes), ("eagle2-real", untiled, 1)]:
        out += [
            bench_row("tiling", name, "encoder_passes_per_sample", n + 1, "passes", device, note),
            bench_row("tiling", name, "vision_flops_per_sample", flops, "FLOP", device, note),
            bench_row(
                "tiling",
                name,
                "visual_tokens",
                n * siglip_tokens + conv_tokens,
                "tokens",
                device,
                note,
            ),
        ]
    return out


@register_section("tiling")
def bench_tiling_section(cfg: BenchConfig, device: torch.device, work: Path) -> list[dict]:
    """Visual tokens, FLOPs and time per sample of tiled against untiled configurations."""
    rows = []
    for name, model_cfg in TILING_MODELS.items():
        logger.info("bench: tiling, %s", name)
        rows += bench_tiling_config(name, model_cfg, cfg, device, work)
    return rows + eagle2_real_size_rows(device)
