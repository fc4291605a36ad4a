"""Benchmarks of the platform itself (``moe-vision bench``), written to ``results/bench.csv``.

Three measurements, each taken in one run so that its ratio compares like with like:

1. **Platform overhead**: the mixture's forward + backward (:class:`MoEVisionModel`) against
   the same computation written by hand on the same modules: each expert's wrapped library
   module called directly (transformers ``model(**inputs).last_hidden_state``, timm
   ``forward_features``), the fusion's ``forward``, the projector, and the LLM on
   hand-spliced ``inputs_embeds``. Ratio = mixture time / direct time (1.0 = no overhead).
   Where an expert's library output cannot be read as its map (other readout layer, ragged
   grid), the expert module itself stands in and the row says so.
2. **Feature cache**: a frozen-expert sweep (recipe with frozen experts) over several fusion
   strategies, run with and without the feature cache (:mod:`moe_vision.training.cache`); ratio =
   uncached wall time / cached wall time. With tiny experts the LLM dominates, so section 3
   adds, per configuration, the FLOP share of the experts' forward in a frozen-expert step
   and the speed-up bound it implies for the cache, ``1 / (1 - share)``.
3. **Training throughput**: samples/s of full training steps (forward, backward, AdamW), the
   achieved FLOP/s (FLOPs of one forward + backward counted with
   ``torch.utils.flop_counter.FlopCounterMode``) against this machine's measured fp32 matmul
   peak, and peak memory (CUDA: peak allocated; CPU: peak resident set size), for the default
   configuration and for one real-size configuration (e.g. CLIP ViT-L/336 + ConvNeXt-L,
   random init, batch 1).

The CSV is long-format: ``section, config, metric, value, unit, device, note``.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from moe_vision import results

logger = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = ("section", "config", "metric", "value", "unit", "device", "note")
DEFAULT_MODEL: dict[str, Any] = {
    "experts": ["clip-tiny", "convnext-tiny"],
    "fusion": "channel_concat",
}
REAL_MODEL: dict[str, Any] = {
    "experts": ["clip-vit-l-336", "convnext-l-clip-320"],
    "fusion": "channel_concat",
    "llm_options": {"max_position_embeddings": 2048},
}


BenchSection = Callable[["BenchConfig", torch.device, Path], list[dict]]
_SECTIONS: dict[str, BenchSection] = {}


def register_section(name: str) -> Callable[[BenchSection], BenchSection]:
    """Register ``fn(cfg, device, work_dir) -> rows`` as the bench section ``name``.

    A new section is one module under :mod:`moe_vision.bench` that registers itself (imported by
    the package); rows come from :func:`bench_row`. Sections run in registration order.
    """

    def deco(fn: BenchSection) -> BenchSection:
        if name in _SECTIONS:
            raise ValueError(f"bench section {name!r} is registered twice")
        _SECTIONS[name] = fn
        return fn

    return deco


def list_sections() -> list[str]:
    """The registered section names, in the order they run."""
    return list(_SECTIONS)


@dataclass
class BenchConfig:
    """Sizes of the benchmarks (the defaults are the reported run; tests shrink them).

    Attributes:
        model: ModelConfig dict of the default configuration.
        batch_size: samples per step for the default configuration.
        repeats: timed repetitions (medians are reported); ``warmup`` untimed ones first.
        cache_fusions: fusion strategies of the frozen-expert sweep.
        cache_sizes: built-in benchmark sizes of that sweep.
        cache_run: RunConfig options of its cells (stage overrides, ...).
        cache_real_model / cache_real_fusions / cache_real_sizes / cache_real_run: the same
            sweep with real-size randomly initialised experts on a few samples (``None``: skip);
            ``cache_real_sweep=False`` keeps only their per-image forward-vs-read timing.
        cell_overrides: sweep-spec fields replacing the default sweep's in the ``cells`` section
            (``None``: the default sweep's first cell as it is).
        real_model: ModelConfig dict of the real-size configuration (``None``: skip it).
        real_batch_size: its batch size.
        real_steps: its timed steps.
        matmul_size: ``n`` of the ``n x n`` fp32 matmuls that measure the peak.
        seed: benchmark data and init seed.
    """

    model: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODEL))
    batch_size: int = 8
    repeats: int = 10
    warmup: int = 2
    cache_fusions: list[str] = field(
        default_factory=lambda: ["channel_concat", "sequence_append", "mini_gemini"]
    )
    cache_sizes: dict[str, int] = field(
        default_factory=lambda: {"align": 192, "instruct": 192, "val": 12, "test": 48}
    )
    cache_run: dict[str, Any] = field(
        default_factory=lambda: {
            "overrides": {"*": {"batch_size": 16, "lr": 2e-3, "epochs": 1}},
            "train": {"progress_bar": False, "log_with": []},
        }
    )
    cache_real_model: dict[str, Any] | None = field(
        default_factory=lambda: {k: v for k, v in REAL_MODEL.items() if k != "fusion"}
    )
    cache_real_fusions: list[str] = field(
        default_factory=lambda: ["channel_concat", "sequence_append", "deformable"]
    )
    cache_real_sizes: dict[str, int] = field(
        default_factory=lambda: {"align": 2, "instruct": 4, "val": 0, "test": 2}
    )
    cache_real_run: dict[str, Any] = field(
        default_factory=lambda: {
            # both stages on the instruct split, 2 epochs: each image's maps serve 3 fusions x
            # 2 stages x 2 epochs = 12 uses; the evaluation (uncached) is cut to 1 question.
            # A real-size expert forward is ~0.5 TFLOP per image: keep this small on a CPU.
            "overrides": {"*": {"data": "instruct", "batch_size": 4, "lr": 1e-3, "epochs": 2}},
            "data": {"eval_limit": 1},
            "train": {"progress_bar": False, "log_with": []},
        }
    )
    cache_real_sweep: bool = True
    cell_overrides: dict[str, Any] | None = None
    real_model: dict[str, Any] | None = field(default_factory=lambda: copy.deepcopy(REAL_MODEL))
    real_batch_size: int = 1
    real_steps: int = 2
    matmul_size: int = 2048
    seed: int = 0


def describe_device(device: torch.device) -> str:
    """The machine in words, e.g. ``"CPU x86_64, 2 threads"`` or ``"cuda NVIDIA H100"``."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------- memory, peak
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA stats; CPU: Linux ``clear_refs`` resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logger.debug("cannot reset the peak RSS; it covers the whole process")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: peak resident set size (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(n: int, device: torch.device, repeats: int = 10) -> float:
    """Best achieved fp32 FLOP/s of ``n x n @ n x n`` matmuls on ``device`` (2 n^3 each)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------- data
def benchmark_batch(model: Any, batch_size: int, data_root: Path, seed: int = 0) -> dict:
    """A training batch of ``batch_size`` instruction samples from the built-in benchmark."""
    from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark

    n = max(batch_size, 6)
    sizes = BenchmarkSizes(align=n, instruct=n, val=6, test=6)
    bench = generate_benchmark(data_root / f"bench-{seed}-{n}", seed=seed, sizes=sizes)
    return instruct_batch(model, bench, batch_size)


def instruct_batch(model: Any, bench: Any, batch_size: int) -> dict:
    """The first ``batch_size`` records of ``bench``'s instruct split, read for ``model`` (its
    preprocessors, tokenizer and length limit) and collated."""
    from moe_vision.data.llava import LlavaDataset

    ds = LlavaDataset(
        bench.split("instruct"),
        bench.images,
        model.preprocessors,
        model.tokenizer,
        image_token=model.config.image_token,
        max_length=model.max_length,
        num_visual_tokens=model.num_visual_tokens,
    )
    return ds.collate([ds[i] for i in range(batch_size)])


def _to(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key].to(device)
    out["images"] = [{k: v.to(device) for k, v in x.items()} for x in batch["images"]]
    return out


# ---------------------------------------------------------------------------- 1. overhead
def library_map(expert: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The expert's map ``(B, C, H, W)`` from its wrapped library module called directly.

    transformers models: ``model(**inputs)``, the expert's readout block from
    ``hidden_states`` (else ``last_hidden_state``); timm/open_clip trunks:
    ``model.forward_features(pixels)``; token outputs ``(B, P + H*W, C)`` drop the ``P``
    prefix tokens. ``None`` when the expert wraps no such module or the output is not a grid
    of the spec's size.
    """
    from transformers import PreTrainedModel

    module = getattr(expert, "model", None)
    if isinstance(module, PreTrainedModel):
        # The expert may read an earlier block (LLaVA reads CLIP's penultimate one): take that
        # block's output from the library's own hidden_states (the library runs every block).
        block = getattr(expert, "feature_block", None)
        out = module(**inputs, output_hidden_states=block is not None)
        hidden = out.last_hidden_state if block is None else out.hidden_states[block + 1]
    elif module is not None and callable(getattr(module, "forward_features", None)):
        if len(inputs) != 1:
            return None
        hidden = module.forward_features(next(iter(inputs.values())))
    else:
        return None
    h, w = expert.spec.grid
    c = expert.spec.channels
    if hidden.dim() == 4:
        return hidden if tuple(hidden.shape[1:]) == (c, h, w) else None
    if hidden.dim() != 3 or hidden.shape[1] < h * w or hidden.shape[2] != c:
        return None
    return hidden[:, hidden.shape[1] - h * w :].transpose(1, 2).reshape(hidden.shape[0], c, h, w)


def direct_forward(model: Any, batch: dict) -> tuple[torch.Tensor, list[str]]:
    """The mixture's loss computed by hand on the same modules; returns ``(loss, paths)``
    where ``paths[i]`` says how expert ``i`` ran (``"library"`` or ``"expert module"``)."""
    from experts.spec import FeatureMap

    maps, paths = [], []
    for expert, inputs in zip(model.experts, batch["images"]):
        features = library_map(expert, inputs)
        if features is None:
            maps.append(expert(inputs))
            paths.append("expert module")
        else:
            maps.append(FeatureMap(features, expert.spec.patch_size, expert.spec.name))
            paths.append("library")
    visual = model.projector(model.fusion(maps))  # (B, N, D)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    text = model.llm.get_input_embeddings()(ids)  # (B, T, D)
    n = visual.shape[1]
    rows_e, rows_m, rows_l = [], [], []
    for b in range(ids.shape[0]):
        p = int((ids[b] == model.image_token_id).nonzero()[0, 0])
        rows_e.append(torch.cat([text[b, :p], visual[b], text[b, p + 1 :]]))
        rows_m.append(torch.cat([mask[b, :p], mask.new_ones(n), mask[b, p + 1 :]]))
        rows_l.append(torch.cat([labels[b, :p], labels.new_full((n,), -100), labels[b, p + 1 :]]))
    out = model.llm(
        inputs_embeds=torch.stack(rows_e),
        attention_mask=torch.stack(rows_m),
        labels=torch.stack(rows_l),
    )
    return out.loss, paths


def _mixture_loss(model: Any, batch: dict) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        images=batch["images"],
    ).loss


