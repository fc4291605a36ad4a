"""The built-in benchmark's images: drawing primitives and one scene generator per category.

A scene generator takes the split's random generator and returns the image and its
:data:`Scene` (the fields the question, caption and answer are filled from). Every draw comes
from that generator in a fixed order, so a seed gives byte-identical images. The opt-in
categories (:mod:`moe_vision.data.benchmark_tiling`) and the pretraining data
(:mod:`moe_vision.zoo.data`) draw with the same primitives (``_background``, ``_draw_shape``,
``_jitter``, ``_pick``, ``_place``; the *detail* marker squares: ``marker_side``,
``draw_marker_squares``).
"""

from __future__ import annotations

from collections.abc import Callable
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


MARKER_DECOYS = 3
"""Flat squares drawn next to the *detail* marker: one in each other marker colour."""
CHECKER_CELL = 2
"""Side in pixels of the marker's checker cells on the 192-px canvas."""


def marker_side(u: float) -> int:
    """A marker side of 8 or 12 px from a draw ``u`` in [0, 1): whole checker periods, so the
    checkered marker holds as many coloured cells as background cells."""
    return 4 * CHECKER_CELL * (1 + int(u >= 0.5))


def _draw_checkered(
    draw: ImageDraw.ImageDraw,
    x0: int,
    y0: int,
    side: int,
    fill: tuple[int, ...],
    tone: tuple[int, ...],
) -> None:
    """A ``side``-px square at ``(x0, y0)`` checkered in ``fill`` and ``tone`` (cells of
    :data:`CHECKER_CELL` px, ``fill`` in the top-left cell)."""
    for row in range(0, side, CHECKER_CELL):
        for col in range(0, side, CHECKER_CELL):
            cell = [x0 + col, y0 + row, x0 + col + CHECKER_CELL - 1, y0 + row + CHECKER_CELL - 1]
            on = (row + col) // CHECKER_CELL % 2 == 0
            draw.rectangle(cell, fill=fill if on else tone)


def draw_marker_squares(
    img: Image.Image,
    squares: list[tuple[float, float, tuple[int, ...]]],
    side: int,
    tone: tuple[int, ...],
) -> None:
    """Squares of ``side`` px centred at ``(cx, cy)``; the **first** is checkered in its colour
    and the background ``tone`` (cells of :data:`CHECKER_CELL` px), the others are flat in the
    half-way mix of their colour and ``tone``, i.e. the same mean colour as a checkered one.

    At a low-resolution expert's input the checker cells fall below one pixel and every square
    becomes the same tinted patch; only an expert that resolves the cells can tell which colour
    the checkered marker has.
    """
    draw = ImageDraw.Draw(img)
    for i, (cx, cy, fill) in enumerate(squares):
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        if i == 0:
            _draw_checkered(draw, x0, y0, side, fill, tone)
            continue
        flat = tuple((c + t) // 2 for c, t in zip(fill, tone))
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=flat)


def _scene_detail(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    """Grey clutter, one small checkered marker and :data:`MARKER_DECOYS` flat squares of the
    same size and mean colour in the other marker colours: every image holds all four colours,
    so only the marker's 2-px checker cells (below a pixel at a 64-px expert's input) tell the
    answer.

    The main generator makes the same draws as version 2 of the benchmark (the decoys' colours
    and jitter come from a generator keyed by the marker's position), so the images of every
    other category are unchanged.
    """
    marker = _pick(rng, MARKER_COLORS)
    img = _background(DETAIL_SIZE, rng)
    tone = img.getpixel((0, 0))
    draw = ImageDraw.Draw(img)
    n_clutter = int(rng.integers(6, 11))
    r_clutter = DETAIL_SIZE * 0.06
    centres = _place(rng, n_clutter + 1, r_clutter, DETAIL_SIZE)
    clutter = [(int(rng.integers(90, 170)), _pick(rng, SHAPES)) for _ in centres[:-1]]
    for (cx, cy), (grey, shape) in list(zip(centres, clutter))[:-MARKER_DECOYS]:
        _draw_shape(draw, shape, cx, cy, r_clutter, (grey, grey, grey))
    cx, cy = centres[-1]
    side = marker_side(float(rng.uniform(0, 1)))
    fill = _jitter(COLORS[marker], rng, 10)
    sub = np.random.default_rng([int(cx * 1000), int(cy * 1000), side])
    others = [str(c) for c in sub.permutation([c for c in MARKER_COLORS if c != marker])]
    decoys = [
        (dx, dy, _jitter(COLORS[c], sub, 10))
        for (dx, dy), c in zip(centres[-1 - MARKER_DECOYS : -1], others)
    ]
    draw_marker_squares(img, [(cx, cy, fill), *decoys], side, tone)
    return img, {"marker": marker}


SCENES: dict[str, Callable[[np.random.Generator], tuple[Image.Image, Scene]]] = {
    "color": _scene_single,
    "shape": _scene_single,
    "count": _scene_count,
    "spatial": _scene_spatial,
    "ocr": _scene_ocr,
    "detail": _scene_detail,
}
