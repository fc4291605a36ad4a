"""The *texture* category: its answer is absent from CLIP-mini's 64-px input and plain at
ConvNeXt-mini's 256 px, checked on raw pixels; listing it leaves the other categories as they
were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import fft
from scipy.stats import binomtest

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.benchmark_resolution import (
    SCENES,
    TEXTURE_SIZE,
    render_texture,
    texture_layout,
)
from moe_vision.data.benchmark_tasks import ANSWERS, CATEGORIES, CHANCE, QUESTIONS, TEXTURES

N_PIXEL_CHECK = 400  # half to fit, half held out: 200 held-out answers, chance 1/4


def _expert_input(name: str):
    """``(input size, image -> (H, W, 3) float array)``: the expert's own resize + normalise."""
    from experts.images import resize_normalise
    from experts.registry import get_spec

    spec = get_spec(name)
    return (
        spec.input_size,
        lambda im: (
            resize_normalise(im, spec.input_size, spec.mean, spec.std).permute(1, 2, 0).numpy()
        ),
    )


def _spectrum(x: np.ndarray, pool: int = 16) -> np.ndarray:
    """``(3 * pool * pool,)`` features: the pooled log amplitude spectrum of each channel of
    ``x`` ``(H, W, 3)``, a fixed, translation-invariant map of the pixels (a linear classifier
    on the raw pixels cannot use a pattern whose place and phase vary, at any resolution)."""
    a = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    a -= a.mean(axis=(1, 2), keepdims=True)
    spec = np.log1p(np.abs(fft.fft2(a, workers=1)))
    h = a.shape[1] // pool
    return spec.reshape(3, pool, h, pool, h).mean(axis=(2, 4)).ravel()


def _held_out_accuracy(features: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Correct answers of a logistic regression fitted on the first half, on the second."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    half = len(labels) // 2
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(features[:half], labels[:half])
    return int((clf.predict(features[half:]) == labels[half:]).sum()), len(labels) - half


def test_texture_is_absent_at_64px_and_plain_at_256px() -> None:
    size64, clip_input = _expert_input("clip-mini")
    size256, convnext_input = _expert_input("convnext-mini")
    assert size64 == (64, 64) and size256 == (TEXTURE_SIZE, TEXTURE_SIZE)
    clip_std = np.array(_std("clip-mini"), dtype=np.float32)

    # 1. The same scene with each pattern: CLIP-mini's inputs differ by at most one level.
    rng = np.random.default_rng([0, 1])
    for _ in range(30):
        layout = texture_layout(rng)
        inputs = [clip_input(render_texture(layout, t)) * clip_std * 255 for t in TEXTURES]
        worst = max(float(np.abs(x - inputs[0]).max()) for x in inputs[1:])
        assert worst <= 1.0 + 1e-3, f"the 64-px inputs of one scene differ by {worst:.2f} levels"
        raw = [np.asarray(render_texture(layout, t), dtype=np.int32) for t in TEXTURES]
        assert min(int(np.abs(x - raw[0]).max()) for x in raw[1:]) >= 40  # plain at 256 px

    # 2. A classifier on the 64-px inputs is at chance; on the 256-px ones it is not.
    rng = np.random.default_rng([0, 2])
    images, labels = [], []
    for _ in range(N_PIXEL_CHECK):
        img, scene = SCENES["texture"](rng)
        images.append(img)
        labels.append(TEXTURES.index(scene["texture"]))
    y = np.array(labels)
    correct64, n = _held_out_accuracy(np.stack([_spectrum(clip_input(im)) for im in images]), y)
    correct256, _ = _held_out_accuracy(
        np.stack([_spectrum(convnext_input(im)) for im in images]), y
    )
    chance = CHANCE["texture"]
    assert chance == 0.25
    p64 = binomtest(correct64, n, chance).pvalue
    assert p64 > 0.01, f"64 px: {correct64}/{n} correct, p = {p64:.3g} against chance"
    assert correct256 / n > 0.9, f"256 px: only {correct256}/{n} correct"


def _std(name: str) -> tuple[float, float, float]:
    from experts.registry import get_spec

    return get_spec(name).std


def test_listing_texture_leaves_the_other_categories_unchanged(tmp_path: Path) -> None:
    sizes = {"align": 0, "instruct": 12, "val": 0, "test": 14}
    plain = generate_benchmark(tmp_path / "a", seed=2, sizes=BenchmarkSizes(**sizes))
    cats = CATEGORIES + ("texture",)
    more = generate_benchmark(
        tmp_path / "b", seed=2, sizes=BenchmarkSizes(**sizes, categories=cats)
    )
    for split, n in sizes.items():
        old = json.loads(plain.split(split).read_text())
        new = json.loads(more.split(split).read_text())
        kept = [r for r in new if r["category"] != "texture"]
        assert [r["conversations"] for r in kept] == [r["conversations"] for r in old[: len(kept)]]
        for a, b in zip(old, kept):
            pa = np.asarray(Image.open(plain.images / a["image"]))
            pb = np.asarray(Image.open(more.images / b["image"]))
            assert np.array_equal(pa, pb)
        for r in new:
            if r["category"] == "texture":
                assert r["conversations"][1]["value"] in ANSWERS["texture"]
                assert r["conversations"][0]["value"].split("\n", 1)[1] in QUESTIONS["texture"]
                img = Image.open(more.images / r["image"])
                assert img.size == (TEXTURE_SIZE, TEXTURE_SIZE)
        assert n == 0 or any(r["category"] == "texture" for r in new)


def test_unknown_texture_is_refused() -> None:
    layout = texture_layout(np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown texture 'dots'"):
        render_texture(layout, "dots")
