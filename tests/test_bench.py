"""``moe-vision bench`` at tiny sizes: every section runs and writes the CSV schema.

No timing assertions (timings depend on the machine); the checks are on what is measured:
the direct path computes the mixture's loss, FLOPs match an independent count, the cache is
hit, and the CSV has one row per metric with finite values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moe_vision.bench.batches import benchmark_batch
from moe_vision.bench.harness import (
    CSV_COLUMNS,
    DEFAULT_MODEL,
    BenchConfig,
    list_sections,
    run_bench,
)
from moe_vision.bench.measure import measure_matmul_peak, peak_memory_mb, reset_peak_memory
from moe_vision.bench.overhead import direct_forward, mixture_loss
from moe_vision.bench.throughput import train_step_flops
from moe_vision.cli import main
from moe_vision.commands.bench import quick_config


@pytest.fixture(scope="module")
def tiny_model_and_batch(tmp_path_factory: pytest.TempPathFactory):
    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(0)
    model = MoEVisionModel.from_config(DEFAULT_MODEL).eval()
    batch = benchmark_batch(model, 2, tmp_path_factory.mktemp("bench-data"))
    return model, batch


def test_direct_path_computes_the_same_loss_and_gradients(tiny_model_and_batch) -> None:
    model, batch = tiny_model_and_batch
    model.zero_grad()
    mixture = mixture_loss(model, batch)
    mixture.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    direct, paths = direct_forward(model, batch)
    direct.backward()
    assert paths == ["library", "library"]  # both experts ran as bare library modules
    torch.testing.assert_close(direct, mixture)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_flop_count_matches_the_llm_alone_lower_bound(tiny_model_and_batch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model, batch = tiny_model_and_batch
    total = train_step_flops(model, batch)
    embeds, mask, labels = model.splice(
        batch["input_ids"],
        model.encode_images(batch["images"]).detach(),
        batch["attention_mask"],
        batch["labels"],
    )
    with FlopCounterMode(display=False) as counter:
        model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()
    model.zero_grad()
    assert total > counter.get_total_flops() > 0  # experts + fusion add to the LLM's FLOPs


def test_matmul_peak_and_memory_are_positive() -> None:
    cpu = torch.device("cpu")
    assert measure_matmul_peak(64, cpu, repeats=2) > 0
    reset_peak_memory(cpu)  # Linux: the peak restarts from the current RSS
    before = peak_memory_mb(cpu)
    block = torch.ones(64, 2**20 // 4)  # 64 MiB, touched
    assert peak_memory_mb(cpu) - before > 48
    del block


def test_bench_help_names_every_registered_section_in_run_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moe_vision.commands.bench import SECTIONS

    assert SECTIONS == tuple(list_sections())
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"({', '.join(SECTIONS)}; default: all)" in help_text


def test_bench_cli_writes_the_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.csv"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    assert "written:" in capsys.readouterr().out
    df = pd.read_csv(out)
    assert list(df.columns) == list(CSV_COLUMNS)
    assert set(df.section) == set(list_sections())
    metrics = set(zip(df.section, df.metric))
    for needed in [
        ("overhead", "overhead_ratio"),
        ("feature_cache", "speedup"),
        ("throughput", "samples_per_s"),
        ("throughput", "achieved_flops_per_s"),
        ("throughput", "fraction_of_peak"),
        ("throughput", "peak_memory_mb"),
        ("feature_cache", "cache_speedup_bound"),
        ("feature_cache", "train_speedup_fill_excluded"),
        ("cells", "cell_wall_s"),
        ("cells", "share_training_steps"),
        ("cells", "fraction_of_peak"),
        ("data", "first_step_s"),
        ("feature_cache", "train_speedup_with_fill"),
    ]:
        assert needed in metrics
    assert all(math.isfinite(v) and v >= 0 for v in df.value)
    positive = df[~df.metric.isin(["checkpoint_s", "data_s", "features_s", "eval_s", "other_s"])]
    assert (positive.value > 0).all(), positive[positive.value <= 0]
    assert df[df.section == "throughput"].config.nunique() == 2  # default + "real" config
    tp = df[df.section == "throughput"].pivot(index="config", columns="metric", values="value")
    np.testing.assert_allclose(
        tp.fraction_of_peak, tp.achieved_flops_per_s / tp.matmul_peak_flops_per_s
    )
    np.testing.assert_allclose(
        tp.achieved_flops_per_s, tp.flops_per_sample * tp.samples_per_s, rtol=1e-6
    )
    share = df[df.metric == "frozen_expert_flops_share"].value
    assert ((share > 0) & (share < 1)).all()
    # the tiny sweep and the (here: tiny) real-size sweep, both cached vs uncached
    assert (df[df.section == "feature_cache"].metric == "speedup").sum() == 2
    cells = df[df.section == "cells"].set_index("metric").value
    assert 0 < cells.share_training_steps < 1
    parts = ["train_steps_s", "precompute_s", "data_s", "features_s", "checkpoint_s", "eval_s"]
    parts.append("other_s")
    np.testing.assert_allclose(cells[parts].sum(), cells.cell_wall_s, rtol=1e-6)
    assert 0 < cells.fraction_of_peak < 1.5
    if not torch.cuda.is_available():
        gpu = df[df.section == "gpu"]
        assert gpu.metric.iloc[0] == "skipped" and "no CUDA" in gpu.note.iloc[0]
        assert set(gpu.metric.iloc[1:]) == {"plan_params", "plan_shape_params"}
    cache_note = df[(df.section == "feature_cache") & (df.metric == "speedup")].note.iloc[0]
    hits = int(cache_note.split("cache hits ")[1].split("/")[0])
    assert hits > 0  # the second fusion's cell read the first one's expert maps
    assert quick_config().real_model["experts"] != DEFAULT_MODEL["experts"]
    with pytest.raises(ValueError, match="unknown bench sections"):
        run_bench(quick_config(), tmp_path / "x.csv", sections=["nope"])


def test_cell_breakdown_splits_the_wall_time() -> None:
    from moe_vision.bench.cells import cell_breakdown, default_cell_spec
    from moe_vision.sweeps.default import default_sweep

    row = {"time/step_s": 6.0, "time/data_s": 1.0, "time/features_s": 0.5, "eval_time_s": 0.5}
    row["time/precompute_s"] = 1.5
    parts = cell_breakdown(10.0, row)
    assert parts["train_steps_s"] == 6.0 and parts["checkpoint_s"] == 0.0
    assert parts["precompute_s"] == 1.5 and parts["other_s"] == pytest.approx(0.5)
    assert cell_breakdown(5.0, row)["other_s"] == 0.0  # never negative
    spec = default_cell_spec(BenchConfig())
    first = default_sweep().expand()[0]
    assert spec["experts"]["combinations"] == [list(first.experts)] and len(spec["fusions"]) == 1
    assert spec["executor"] == default_sweep().executor  # the cell runs as the sweep runs it


def test_first_step_row_times_the_train_command_to_its_first_optimiser_step(tmp_path) -> None:
    """Issue 27 item 5's bench row at reduced size: 20K records over 300 images, llava recipe,
    a fresh feature cache; both stages reach their first step (the first stage ended)."""
    from moe_vision.bench.data import DataBenchConfig, first_step_rows

    cfg = DataBenchConfig(records=[20_000], first_step_images=300)
    df = pd.DataFrame(first_step_rows(cfg, torch.device("cpu"), tmp_path))
    assert list(df.metric) == ["first_step_s", "last_stage_first_step_s"]
    assert set(df.config) == {"time to first optimiser step, 20000 records over 300 images"}
    first, last = df.value
    assert 0 < first <= last
    assert (tmp_path / "first-step-run-20000" / "checkpoints" / "ckpt-000000").is_dir()
    stored = list((tmp_path / "first-step-cache-20000").glob("*/shard-*.safetensors"))
    assert len(stored) == 2  # one shard per expert: 300 maps each, stored once


def test_feature_cache_ratio_counts_the_cache_fill() -> None:
    """Issue 27 item 16: the cached clock used to start after the fill (precompute_s), so the
    ratio (here 100 / 10 = 10x) could pass the number of uses per map; with the fill: 4x."""
    from moe_vision.bench.feature_cache import cache_ratios

    frames = {
        "uncached": pd.DataFrame({"train_time_s": [60.0, 40.0]}),
        "cached": pd.DataFrame({"train_time_s": [6.0, 4.0], "time/precompute_s": [15.0, 0.0]}),
    }
    got = {k: v for k, (v, _) in cache_ratios(frames, {"uncached": 120.0, "cached": 40.0}).items()}
    assert got["train_speedup_with_fill"] == pytest.approx(100 / 25)
    assert got["train_speedup_fill_excluded"] == pytest.approx(100 / 10)
    assert got["cache_fill_s"] == 15.0 and got["cached_train_with_fill_s"] == 25.0
    assert got["speedup"] == pytest.approx(3.0)  # the whole sweep
