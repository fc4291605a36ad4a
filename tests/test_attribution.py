"""Expert attribution: the ablation context managers leave the normal path untouched, the mean
maps equal a brute-force average, the ablated evaluation equals one through an independently
patched expert, the drop table equals hand-computed differences; staged experts; CLI; errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import seeing_model

from experts.base import collate_inputs
from experts.spec import FeatureMap
from moe_vision import results
from moe_vision.analysis.attribution import (
    ablate_expert,
    attribute,
    record_means,
)
from moe_vision.cli import main
from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.evaluation.evaluate import evaluate
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.io import read_json, write_json
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel

CONFIG = ModelConfig(
    experts=["clip-tiny", "convnext-tiny"],
    fusion="channel_concat",
    fusion_options={"grid": [4, 4], "dim": 48},
    llm="tiny-qwen2",
)
SIZES = BenchmarkSizes(align=6, instruct=6, val=0, test=12)


def _seeing(config: ModelConfig) -> MoEVisionModel:
    """A model whose answers depend on the pixels (LLM and projector matrices at std 0.3)."""
    return seeing_model(config)


def _make_run(root: Path, config: ModelConfig) -> Path:
    """A finished run folder as `moe-vision train` leaves it (config.yaml, model/,
    predictions.json, metrics.json), with a model that sees."""
    bench = generate_benchmark(root / "bench", seed=0, sizes=SIZES)
    run = root / "run"
    model = _seeing(config)
    model.save_pretrained(run / "model")
    cfg = RunConfig(
        model=config,
        recipe="llava",
        data=DataConfig(benchmark_sizes=SIZES.to_dict(), benchmark_dir=str(bench.root)),
        cache_dir=str(root / "cache"),
        eval_batch_size=8,
    )
    cfg.to_yaml(run / "config.yaml", resolve=True)
    result = evaluate(model, bench.split("test"), bench.images, batch_size=8)
    write_json(run / results.PREDICTIONS_FILE, result.predictions)
    write_json(run / results.METRICS_FILE, result.to_metrics())
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("attr"), CONFIG)


def _inputs(model: MoEVisionModel, run: Path) -> list[dict]:
    """Each expert's batched inputs for the run's test images."""
    bench = run.parent / "bench"
    records = json.loads((bench / "test.json").read_text())
    images = [Image.open(bench / "images" / r["image"]) for r in records]
    return [collate_inputs([pre(im) for im in images]) for pre in model.preprocessors]


def test_context_managers_leave_the_normal_path_untouched(run_dir: Path) -> None:
    model = MoEVisionModel.from_pretrained(run_dir / "model").eval()
    inputs = _inputs(model, run_dir)
    with torch.no_grad():
        before = model.encode_images(inputs)
        with record_means(model) as means:
            recorded = model.encode_images(inputs)
        torch.testing.assert_close(recorded, before, rtol=0, atol=0)  # recording changes nothing
        # brute-force mean map of expert 1 over the images
        ref = model.experts[1](inputs[1]).features.double().mean(0)
        torch.testing.assert_close(means[1].mean(("forward", None, 0)), ref)
        with ablate_expert(model, 1, "mean", means[1]):
            fmap = model.experts[1](inputs[1])
            ablated = model.encode_images(inputs)
        assert isinstance(fmap, FeatureMap)
        torch.testing.assert_close(fmap.features, ref.float().expand_as(fmap.features))
        assert not torch.allclose(ablated, before)
        with ablate_expert(model, 0, "zero"):
            assert not model.experts[0](inputs[0]).features.any()
        after = model.encode_images(inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for expert in model.experts:
        assert not expert._forward_hooks and "finish" not in expert.__dict__
    with pytest.raises(ValueError, match="mode must be one of"):
        with ablate_expert(model, 0, "dropout"):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with ablate_expert(model, 5, "zero"):
            pass
    with pytest.raises(ValueError, match="needs the expert's MeanMaps"):
        with ablate_expert(model, 0, "mean"):
            pass


def test_attribute_against_independent_references(run_dir: Path) -> None:
    res = attribute(run_dir, n_boot=500)
    # the intact pass reproduces the run's own evaluation, answer for answer
    saved = read_json(run_dir / results.PREDICTIONS_FILE)
    assert [p["prediction"] for p in res.intact] == [p["prediction"] for p in saved]
    # reference for the ablation: patch the expert's forward_map to return the mean map
    model = MoEVisionModel.from_pretrained(run_dir / "model").eval()
    inputs = _inputs(model, run_dir)
    with torch.no_grad():
        mean = model.experts[1](inputs[1]).features.double().mean(0).float()  # (C, H, W)
    expert = model.experts[1]
    original = expert.forward_map

    def mean_map(x):
        out = original(x)
        return FeatureMap(mean.expand_as(out.features), out.stride, out.source, out.mask)

    expert.forward_map = mean_map
    bench = run_dir.parent / "bench"
    ref = evaluate(model, bench / "test.json", bench / "images", batch_size=8).predictions
    answers = [p["prediction"] for p in res.ablated["convnext-tiny"]]
    assert answers == [p["prediction"] for p in ref]
    assert answers != [p["prediction"] for p in res.intact]  # the expert matters here
    # the drop table: hand-computed differences of the two answer sets, per category
    table = res.table.set_index(["expert", "category"])
    for name, preds in res.ablated.items():
        for cat in {p["category"] for p in saved} | {"overall"}:
            pick = [i for i, p in enumerate(saved) if cat == "overall" or p["category"] == cat]
            intact = np.mean([res.intact[i]["score"] for i in pick])
            ablated = np.mean([preds[i]["score"] for i in pick])
            row = table.loc[(name, cat)]
            assert row["drop"] == pytest.approx(intact - ablated)
            assert row["n"] == len(pick) and row["lo"] <= row["drop"] <= row["hi"]
    # written next to the run, and read into a results row like a sweep cell's
    data = read_json(run_dir / results.ATTRIBUTION_FILE)
    assert data["mode"] == "mean" and data["metrics"] == pytest.approx(res.to_metrics())
    row = results.cell_row({"cell_id": "run"}, run_dir)
    assert row["drop/convnext-tiny/overall"] == pytest.approx(
        table.loc[("convnext-tiny", "overall"), "drop"]
    )
    assert row["accuracy/overall/lo"] <= row["accuracy/overall"] <= row["accuracy/overall/hi"]


def test_staged_vit_is_ablated_through_finish(run_dir: Path) -> None:
    config = ModelConfig(
        experts=["clip-tiny", "convnext-tiny"],
        fusion="mr_adapter",
        llm="tiny-qwen2",
    )
    model = _seeing(config)
    assert model.fusion.staged_experts()  # the ViT runs stage by stage: no forward call
    inputs = _inputs(model, run_dir)
    with torch.no_grad():
        before = model.encode_images(inputs)
        with record_means(model) as means:
            model.encode_images(inputs)
        assert ("finish", 0) in means[0].sums
        with ablate_expert(model, 0, "mean", means[0]):
            ablated = model.encode_images(inputs)
        assert not torch.allclose(ablated, before)
        torch.testing.assert_close(model.encode_images(inputs), before, rtol=0, atol=0)


def test_cli_and_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["attribute", "--run", str(run_dir), "--mode", "zero", "--limit", "4", "--n-boot", "200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "clip-tiny" in out and "convnext-tiny" in out and "drop" in out
    assert read_json(run_dir / results.ATTRIBUTION_FILE)["mode"] == "zero"
    assert (run_dir / "attribution.csv").exists()
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        attribute(tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        attribute(run_dir, mode="drop")


TILED = {"clip-tiny": {"tiling": {"max_tiles": 3, "thumbnail": True}}}
RAGGED = {  # the experts that tell an image's aspect ratio through their mask or tile grid
    "pix2struct/channel_concat": ModelConfig(
        experts=["pix2struct-tiny"],
        fusion="channel_concat",
        fusion_options={"grid": [4, 4]},
        llm="tiny-qwen2",
    ),
    "tiled/sequence_append": ModelConfig(
        experts=["clip-tiny", "pix2struct-tiny"],
        expert_options={"clip-tiny": {"tiling": {"max_tiles": 3}}},
        fusion="sequence_append",
        fusion_options={"per_expert_grid": True},
        llm="tiny-qwen2",
    ),
    "tiled+thumbnail/sequence_append": ModelConfig(
        experts=["clip-tiny"],
        expert_options=TILED,
        fusion="sequence_append",
        fusion_options={"per_expert_grid": True},
        llm="tiny-qwen2",
    ),
}


@pytest.mark.parametrize("mode", ["mean", "zero"])
@pytest.mark.parametrize("case", sorted(RAGGED))
def test_every_expert_ablated_gives_every_image_the_same_tokens(case: str, mode: str) -> None:
    torch.manual_seed(0)
    model = MoEVisionModel(RAGGED[case]).eval()
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (30, 100, 3), dtype=np.uint8))  # 1 x 3 tiles
    tall = Image.fromarray(rng.integers(0, 256, (90, 40, 3), dtype=np.uint8))  # 2 x 1 tiles
    inputs = [collate_inputs([pre(wide), pre(tall)]) for pre in model.preprocessors]
    with torch.no_grad():
        before = model.encode_images(inputs)
        assert not torch.equal(before[0], before[1])
        with record_means(model) as means:
            model.encode_images(inputs)
        with contextlib.ExitStack() as stack:
            for i in range(len(model.experts)):
                stack.enter_context(ablate_expert(model, i, mode, means[i]))
            ablated = model.encode_images(inputs)
        # no aspect ratio, tile grid or thumbnail reaches the LLM: the two images are one
        torch.testing.assert_close(ablated[0], ablated[1], rtol=0, atol=0)
        torch.testing.assert_close(model.encode_images(inputs), before, rtol=0, atol=0)
    if "thumbnail" in case:
        assert ("forward", None, 0, "thumbnail") in means[0].sums


def test_cli_attributes_a_tiled_expert_with_a_thumbnail(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = ModelConfig(
        experts=["clip-tiny", "convnext-tiny"],
        expert_options=TILED,
        fusion="sequence_append",
        fusion_options={"grid": [4, 4]},  # 3 maps x 16 tokens
        llm="tiny-qwen2",
    )
    run = _make_run(tmp_path, config)
    args = ["attribute", "--run", str(run), "--limit", "4", "--n-boot", "200"]
    assert main(args) == 0
    assert "clip-tiny" in capsys.readouterr().out
    data = read_json(run / results.ATTRIBUTION_FILE)
    assert data["mode"] == "mean" and "drop/clip-tiny/overall" in data["metrics"]
