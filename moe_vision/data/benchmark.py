"""The built-in benchmark: procedurally generated images with questions and answers.

Six categories, each pulling on a different kind of expert (DESIGN.md section 6):

==========  ======================================================  ==========================
category    image                                                   answer set
==========  ======================================================  ==========================
color       one large shape on a light background                   8 colours
shape       one large shape                                         5 shapes
count       1-5 small identical shapes                              ``"1"`` .. ``"5"``
spatial     two shapes, clearly apart                               left / right / above / below
ocr         1-3 characters or a short word (PIL's default font)     16 strings
detail      a large canvas of grey clutter and one small marker     4 colours
==========  ======================================================  ==========================

Images are small (``IMAGE_SIZE``; ``DETAIL_SIZE`` for *detail*, whose marker is a few pixels
wide so that only high-resolution experts see it well). Questions come from templates and the
answers from a finite set per category, so chance accuracy is defined (:data:`CHANCE`).

:func:`generate_benchmark` writes LLaVA-format JSON files (``align.json``: captions;
``instruct.json``: questions; ``val.json`` and ``test.json``: held-out questions) and an
``images/`` folder. Output is a pure function of ``(seed, sizes)``: the same seed gives
byte-identical JSON and PNG files. Splits are disjoint: no image (by pixel content) appears
twice anywhere. A ``manifest.json`` written last and atomically marks a finished folder;
calling again with the same seed and sizes reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

BENCHMARK_VERSION = 2
"""Bumped whenever the generator's output changes; part of the manifest."""

IMAGE_SIZE = 64
"""Side of the images of every category except *detail*."""
DETAIL_SIZE = 192
"""Side of the *detail* canvas."""

SPLITS: tuple[str, ...] = ("align", "instruct", "val", "test")
CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "spatial", "ocr", "detail")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4", "5")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
WORDS: tuple[str, ...] = (
    "A", "K", "7", "42", "OK", "HI", "GO", "UP",
    "CAT", "DOG", "SUN", "BOX", "MAP", "TOP", "ZIP", "JAM",
)  # fmt: skip
MARKER_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "spatial": RELATIONS,
    "ocr": WORDS,
    "detail": MARKER_COLORS,
}
"""The finite answer set of each category."""

CHANCE: dict[str, float] = {c: 1.0 / len(a) for c, a in ANSWERS.items()}
"""Accuracy of a uniform random guess over each category's answer set."""

QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the shape?",
        "What color is the {shape}?",
        "Which color does the object have?",
    ),
    "shape": (
        "What shape is shown?",
        "What is the shape of the {color} object?",
        "Which shape is in the image?",
    ),
    "count": (
        "How many {shape}s are there?",
        "How many objects are in the image?",
        "Count the {color} shapes.",
    ),
    "spatial": (
        "Where is the {color} {shape} relative to the {color2} {shape2}?",
        "Is the {color} {shape} left of, right of, above or below the {color2} {shape2}?",
    ),
    "ocr": (
        "What does the text say?",
        "What is written in the image?",
        "Read the text in the image.",
    ),
    "detail": (
        "What color is the small marker?",
        "Which color is the tiny square among the gray shapes?",
    ),
}
"""Question templates per category; fields come from the scene."""

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for the image.",
)
CAPTIONS: dict[str, str] = {
    "color": "A {color} {shape}.",
    "shape": "A {color} {shape}.",
    "count": "{count} {color} {shape}s.",
    "spatial": "A {color} {shape} {relation_phrase} a {color2} {shape2}.",
    "ocr": 'The text "{word}".',
    "detail": "Gray shapes and a small {marker} marker.",
}
RELATION_PHRASES: dict[str, str] = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "below": "below",
}
ANSWER_FIELD: dict[str, str] = {
    "color": "color",
    "shape": "shape",
    "count": "count",
    "spatial": "relation",
    "ocr": "word",
    "detail": "marker",
}


