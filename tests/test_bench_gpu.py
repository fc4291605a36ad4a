"""The GPU bench section's arithmetic, checked on CPU: which peak a device name gets, which LLM
shape a memory size trains, model FLOPs without the recomputed forward, the text batch, and the
harness writing each row the moment a section yields it (a killed run keeps its rows)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from experts.registry import Registry
from moe_vision.bench import harness
from moe_vision.bench.gpu import (
    BYTES_PER_PARAM,
    device_bf16_peak,
    is_out_of_memory,
    model_flops,
    plan_shape,
    text_batch,
)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
    ],
)
def test_each_part_gets_its_own_data_sheet_peak(name: str, peak: float) -> None:
    assert device_bf16_peak(name)[0] == peak


def test_an_unknown_device_has_no_peak() -> None:
    assert device_bf16_peak("Some GPU")[0] is None


def test_the_plan_takes_the_largest_shape_that_leaves_the_reserve() -> None:
    params = {"big": 7_000_000_000, "mid": 3_000_000_000, "small": 500_000_000}
    # 80 GiB: 7B needs 52 GiB, more than 75% of 80 GiB? 0.75 * 80 = 60 GiB: it fits
    assert plan_shape(80 * 2**30, params)[0] == "big"
    assert plan_shape(40 * 2**30, params)[0] == "mid"
    assert plan_shape(1 * 2**30, params)[0] is None
    assert plan_shape(80 * 2**30, params)[1]["mid"] == 3_000_000_000 * BYTES_PER_PARAM


def test_allocation_failures_of_every_kind_are_recognised() -> None:
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.fixture(scope="module")
def tiny_model():
    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(0)
    cfg = {"experts": ["clip-tiny"], "fusion": "channel_concat",
           "llm_options": {"vocab_size": 1000}}  # fmt: skip
    return MoEVisionModel.from_config(cfg).eval()


def test_a_real_vocabulary_is_larger_than_the_tiny_tokenizer(tiny_model) -> None:
    assert tiny_model.llm.get_input_embeddings().num_embeddings == 1000
    from moe_vision.model.mllm import MoEVisionModel

    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        MoEVisionModel.from_config({"experts": ["clip-tiny"], "llm_options": {"vocab_size": 10}})


def test_text_batch_has_one_placeholder_and_trains_the_second_half(tiny_model) -> None:
    from PIL import Image

    images = [tiny_model.experts[0].preprocess([Image.new("RGB", (32, 32))] * 2)]
    batch = text_batch(tiny_model, images, 2, 40)
    ids = batch["input_ids"]
    assert ids.shape == (2, 40)
    assert ((ids == tiny_model.image_token_id).sum(1) == 1).all()
    assert (batch["labels"][:, :20] == -100).all() and (batch["labels"][:, 20:] >= 0).all()
    loss = tiny_model(**batch).loss
    assert torch.isfinite(loss)


def test_model_flops_are_three_forwards_whatever_the_checkpointing(tiny_model) -> None:
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    images = [tiny_model.experts[0].preprocess([Image.new("RGB", (32, 32))] * 2)]
    batch = text_batch(tiny_model, images, 2, 40)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tiny_model(**batch)
    forward = counter.get_total_flops()
    assert model_flops(tiny_model, batch) == 3 * forward
    tiny_model.gradient_checkpointing_enable()
    try:
        assert model_flops(tiny_model, batch) == 3 * forward  # the recompute is not counted
    finally:
        tiny_model.gradient_checkpointing_disable()


def test_rows_reach_the_csv_as_a_section_yields_them(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "bench.csv"
    seen: list[list[dict]] = []

    def section(cfg, device, work):
        yield harness.bench_row("probe", "c", "first", 1.0, "x", device, "")
        seen.append(list(csv.DictReader(out.open())))  # read while the section still runs
        raise RuntimeError("killed by a time limit")

    sections = Registry("bench section", ordered=True)
    sections.register("probe", section)
    monkeypatch.setattr(harness, "BENCH_SECTIONS", sections)
    with pytest.raises(RuntimeError, match="time limit"):
        harness.run_bench(harness.BenchConfig(), out, sections=["probe"], device="cpu")
    assert [r["metric"] for r in seen[0]] == ["first"]
    assert [r["metric"] for r in csv.DictReader(out.open())] == ["first"]