@register_section("overhead")
def bench_overhead(cfg: BenchConfig, device: torch.device, data_root: Path) -> list[dict]:
    """Section 1: mixture vs direct forward + backward (see the module docstring)."""
    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(cfg.seed)
    model = MoEVisionModel.from_config(cfg.model).to(device)
    batch = _to(benchmark_batch(model, cfg.batch_size, data_root, cfg.seed), device)
    model.eval()  # no dropout: both paths must compute the same loss
    with torch.no_grad():
        mixture, (direct, paths) = _mixture_loss(model, batch), direct_forward(model, batch)
    same = bool(torch.allclose(mixture, direct, rtol=1e-4, atol=1e-5))

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn().backward()

        return run

    t_mix = step(lambda: _mixture_loss(model, batch))
    t_dir = step(lambda: direct_forward(model, batch)[0])
    for _ in range(cfg.warmup):
        t_mix(), t_dir()
    mix_times, dir_times = [], []
    for _ in range(cfg.repeats):  # interleaved, so drifting machine load hits both alike
        mix_times.append(_median_time(t_mix, device, 1, 0))
        dir_times.append(_median_time(t_dir, device, 1, 0))
    mix, dirc = statistics.median(mix_times), statistics.median(dir_times)
    name = _config_name(cfg.model, cfg.batch_size)
    note = f"experts via {paths}; losses equal: {same}"
    return [
        bench_row("overhead", name, "mixture_fwd_bwd_ms", 1e3 * mix, "ms", device, note),
        bench_row("overhead", name, "direct_fwd_bwd_ms", 1e3 * dirc, "ms", device, note),
        bench_row("overhead", name, "overhead_ratio", mix / dirc, "x", device, note),
    ]