@dataclass(frozen=True)
class BenchmarkSizes:
    """Number of records per split (each split cycles through the categories evenly), and the
    categories: the default six, or a list with opt-in ones
    (:data:`moe_vision.data.benchmark_tiling.TILING_CATEGORIES`)."""

    align: int = 600
    instruct: int = 1200
    val: int = 120
    test: int = 2400  # 400 per category: a 10-point gap in one category is resolvable (README)
    categories: tuple[str, ...] = CATEGORIES

    def __post_init__(self) -> None:
        for name in SPLITS:
            n = getattr(self, name)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"BenchmarkSizes.{name} must be a non-negative int, got {n!r}")
        cats = (self.categories,) if isinstance(self.categories, str) else self.categories
        object.__setattr__(self, "categories", tuple(cats))
        known = CATEGORIES + tuple(_extra().SCENES)
        bad = [c for c in self.categories if c not in known]
        if bad or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(
                f"BenchmarkSizes.categories: expected distinct names from {list(known)}, "
                f"got {list(self.categories)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Sizes (and categories when not the default six: default manifests are unchanged)."""
        d = dataclasses.asdict(self)
        if self.categories == CATEGORIES:
            del d["categories"]
        else:
            d["categories"] = list(self.categories)
        return d


def _extra() -> Any:
    """The opt-in categories' module (imported late: it draws with this module's helpers)."""
    from moe_vision.data import benchmark_tiling

    return benchmark_tiling


def _base(category: str) -> str:
    """The category whose questions, captions and answers ``category`` uses."""
    return category if category in CATEGORIES else _extra().EXTRA_CATEGORIES[category]


@dataclass(frozen=True)
class BenchmarkPaths:
    """Where a generated benchmark lives."""

    root: Path

    @property
    def images(self) -> Path:
        """The image root the JSON files' ``image`` fields are relative to."""
        return self.root / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def split(self, name: str) -> Path:
        """The LLaVA JSON file of split ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise KeyError(f"unknown benchmark split {name!r}; valid splits are {list(SPLITS)}")
        return self.root / f"{name}.json"


# ---------------------------------------------------------------------------- drawing
def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    tone = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return Image.new("RGB", (size, size), tone)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius ``r`` centred at ``(cx, cy)``."""
    if shape == "triangle":
        angles, radii = np.deg2rad([-90, 30, 150]), [r, r, r]
    elif shape == "diamond":
        angles, radii = np.deg2rad([-90, 0, 90, 180]), [r, r * 0.75, r, r * 0.75]
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
    else:
        raise ValueError(f"{shape!r} is not a polygonal shape")
    return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]
) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)


def _place(
    rng: np.random.Generator, n: int, radius: float, size: int, gap: float = 2.0
) -> list[tuple[float, float]]:
    """``n`` non-overlapping centres for discs of ``radius`` inside a ``size`` canvas."""
    for _ in range(1000):
        pts: list[tuple[float, float]] = []
        for _ in range(200):
            c = tuple(float(v) for v in rng.uniform(radius + 1, size - radius - 1, size=2))
            if all(np.hypot(c[0] - p[0], c[1] - p[1]) >= 2 * radius + gap for p in pts):
                pts.append(c)  # type: ignore[arg-type]
                if len(pts) == n:
                    return pts
    raise RuntimeError(f"cannot place {n} shapes of radius {radius} in a {size}px canvas")


# ---------------------------------------------------------------------------- scenes
Scene = dict[str, Any]


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _scene_single(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    color, shape = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES)
    img = _background(IMAGE_SIZE, rng)
    r = float(rng.uniform(0.25, 0.4) * IMAGE_SIZE)
    cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, _jitter(COLORS[color], rng, 12))
    return img, {"color": color, "shape": shape}


def _scene_count(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    color, shape, count = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES), _pick(rng, COUNTS)
    img = _background(IMAGE_SIZE, rng)
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(0.07, 0.1) * IMAGE_SIZE)
    fill = _jitter(COLORS[color], rng, 12)
    for cx, cy in _place(rng, int(count), r, IMAGE_SIZE):
        _draw_shape(draw, shape, cx, cy, r, fill)
    return img, {"color": color, "shape": shape, "count": count}


