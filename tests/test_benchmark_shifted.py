"""The shifted test split: other words, palette, font and background than every other split
and the zoo's pretraining; deterministic; answers true to its images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.benchmark_scenes import DEFAULT_STYLE
from moe_vision.data.benchmark_shifted import SHIFTED_COLORS, SHIFTED_STYLE, SHIFTED_WORDS
from moe_vision.data.benchmark_tasks import ANSWERS, CATEGORIES, COLORS, WORDS
from moe_vision.zoo.data import CHARSET, MAX_TEXT, vocabulary

SIZES = BenchmarkSizes(align=0, instruct=0, val=0, test=12, test_shifted=36)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    return generate_benchmark(tmp_path_factory.mktemp("shifted") / "b", seed=1, sizes=SIZES)


def _records(bench, split: str) -> list[dict]:
    return json.loads(bench.split(split).read_text())


def test_words_are_disjoint_from_the_benchmark_and_pretraining() -> None:
    assert len(set(SHIFTED_WORDS)) == len(SHIFTED_WORDS) == len(WORDS)
    assert not set(SHIFTED_WORDS) & set(WORDS)
    assert not {w.lower() for w in SHIFTED_WORDS} & {w.lower() for w in vocabulary()}
    assert not {w.lower() for w in SHIFTED_WORDS} & {
        a.lower() for c in CATEGORIES for a in ANSWERS[c]
    }
    # Pretraining renders uniform random strings of 1..MAX_TEXT characters of CHARSET: a given
    # word of 4+ characters is drawn with probability <= 1 / (MAX_TEXT * 36**4) per text image.
    assert all(len(w) >= 4 and set(w) <= set(CHARSET) for w in SHIFTED_WORDS)
    assert 1 / (MAX_TEXT * len(CHARSET) ** 4) < 1e-6


def test_palette_has_the_same_names_at_other_colours() -> None:
    assert list(SHIFTED_COLORS) == list(COLORS)
    for name, rgb in SHIFTED_COLORS.items():
        distance = {c: float(np.linalg.norm(np.subtract(rgb, v))) for c, v in COLORS.items()}
        assert min(distance, key=distance.get) == name, f"shifted {name} reads as another colour"
        assert distance[name] >= 25, f"shifted {name} is the default {name} ({distance[name]:.0f})"
    assert SHIFTED_STYLE.text is not DEFAULT_STYLE.text
    assert SHIFTED_STYLE.background is not DEFAULT_STYLE.background


def test_split_is_deterministic_and_apart_from_test(bench, tmp_path: Path) -> None:
    again = generate_benchmark(tmp_path / "again", seed=1, sizes=SIZES)
    assert bench.split("test_shifted").read_bytes() == again.split("test_shifted").read_bytes()
    for a, b in zip(_records(bench, "test_shifted"), _records(again, "test_shifted")):
        assert (bench.images / a["image"]).read_bytes() == (again.images / b["image"]).read_bytes()
    # The in-distribution test split is the same with or without the shifted one.
    plain = generate_benchmark(
        tmp_path / "plain", seed=1, sizes=BenchmarkSizes(align=0, instruct=0, val=0, test=12)
    )
    assert plain.split("test").read_bytes() == bench.split("test").read_bytes()


def _background_of(img: np.ndarray) -> np.ndarray:
    """Pale pixels (every channel within 40 of the others and above 150)."""
    spread = img.max(-1).astype(int) - img.min(-1).astype(int)
    return (spread < 40) & (img.min(-1) > 150)


def test_answers_and_style(bench) -> None:
    records = _records(bench, "test_shifted")
    assert {r["category"] for r in records} == set(CATEGORIES)
    for r in records:
        img = np.asarray(Image.open(bench.images / r["image"]).convert("RGB"))
        answer, category = r["conversations"][1]["value"], r["category"]
        if category == "ocr":
            assert answer in SHIFTED_WORDS
        else:
            assert answer in ANSWERS[category]
        if category != "ocr":
            # Not one flat tone: a gradient with noise.
            assert len(np.unique(img[_background_of(img)].reshape(-1, 3), axis=0)) > 50
        if category == "color":
            shape = img[img.max(-1).astype(int) - img.min(-1).astype(int) > 60]
            mean = shape.reshape(-1, 3).mean(0)
            nearest = min(
                SHIFTED_COLORS, key=lambda c: np.sum((np.subtract(SHIFTED_COLORS[c], mean)) ** 2)
            )
            assert nearest == answer, r["id"]
