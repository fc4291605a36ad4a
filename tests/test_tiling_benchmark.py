"""Opt-in benchmark categories for tiling (moe_vision.data.benchmark_tiling)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.benchmark_tasks import ANSWERS, CATEGORIES, QUESTIONS
from moe_vision.data.benchmark_tiling import EXTRA_CATEGORIES, TILING_CATEGORIES


def test_default_sizes_unchanged():
    """The default categories leave the manifest (and the benchmark folder's tag) as before."""
    assert BenchmarkSizes().to_dict() == {"align": 600, "instruct": 1200, "val": 120, "test": 2400}
    assert BenchmarkSizes(categories=list(CATEGORIES)) == BenchmarkSizes()
    with pytest.raises(ValueError, match="categories"):
        BenchmarkSizes(categories=("ocr", "receipt"))
    with pytest.raises(ValueError, match="categories"):
        BenchmarkSizes(categories=())


def test_opt_in_categories(tmp_path):
    cats = CATEGORIES + TILING_CATEGORIES
    sizes = BenchmarkSizes(align=8, instruct=8, val=0, test=16, categories=cats)
    paths = generate_benchmark(tmp_path, seed=0, sizes=sizes)
    assert json.loads(paths.manifest.read_text())["sizes"]["categories"] == list(cats)
    records = json.loads(paths.split("test").read_text())
    assert [r["category"] for r in records] == list(cats) * 2
    for r in records:
        if r["category"] not in TILING_CATEGORIES:
            continue
        base = EXTRA_CATEGORIES[r["category"]]
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        assert r["conversations"][1]["value"] in ANSWERS[base]
        assert question in QUESTIONS[base]
        w, h = Image.open(paths.images / r["image"]).size
        assert max(w, h) / min(w, h) >= 3  # far from square: squashing loses detail