def _scene_spatial(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    s1, s2 = _pick(rng, SHAPES), _pick(rng, SHAPES)
    relation = _pick(rng, RELATIONS)
    img = _background(IMAGE_SIZE, rng)
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(0.1, 0.14) * IMAGE_SIZE)
    lo, hi = r + 1, IMAGE_SIZE - r - 1
    # Main axis: the two centres at least 2r + 4 apart; cross axis: within r of each other.
    a = float(rng.uniform(lo, hi - 2 * r - 4))
    b = float(rng.uniform(a + 2 * r + 4, hi))
    cross = float(rng.uniform(lo + r / 2, hi - r / 2))
    d = rng.uniform(-r / 2, r / 2, size=2)
    first, second = (a, b) if relation in ("left", "above") else (b, a)
    if relation in ("left", "right"):
        p1, p2 = (first, cross + d[0]), (second, cross + d[1])
    else:
        p1, p2 = (cross + d[0], first), (cross + d[1], second)
    _draw_shape(draw, s1, *p1, r, _jitter(COLORS[c1], rng, 12))
    _draw_shape(draw, s2, *p2, r, _jitter(COLORS[c2], rng, 12))
    scene = {"color": c1, "shape": s1, "color2": c2, "shape2": s2, "relation": relation}
    scene["relation_phrase"] = RELATION_PHRASES[relation]
    return img, scene