# ---------------------------------------------------------------------------- 2. cache
# The feature-cache section lives in :mod:`moe_vision.bench.feature_cache`.


# ---------------------------------------------------------------------------- 3. throughput
def train_step_flops(model: Any, batch: dict) -> int:
    """FLOPs of one forward + backward on ``batch`` (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        _mixture_loss(model, batch).backward()
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
    batch = _to(benchmark_batch(model, batch_size, data_root, seed), device)
    flops = train_step_flops(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _mixture_loss(model, batch).backward()
        optimizer.step()

    share = frozen_expert_flops_share(model, batch)
    seconds = _median_time(step, device, steps, warmup)
    achieved = flops / seconds
    name = _config_name(model_cfg, batch_size)
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


# ---------------------------------------------------------------------------- driver
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
        logger.info("bench: throughput of %s", _config_name(model_cfg, batch))
        found += bench_throughput(model_cfg, batch, steps, 1, peak, dev, work, cfg.seed)
    # The peak is the best of a measurement before and one after the runs (a shared
    # machine's load drifts); the fractions are recomputed against it.
    peak = max(peak, measure_matmul_peak(cfg.matmul_size, dev))
    return _rescale_to_peak(found, peak)


def _config_name(model_cfg: dict[str, Any], batch_size: int) -> str:
    fusion = model_cfg.get("fusion", "channel_concat")
    return f"{'+'.join(model_cfg['experts'])} {fusion} b{batch_size}"


def bench_row(
    section: str, config: str, metric: str, value: float, unit: str, device: torch.device, note: str
) -> dict[str, Any]:
    return {
        "section": section,
        "config": config,
        "metric": metric,
        "value": float(value),
        "unit": unit,
        "device": describe_device(device),
        "note": note,
    }


def run_bench(
    cfg: BenchConfig | None = None,
    out: str | os.PathLike[str] = "results/bench.csv",
    sections: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Run the benchmark ``sections`` and write the long-format CSV to ``out`` (atomically).

    Args:
        cfg: sizes (default: :class:`BenchConfig`, the reported run).
        out: CSV path.
        sections: any of :func:`list_sections` (default: all).
        device: default: CUDA when available, else CPU.
        work_dir: scratch folder (default: a temporary folder, removed afterwards).
    """
    cfg = cfg or BenchConfig()
    sections = list(sections) if sections is not None else list_sections()
    bad = sorted(set(sections) - set(_SECTIONS))
    if bad:
        raise ValueError(f"unknown bench sections {bad}; valid sections are {list_sections()}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        for name, fn in _SECTIONS.items():
            if name in sections:
                logger.info("bench: %s", name)
                rows += fn(cfg, dev, work)
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    results.save(df, out)
    return df
