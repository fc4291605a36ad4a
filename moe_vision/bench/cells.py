"""Bench section ``cells``: where a sweep cell's wall time goes, and how close its training step
comes to this machine's peak.

A sweep cell is what a researcher waits for (the main job runs six of them, more with seeds), so
its wall time should be training. This section runs one cell of the default sweep
(:func:`moe_vision.sweeps.sweep.default_sweep`, its first expert pair and fusion) the way the
sweep runs it (``moe-vision sweep`` in a fresh process, the sweep's executor and threads, a cold
feature cache), times the whole command, and splits the cell's wall time with the run's own
timings (``time/*`` of its metrics row, :class:`~moe_vision.training.trainer.StepTimings`):

* ``train_steps_s``: forward, backward and optimiser steps, the part that is training;
* ``precompute_s`` (storing the frozen experts' maps before each stage: a cold cache computes
  them here), ``data_s`` (waiting for batches), ``features_s`` (feature-cache reads),
  ``checkpoint_s`` (mid-unit checkpoints), ``eval_s``;
* ``other_s``: the rest -- process start-up and imports, model build, benchmark generation,
  unit-end checkpoints, saving the model, FLOP counting.

``share_training_steps = train_steps_s / cell_wall_s``. Then the tiny configuration's training
step alone (the cell's model, batch size and threads; experts frozen and their maps given, the
LLM and projector training as in the cell's longest stage): achieved FLOP/s (forward + backward
counted with ``FlopCounterMode``) against the fp32 matmul peak measured at the same thread count,
and the same step with the LLM's blocks compiled (``train.compile_llm``): ``compile_s`` (the
first compiled step) and ``compiled_speedup`` (eager step time over compiled).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moe_vision.bench.batches import benchmark_batch, to_device
from moe_vision.bench.harness import BenchConfig, bench_row, register_section
from moe_vision.bench.measure import measure_matmul_peak, median_time
from moe_vision.training.steps import compile_llm_blocks, fused_adamw_supported


def default_cell_spec(cfg: BenchConfig) -> dict[str, Any]:
    """The default sweep reduced to its first cell (``cfg.cell_overrides`` applied on top)."""
    from moe_vision.sweeps.default import default_sweep

    spec = default_sweep().to_dict()
    first = default_sweep().expand()[0]
    spec["experts"] = {"combinations": [list(first.experts)]}
    spec["fusions"] = [f for f in spec["fusions"] if _fusion_name(f) == first.fusion][:1]
    spec["recipes"] = [first.recipe]
    spec["seeds"] = [first.seed]
    spec["name"] = "bench-cell"
    model = spec.get("model") or {}
    if model.get("expert_options"):  # only the cell's experts (the spec rejects unused ones)
        model["expert_options"] = {
            k: v for k, v in model["expert_options"].items() if k in first.experts
        }
    for key, value in (cfg.cell_overrides or {}).items():
        spec[key] = copy.deepcopy(value)
    return spec


def _fusion_name(entry: Any) -> str:
    return entry if isinstance(entry, str) else entry.get("label") or entry["name"]


def run_cell_command(spec: dict[str, Any], work: Path) -> tuple[float, dict[str, Any]]:
    """Run ``spec`` (one cell) with ``moe-vision sweep`` in a fresh process and a cold feature
    cache; returns ``(wall seconds, the cell's metrics row)``."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "cell.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "MOE_VISION_CACHE": str(work / "cache")}
    cmd = [sys.executable, "-m", "moe_vision.cli", "sweep", str(spec_path)]
    cmd += ["--out", str(work / "sweep"), "--results-dir", ""]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    metrics = sorted((work / "sweep").rglob("metrics.json"))
    if done.returncode != 0 or len(metrics) != 1:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"bench cell failed (exit {done.returncode}); output ends:\n{tail}")
    return wall, json.loads(metrics[0].read_text())


def cell_breakdown(wall: float, row: dict[str, Any]) -> dict[str, float]:
    """Split a cell's wall time with its metrics row's timings (seconds; ``other_s`` = rest)."""
    parts = {
        "train_steps_s": float(row.get("time/step_s", 0.0)),
        "precompute_s": float(row.get("time/precompute_s", 0.0)),
        "data_s": float(row.get("time/data_s", 0.0)),
        "features_s": float(row.get("time/features_s", 0.0)),
        "checkpoint_s": float(row.get("time/checkpoint_s", 0.0)),
        "eval_s": float(row.get("eval_time_s", 0.0)),
    }
    parts["other_s"] = max(wall - sum(parts.values()), 0.0)
    return parts