def _scene_ocr(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    word = _pick(rng, WORDS)
    img = _background(IMAGE_SIZE, rng)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(18, 25)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = float(rng.uniform(2, max(3.0, IMAGE_SIZE - w - 2))) - left
    y = float(rng.uniform(2, max(3.0, IMAGE_SIZE - h - 2))) - top
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    draw.text((x, y), word, fill=ink, font=font)
    return img, {"word": word}


def _scene_detail(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    marker = _pick(rng, MARKER_COLORS)
    img = _background(DETAIL_SIZE, rng)
    draw = ImageDraw.Draw(img)
    n_clutter = int(rng.integers(6, 11))
    r_clutter = DETAIL_SIZE * 0.06
    centres = _place(rng, n_clutter + 1, r_clutter, DETAIL_SIZE)
    for cx, cy in centres[:-1]:
        grey = int(rng.integers(90, 170))
        _draw_shape(draw, _pick(rng, SHAPES), cx, cy, r_clutter, (grey, grey, grey))
    cx, cy = centres[-1]
    s = DETAIL_SIZE * float(rng.uniform(0.02, 0.03))
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=_jitter(COLORS[marker], rng, 10))
    return img, {"marker": marker}


SCENES: dict[str, Callable[[np.random.Generator], tuple[Image.Image, Scene]]] = {
    "color": _scene_single,
    "shape": _scene_single,
    "count": _scene_count,
    "spatial": _scene_spatial,
    "ocr": _scene_ocr,
    "detail": _scene_detail,
}


# ---------------------------------------------------------------------------- records
def _question(category: str, scene: Scene, rng: np.random.Generator) -> str:
    return _pick(rng, QUESTIONS[_base(category)]).format(**scene)


def _caption(category: str, scene: Scene) -> str:
    return CAPTIONS[_base(category)].format(**scene)


def _record(
    split: str, index: int, category: str, scene: Scene, rng: np.random.Generator, image: str
) -> dict[str, Any]:
    if split == "align":
        prompt, answer = _pick(rng, CAPTION_PROMPTS), _caption(category, scene)
    else:
        prompt = _question(category, scene, rng)
        answer = str(scene[ANSWER_FIELD[_base(category)]])
    return {
        "id": f"{split}-{index:05d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
        "category": category,
    }


def _split_records(
    split: str,
    n: int,
    seed: int,
    images_dir: Path,
    seen: set[str],
    categories: tuple[str, ...] = CATEGORIES,
) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for i in range(n):
        category = categories[i % len(categories)]
        draw = SCENES[category] if category in SCENES else _extra().SCENES[category]
        for _ in range(100):
            img, scene = draw(rng)
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            if digest not in seen:
                break
        else:
            raise RuntimeError(f"benchmark: could not draw a new {category!r} image for {split}")
        seen.add(digest)
        name = f"{split}_{i:05d}.png"
        img.save(images_dir / name, format="PNG", optimize=False)
        yield _record(split, i, category, scene, rng, name)


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _manifest(seed: int, sizes: BenchmarkSizes) -> dict[str, Any]:
    return {"version": BENCHMARK_VERSION, "seed": seed, "sizes": sizes.to_dict()}


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _same(found: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    return found is not None and all(found.get(k) == v for k, v in wanted.items())


def _write_all(root: Path, seed: int, sizes: BenchmarkSizes) -> None:
    paths = BenchmarkPaths(root)
    paths.images.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split in SPLITS:
        records = list(
            _split_records(split, getattr(sizes, split), seed, paths.images, seen, sizes.categories)
        )
        _write_json_atomic(paths.split(split), records)
    _write_json_atomic(paths.manifest, _manifest(seed, sizes))


def generate_benchmark(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    sizes: BenchmarkSizes | None = None,
    overwrite: bool = False,
) -> BenchmarkPaths:
    """Write the benchmark to ``out_dir`` (or reuse it when it is already there).

    Args:
        out_dir: target folder. A folder holding a finished benchmark with the same seed,
            sizes and generator version is reused as is.
        seed: the only source of randomness.
        sizes: records per split (default :class:`BenchmarkSizes`).
        overwrite: replace a finished benchmark with different seed/sizes instead of raising.
            A benchmark written by another generator version is always regenerated.

    Returns:
        :class:`BenchmarkPaths` of the folder.

    Raises:
        FileExistsError: ``out_dir`` holds a benchmark of another seed/sizes/version and
            ``overwrite`` is False.
    """
    sizes = sizes if sizes is not None else BenchmarkSizes()
    if not isinstance(sizes, BenchmarkSizes):
        raise TypeError(f"sizes must be a BenchmarkSizes, got {type(sizes).__name__}")
    root = Path(out_dir)
    paths = BenchmarkPaths(root)
    wanted = _manifest(int(seed), sizes)
    found = _read_manifest(paths.manifest)
    if _same(found, wanted):
        logger.info("benchmark in %s is up to date (seed %d); reusing it", root, seed)
        return paths
    stale = found is not None and found.get("version") != BENCHMARK_VERSION
    if found is not None and not overwrite and not stale:
        raise FileExistsError(
            f"{root} holds a benchmark with {found}, not the requested {wanted}; "
            "pass overwrite=True or pick another folder"
        )
    logger.info("generating the benchmark (seed %d, sizes %s) in %s", seed, sizes, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists() and any(root.iterdir()):
        # Existing folder (an old benchmark or a user-made folder): rewrite in place;
        # the manifest, written last, is removed first so a crash leaves no stale marker.
        paths.manifest.unlink(missing_ok=True)
        if paths.images.exists():
            shutil.rmtree(paths.images)
        _write_all(root, int(seed), sizes)
        return paths
    # Fresh folder: build next to it and rename, so concurrent callers never see half a
    # benchmark; the loser of a race keeps the winner's (identical) folder.
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        _write_all(tmp, int(seed), sizes)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _same(_read_manifest(paths.manifest), wanted):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def corpus() -> list[str]:
    """Every string the benchmark can produce (templates filled with every value).

    Used to train the offline tokenizer of the tiny LLMs (:mod:`moe_vision.model.llm`).
    """
    fields = {
        "color": list(COLORS),
        "color2": list(COLORS),
        "shape": list(SHAPES),
        "shape2": list(SHAPES),
        "count": list(COUNTS),
        "relation_phrase": list(RELATION_PHRASES.values()),
        "word": list(WORDS),
        "marker": list(MARKER_COLORS),
    }
    texts: list[str] = list(CAPTION_PROMPTS)
    for answers in ANSWERS.values():
        texts.extend(answers)
    for template in [t for ts in QUESTIONS.values() for t in ts] + list(CAPTIONS.values()):
        # Two passes over the values give every word in every slot without a full product.
        for i in range(max(len(v) for v in fields.values())):
            values = {k: v[i % len(v)] for k, v in fields.items()}
            values2 = {k: v[(i + 1) % len(v)] for k, v in fields.items()}
            texts.append(template.format(**values))
            texts.append(template.format(**values2))
    return texts
