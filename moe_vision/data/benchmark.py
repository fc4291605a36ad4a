"""The built-in benchmark: procedurally generated images with questions and answers.

Six categories, each pulling on a different kind of expert (DESIGN.md section 6), and opt-in
ones (``BenchmarkSizes(categories=...)``): wide images for tiling
(:mod:`moe_vision.data.benchmark_tiling`) and *texture*, whose answer is absent at 64 px
(:mod:`moe_vision.data.benchmark_resolution`):

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
``instruct.json``: questions; ``val.json`` and ``test.json``: held-out questions; with
``BenchmarkSizes.test_shifted > 0``, ``test_shifted.json``: held-out questions in another font,
palette, word list and background, :mod:`moe_vision.data.benchmark_shifted`) and an
``images/`` folder. Output is a pure function of ``(seed, sizes)``: the same seed gives
byte-identical JSON and PNG files. Each split draws from its own random stream
(``[seed, index in SPLITS]``), and splits are disjoint: no image (by pixel content) appears
twice anywhere. Choose recipes, budgets and hyper-parameters on ``val``; read ``test`` and
``test_shifted`` only for the report. A ``manifest.json`` written last and atomically marks a
finished folder; calling again with the same seed and sizes reuses it.

The benchmark lives in three modules: the tasks as words (categories, answer sets, question and
caption templates: :mod:`moe_vision.data.benchmark_tasks`), the images (drawing primitives and
scene generators: :mod:`moe_vision.data.benchmark_scenes`), and, here, the splits, their records
and the manifest. Every name of the other two is importable from here as well.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_vision.data.benchmark_resolution import SCENES as RESOLUTION_SCENES
from moe_vision.data.benchmark_resolution import TEXTURE_STREAM
from moe_vision.data.benchmark_scenes import (
    DEFAULT_STYLE,
    SCENES,
    Scene,
    pick,
)
from moe_vision.data.benchmark_shifted import SHIFTED_STYLE
from moe_vision.data.benchmark_tasks import (
    ANSWER_FIELD,
    CAPTION_PROMPTS,
    CAPTIONS,
    CATEGORIES,
    QUESTIONS,
    RESOLUTION_CATEGORIES,
)

logger = logging.getLogger(__name__)

BENCHMARK_VERSION = 2
"""Bumped whenever the generator's output changes; part of the manifest."""

SPLITS: tuple[str, ...] = ("align", "instruct", "val", "test", "test_shifted")
"""Every split; ``test_shifted`` (:mod:`moe_vision.data.benchmark_shifted`) is written only when
asked for (``BenchmarkSizes.test_shifted > 0``)."""


@dataclass(frozen=True)
class BenchmarkSizes:
    """Number of records per split (each split cycles through the categories evenly), and the
    categories: the default six, or a list with opt-in ones
    (:data:`moe_vision.data.benchmark_tiling.TILING_CATEGORIES`, ``"texture"``).
    ``test_shifted`` draws only the default six of them, in the shifted style."""

    align: int = 600
    instruct: int = 1200
    val: int = 120
    test: int = 2400  # 400 per category: a 10-point gap in one category is resolvable (README)
    test_shifted: int = 0
    categories: tuple[str, ...] = CATEGORIES

    def __post_init__(self) -> None:
        for name in SPLITS:
            n = getattr(self, name)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"BenchmarkSizes.{name} must be a non-negative int, got {n!r}")
        cats = (self.categories,) if isinstance(self.categories, str) else self.categories
        object.__setattr__(self, "categories", tuple(cats))
        known = CATEGORIES + tuple(_extra().SCENES) + RESOLUTION_CATEGORIES
        bad = [c for c in self.categories if c not in known]
        if bad or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(
                f"BenchmarkSizes.categories: expected distinct names from {list(known)}, "
                f"got {list(self.categories)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Sizes (``test_shifted`` when not 0, categories when not the default six: default
        manifests are unchanged)."""
        d = dataclasses.asdict(self)
        if not self.test_shifted:
            del d["test_shifted"]
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
    return category if category in QUESTIONS else _extra().EXTRA_CATEGORIES[category]


def _own_stream(category: str) -> bool:
    """Whether ``category`` draws from a random stream of its own (the resolution categories),
    not from the split's shared one."""
    return category in RESOLUTION_SCENES


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


# ---------------------------------------------------------------------------- records
def _question(category: str, scene: Scene, rng: np.random.Generator) -> str:
    return pick(rng, QUESTIONS[_base(category)]).format(**scene)


def _caption(category: str, scene: Scene) -> str:
    return CAPTIONS[_base(category)].format(**scene)


def _record(
    split: str, index: int, category: str, scene: Scene, rng: np.random.Generator, image: str
) -> dict[str, Any]:
    if split == "align":
        prompt, answer = pick(rng, CAPTION_PROMPTS), _caption(category, scene)
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
    style = SHIFTED_STYLE if split == "test_shifted" else DEFAULT_STYLE
    if split == "test_shifted":
        categories = tuple(c for c in categories if c in CATEGORIES) or CATEGORIES
    shared = np.random.default_rng([seed, SPLITS.index(split)])
    own = {  # categories with a stream of their own leave the shared one as it was
        c: np.random.default_rng([seed, SPLITS.index(split), TEXTURE_STREAM])
        for c in categories
        if _own_stream(c)
    }
    for i in range(n):
        category = categories[i % len(categories)]
        rng = own.get(category, shared)
        if category in SCENES:
            draw = functools.partial(SCENES[category], style=style)
        elif _own_stream(category):
            draw = RESOLUTION_SCENES[category]
        else:
            draw = _extra().SCENES[category]
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
        if split == "test_shifted" and not sizes.test_shifted:
            continue  # written only when asked for: default folders are unchanged
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