def training_step_fraction_of_peak(
    model_cfg: dict[str, Any],
    batch_size: int,
    threads: int,
    work: Path,
    repeats: int = 5,
    compile_llm: bool = False,
) -> dict[str, float]:
    """Achieved FLOP/s of the tiny configuration's frozen-expert training step (LLM + projector
    train, experts' maps given, the stages' fused AdamW) and the fp32 matmul peak, both at
    ``threads``; with ``compile_llm``, then the same step with the LLM's blocks compiled
    (``compile_s``: the first compiled step; ``compiled_step_s``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from moe_vision.model.mllm import MoEVisionModel

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        cpu = torch.device("cpu")
        model = MoEVisionModel.from_config(model_cfg).train()
        batch = to_device(benchmark_batch(model, batch_size, work), cpu)
        for p in model.experts.parameters():
            p.requires_grad_(False)
        model.experts.eval()
        with torch.no_grad():
            maps = {i: e(batch["images"][i]) for i, e in enumerate(model.experts)}
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw_supported(params))

        def loss() -> torch.Tensor:
            return model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                images=batch["images"],
                precomputed=maps,
            ).loss

        with FlopCounterMode(display=False) as counter:
            loss().backward()
        optimizer.zero_grad(set_to_none=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()

        seconds = median_time(step, cpu, repeats, 2)
        peak = measure_matmul_peak(1024, cpu)
        found = {"step_s": seconds, "achieved": counter.get_total_flops() / seconds, "peak": peak}
        if compile_llm:
            compile_llm_blocks(model)
            start = time.perf_counter()
            step()
            found["compile_s"] = time.perf_counter() - start
            found["compiled_step_s"] = median_time(step, cpu, repeats, 2)
    finally:
        torch.set_num_threads(before)
    return found


@register_section("cells")
def bench_cells(cfg: BenchConfig, device: torch.device, work: Path) -> list[dict]:
    """The default sweep cell's wall-time breakdown and its training step's fraction of peak."""
    spec = default_cell_spec(cfg)
    wall, row = run_cell_command(spec, work / "bench-cell")
    parts = cell_breakdown(wall, row)
    cell = f"{'+'.join(spec['experts']['combinations'][0])} {_fusion_name(spec['fusions'][0])} "
    cell += f"{spec['recipes'][0]} (default sweep cell)"
    executor = spec.get("executor", {})
    threads = int(executor.get("threads") or 1)
    note = (
        f"moe-vision sweep in a fresh process, cold feature cache, executor {executor}; sizes "
        f"{spec.get('data', {}).get('benchmark_sizes')}; accuracy {row.get('accuracy/overall')}"
    )
    cpu = torch.device("cpu")  # cells run where the sweep puts them; this box's CPU here
    rows = [bench_row("cells", cell, "cell_wall_s", wall, "s", cpu, note)]
    rows += [bench_row("cells", cell, k, v, "s", cpu, note) for k, v in parts.items()]
    share = parts["train_steps_s"] / wall
    rows.append(bench_row("cells", cell, "share_training_steps", share, "x", cpu, note))
    model_cfg = {"experts": list(spec["experts"]["combinations"][0])}
    model_cfg["fusion"] = _fusion_name(spec["fusions"][0])
    model_cfg.update(spec.get("model") or {})
    overrides = (spec.get("run") or {}).get("overrides") or {}
    batch = int(overrides.get("*", {}).get("batch_size", cfg.batch_size))
    found = training_step_fraction_of_peak(
        model_cfg, batch, threads, work, cfg.repeats, compile_llm=cfg.cell_compile
    )
    step_note = (
        f"frozen-expert training step (LLM + projector train, maps given), batch {batch}, "
        f"{threads} thread(s); fp32 matmul peak measured at the same thread count"
    )
    name = f"{'+'.join(model_cfg['experts'])} {model_cfg['fusion']} b{batch} {threads}t"
    step = {
        "step_s": (found["step_s"], "s"),
        "achieved_flops_per_s": (found["achieved"], "FLOP/s"),
        "matmul_peak_flops_per_s": (found["peak"], "FLOP/s"),
        "fraction_of_peak": (found["achieved"] / found["peak"], "x"),
    }
    if "compiled_step_s" in found:  # train.compile_llm: the first step compiles
        step["compile_s"] = (found["compile_s"], "s")
        step["compiled_step_s"] = (found["compiled_step_s"], "s")
        step["compiled_speedup"] = (found["step_s"] / found["compiled_step_s"], "x")
    rows += [bench_row("cells", name, k, v, u, cpu, step_note) for k, (v, u) in step.items()]
    return rows
