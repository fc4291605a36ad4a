"""The built-in benchmark: determinism, disjoint splits, idempotence, answers true to images."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moe_vision.data.benchmark import SPLITS, BenchmarkPaths, BenchmarkSizes, generate_benchmark
from moe_vision.data.benchmark_scenes import DETAIL_SIZE, IMAGE_SIZE
from moe_vision.data.benchmark_shifted import SHIFTED_WORDS
from moe_vision.data.benchmark_tasks import ANSWERS, CATEGORIES, CHANCE, COLORS

SIZES = BenchmarkSizes(align=18, instruct=36, val=12, test=30, test_shifted=12)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    return generate_benchmark(tmp_path_factory.mktemp("bench") / "b", seed=3, sizes=SIZES)


def _records(bench, split: str) -> list[dict]:
    return json.loads(bench.split(split).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(bench, tmp_path: Path) -> None:
    again = generate_benchmark(tmp_path / "again", seed=3, sizes=SIZES)
    assert _files(bench.root) == _files(again.root)
    other = generate_benchmark(tmp_path / "other", seed=4, sizes=SIZES)
    assert bench.split("test").read_bytes() != other.split("test").read_bytes()


def test_records_are_llava_format_with_finite_answers(bench) -> None:
    for split in SPLITS:
        records = _records(bench, split)
        assert len(records) == getattr(SIZES, split)
        assert len({r["id"] for r in records}) == len(records)
        counts = Counter(r["category"] for r in records)
        assert set(counts) == set(CATEGORIES) and max(counts.values()) - min(counts.values()) <= 1
        for r in records:
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert (bench.images / r["image"]).is_file()
            if split == "test_shifted" and r["category"] == "ocr":
                assert gpt["value"] in SHIFTED_WORDS
            elif split != "align":
                assert gpt["value"] in ANSWERS[r["category"]]
    assert CHANCE["color"] == pytest.approx(1 / len(COLORS))
    assert CHANCE["spatial"] == pytest.approx(0.25)


def test_splits_are_disjoint_by_image_content_and_question(bench) -> None:
    images_of: dict[str, set[str]] = {s: set() for s in SPLITS}
    pairs_of: dict[str, set[tuple[str, str]]] = {s: set() for s in SPLITS}
    for split in SPLITS:
        for r in _records(bench, split):
            pixels = np.asarray(Image.open(bench.images / r["image"]).convert("RGB")).tobytes()
            digest = hashlib.sha256(pixels).hexdigest()
            images_of[split].add(digest)
            pairs_of[split].add((digest, r["conversations"][0]["value"]))
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not images_of[a] & images_of[b], f"{a} and {b} share images"
            assert not pairs_of[a] & pairs_of[b], f"{a} and {b} share image+question items"
    # No image repeats anywhere, even within a split.
    assert sum(len(v) for v in images_of.values()) == sum(getattr(SIZES, s) for s in SPLITS)


def test_image_sizes(bench) -> None:
    for r in _records(bench, "test")[:12]:
        size = Image.open(bench.images / r["image"]).size
        assert size == ((DETAIL_SIZE,) * 2 if r["category"] == "detail" else (IMAGE_SIZE,) * 2)


def _mask_of(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return (np.abs(img.astype(int) - np.array(rgb)) <= tol).all(-1)


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a bool mask (brute-force BFS)."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return n


def _nearest_colour(pixels: np.ndarray) -> str:
    mean = pixels.reshape(-1, 3).mean(0)
    return min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - mean) ** 2)))


def _foreground(img: np.ndarray) -> np.ndarray:
    background = img[0, 0].astype(int)
    return (np.abs(img.astype(int) - background) > 30).any(-1)


def test_answers_are_true_to_the_images(bench) -> None:
    """Independent reading of the pixels agrees with the stated answer."""
    checked = Counter()
    for split in ("instruct", "test"):
        for r in _records(bench, split):
            img = np.asarray(Image.open(bench.images / r["image"]).convert("RGB"))
            answer = r["conversations"][1]["value"]
            category = r["category"]
            if category == "color":
                assert _nearest_colour(img[_foreground(img)]) == answer, r["id"]
            elif category == "count":
                fg = _foreground(img)
                assert _components(fg) == int(answer), r["id"]
            elif category == "detail":
                saturated = img.max(-1).astype(int) - img.min(-1).astype(int) > 60
                assert _nearest_colour(img[saturated]) == answer, r["id"]
            elif category == "spatial":
                question = r["conversations"][0]["value"]
                words = question.split("the ")
                c1, c2 = words[1].split()[0], words[2].split()[0]
                y1, x1 = np.nonzero(_mask_of(img, COLORS[c1]))
                y2, x2 = np.nonzero(_mask_of(img, COLORS[c2]))
                dx, dy = x1.mean() - x2.mean(), y1.mean() - y2.mean()
                if abs(dx) > abs(dy):
                    expected = "left" if dx < 0 else "right"
                else:
                    expected = "above" if dy < 0 else "below"
                assert expected == answer, r["id"]
            checked[category] += 1
    assert all(checked[c] >= 5 for c in ("color", "count", "detail", "spatial"))


def test_reuses_a_finished_folder_and_refuses_a_different_one(bench) -> None:
    before = bench.manifest.stat().st_mtime_ns
    assert generate_benchmark(bench.root, seed=3, sizes=SIZES).root == bench.root
    assert bench.manifest.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="seed"):
        generate_benchmark(bench.root, seed=5, sizes=SIZES)


def test_overwrite_regenerates(tmp_path: Path) -> None:
    small = BenchmarkSizes(align=6, instruct=6, val=6, test=6)
    paths = generate_benchmark(tmp_path / "b", seed=0, sizes=small)
    generate_benchmark(tmp_path / "b", seed=1, sizes=small, overwrite=True)
    assert json.loads(paths.manifest.read_text())["seed"] == 1
    fresh = generate_benchmark(tmp_path / "fresh", seed=1, sizes=small)
    assert paths.split("val").read_bytes() == fresh.split("val").read_bytes()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="instruct"):
        BenchmarkSizes(instruct=-1)
    with pytest.raises(KeyError, match="valid splits"):
        BenchmarkPaths(Path(".")).split("train")
    with pytest.raises(TypeError, match="BenchmarkSizes"):
        generate_benchmark(Path("unused"), sizes={"align": 1})  # type: ignore[arg-type]


def test_output_of_an_older_generator_is_regenerated(tmp_path: Path) -> None:
    small = BenchmarkSizes(align=6, instruct=6, val=6, test=6)
    paths = generate_benchmark(tmp_path / "b", seed=0, sizes=small)
    expected = paths.split("test").read_bytes()
    manifest = json.loads(paths.manifest.read_text())
    paths.manifest.write_text(json.dumps({**manifest, "version": -1}))
    paths.split("test").write_text("[]")
    generate_benchmark(tmp_path / "b", seed=0, sizes=small)
    assert paths.split("test").read_bytes() == expected
    assert json.loads(paths.manifest.read_text()) == manifest


def test_val_and_test_are_separate_streams(tmp_path: Path) -> None:
    """val is not test under another name: its own generator stream, so growing val leaves the
    test questions as they are, and the default folder holds no shifted split."""
    small = generate_benchmark(tmp_path / "a", seed=3, sizes=BenchmarkSizes(val=6, test=12))
    more = generate_benchmark(tmp_path / "b", seed=3, sizes=BenchmarkSizes(val=30, test=12))
    assert small.split("test").read_bytes() == more.split("test").read_bytes()
    assert _records(small, "val") == _records(more, "val")[:6]
    assert not small.split("test_shifted").exists()
    assert "test_shifted" not in json.loads(small.manifest.read_text())["sizes"]


def test_run_config_selects_the_evaluation_split(tmp_path: Path) -> None:
    from moe_vision.evaluation.evaluate import summarize
    from moe_vision.experiment.run_config import DataConfig

    sizes = {"align": 0, "instruct": 0, "val": 7, "test": 5, "test_shifted": 6}
    cats = [*CATEGORIES, "texture"]
    data = DataConfig(
        benchmark_sizes={**sizes, "categories": cats},
        benchmark_dir=str(tmp_path / "b"),
        eval_split="val",
    )
    splits, images = data.resolve(tmp_path)
    assert set(splits) == set(SPLITS)
    for name, n in sizes.items():
        assert len(json.loads(splits[name].read_text())) == n
    records = json.loads(splits[data.eval_split].read_text())
    assert records[0]["id"].startswith("val-") and (images / records[0]["image"]).is_file()
    # Per-category scores name the new category.
    preds = [{"category": r["category"], "score": 1.0, "correct": True} for r in records]
    metrics = summarize(preds).to_metrics()
    assert "accuracy/texture" in metrics and "accuracy/texture/lo" in metrics
    # Without a shifted split, it is neither written nor offered.
    plain = DataConfig(benchmark_sizes={"val": 3, "test": 3}, benchmark_dir=str(tmp_path / "p"))
    assert "test_shifted" not in plain.resolve(tmp_path)[0]
    with pytest.raises(
        ValueError, match="no 'test_shifted' questions.*benchmark_sizes.test_shifted"
    ):
        DataConfig(eval_split="test_shifted")
    with pytest.raises(ValueError, match="no 'val' questions"):
        DataConfig(benchmark_sizes={"val": 0}, eval_split="val")
    with pytest.raises(ValueError, match="'dev' is not a benchmark split"):
        DataConfig(eval_split="dev")
