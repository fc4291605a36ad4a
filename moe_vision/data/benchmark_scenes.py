"""The built-in benchmark's images: drawing primitives and one scene generator per category.

A scene generator takes the split's random generator and returns the image and its
:data:`Scene` (the fields the question, caption and answer are filled from). Every draw comes
from that generator in a fixed order, so a seed gives byte-identical images. The opt-in
categories (:mod:`moe_vision.data.benchmark_tiling`) and the pretraining data
(:mod:`moe_vision.zoo.data`) draw with the same primitives (``background``, ``draw_shape``,
``jitter``, ``pick``, ``place``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moe_vision.data.benchmark_tasks import (
    COLORS,
    COUNTS,
    MARKER_COLORS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    WORDS,
)

IMAGE_SIZE = 64
"""Side of the images of every category except *detail*."""
DETAIL_SIZE = 192
"""Side of the *detail* canvas."""


# ---------------------------------------------------------------------------- drawing
def jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def background(size: int, rng: np.random.Generator) -> Image.Image:
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


def draw_shape(
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


def place(
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


def _draw_text(img: Image.Image, word: str, rng: np.random.Generator) -> None:
    """``word`` in PIL's default font (18-24 px), dark ink, anywhere it fits."""
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(18, 25)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = float(rng.uniform(2, max(3.0, img.width - w - 2))) - left
    y = float(rng.uniform(2, max(3.0, img.height - h - 2))) - top
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    draw.text((x, y), word, fill=ink, font=font)


@dataclass(frozen=True)
class Style:
    """How a split looks: the colour of each colour name, the words to read, the background
    and the text renderer. The default (:data:`DEFAULT_STYLE`) draws every split of the
    benchmark; :mod:`moe_vision.data.benchmark_shifted` draws the shifted test split."""

    colors: dict[str, tuple[int, int, int]]
    words: tuple[str, ...]
    background: Callable[[int, np.random.Generator], Image.Image]
    text: Callable[[Image.Image, str, np.random.Generator], None]


DEFAULT_STYLE = Style(COLORS, WORDS, background, _draw_text)


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _scene_single(
    rng: np.random.Generator, style: Style = DEFAULT_STYLE
) -> tuple[Image.Image, Scene]:
    color, shape = pick(rng, tuple(style.colors)), pick(rng, SHAPES)
    img = style.background(IMAGE_SIZE, rng)
    r = float(rng.uniform(0.25, 0.4) * IMAGE_SIZE)
    cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, jitter(style.colors[color], rng, 12))
    return img, {"color": color, "shape": shape}


def _scene_count(
    rng: np.random.Generator, style: Style = DEFAULT_STYLE
) -> tuple[Image.Image, Scene]:
    color, shape, count = pick(rng, tuple(style.colors)), pick(rng, SHAPES), pick(rng, COUNTS)
    img = style.background(IMAGE_SIZE, rng)
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(0.07, 0.1) * IMAGE_SIZE)
    fill = jitter(style.colors[color], rng, 12)
    for cx, cy in place(rng, int(count), r, IMAGE_SIZE):
        draw_shape(draw, shape, cx, cy, r, fill)
    return img, {"color": color, "shape": shape, "count": count}


def _scene_spatial(
    rng: np.random.Generator, style: Style = DEFAULT_STYLE
) -> tuple[Image.Image, Scene]:
    c1, c2 = (str(c) for c in rng.choice(list(style.colors), size=2, replace=False))
    s1, s2 = pick(rng, SHAPES), pick(rng, SHAPES)
    relation = pick(rng, RELATIONS)
    img = style.background(IMAGE_SIZE, rng)
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
    draw_shape(draw, s1, *p1, r, jitter(style.colors[c1], rng, 12))
    draw_shape(draw, s2, *p2, r, jitter(style.colors[c2], rng, 12))
    scene = {"color": c1, "shape": s1, "color2": c2, "shape2": s2, "relation": relation}
    scene["relation_phrase"] = RELATION_PHRASES[relation]
    return img, scene


def _scene_ocr(rng: np.random.Generator, style: Style = DEFAULT_STYLE) -> tuple[Image.Image, Scene]:
    word = pick(rng, style.words)
    img = style.background(IMAGE_SIZE, rng)
    style.text(img, word, rng)
    return img, {"word": word}


def _scene_detail(
    rng: np.random.Generator, style: Style = DEFAULT_STYLE
) -> tuple[Image.Image, Scene]:
    marker = pick(rng, MARKER_COLORS)
    img = style.background(DETAIL_SIZE, rng)
    draw = ImageDraw.Draw(img)
    n_clutter = int(rng.integers(6, 11))
    r_clutter = DETAIL_SIZE * 0.06
    centres = place(rng, n_clutter + 1, r_clutter, DETAIL_SIZE)
    for cx, cy in centres[:-1]:
        grey = int(rng.integers(90, 170))
        draw_shape(draw, pick(rng, SHAPES), cx, cy, r_clutter, (grey, grey, grey))
    cx, cy = centres[-1]
    s = DETAIL_SIZE * float(rng.uniform(0.02, 0.03))
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=jitter(style.colors[marker], rng, 10))
    return img, {"marker": marker}


SCENES: dict[str, Callable[..., tuple[Image.Image, Scene]]] = {
    "color": _scene_single,
    "shape": _scene_single,
    "count": _scene_count,
    "spatial": _scene_spatial,
    "ocr": _scene_ocr,
    "detail": _scene_detail,
}
"""Scene generator of each default category: ``(rng, style=DEFAULT_STYLE) -> (image, scene)``."""
