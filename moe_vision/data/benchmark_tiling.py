"""Opt-in benchmark categories where tiling should matter: wide text strips, small details in
large non-square images.

Every expert squashes an image to its native square input; these images lose what the question
asks about when squashed, and keep it when cut into tiles of the image's aspect ratio
(:mod:`experts.tiling`):

=============  =============================================================  ================
category       image                                                          shares with
=============  =============================================================  ================
ocr_strip      a wide strip (``STRIP_SIZE``, 8:1 to 11:1) of small text among  ``ocr``
               grey rules, like a receipt line
detail_wide    a large wide canvas (``WIDE_SIZE``, 3:1) of grey clutter with   ``detail``
               one small coloured marker
=============  =============================================================  ================

A category shares its questions, captions and answer set with the base category it names
(:data:`EXTRA_CATEGORIES`), so the offline tokenizer's corpus and every default split stay
byte-identical: these categories are drawn only when listed in
``BenchmarkSizes(categories=...)`` (e.g. ``categories=CATEGORIES + TILING_CATEGORIES``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moe_vision.data.benchmark_scenes import Scene, draw_shape, jitter, pick
from moe_vision.data.benchmark_tasks import CHANCE as BASE_CHANCE
from moe_vision.data.benchmark_tasks import COLORS, MARKER_COLORS, SHAPES, WORDS

STRIP_SIZE = (24, 256)
"""``(height, longest width)`` of an *ocr_strip* image; the width is drawn in 192..256."""
WIDE_SIZE = (128, 384)
"""``(short, long)`` side of a *detail_wide* canvas."""

EXTRA_CATEGORIES: dict[str, str] = {"ocr_strip": "ocr", "detail_wide": "detail"}
"""Opt-in category -> the base category whose questions, captions and answers it uses."""
TILING_CATEGORIES: tuple[str, ...] = tuple(EXTRA_CATEGORIES)
CHANCE: dict[str, float] = {c: BASE_CHANCE[base] for c, base in EXTRA_CATEGORIES.items()}
"""Accuracy of a uniform guess in each opt-in category."""


def _scene_ocr_strip(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    """A receipt-like strip: one word in small type at a random place, grey rules elsewhere."""
    word = pick(rng, WORDS)
    height, width = STRIP_SIZE[0], int(rng.integers(192, STRIP_SIZE[1] + 1))
    tone = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (width, height), tone)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(13, 17)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = float(rng.uniform(2, width - w - 2))
    for _ in range(int(rng.integers(2, 5))):  # rules that avoid the word
        a = float(rng.uniform(2, width - 20))
        b = a + float(rng.uniform(10, 40))
        if b < x - 4 or a > x + w + 4:
            y = float(rng.uniform(6, height - 6))
            grey = int(rng.integers(120, 190))
            draw.line([(a, y), (min(b, width - 2), y)], fill=(grey, grey, grey), width=2)
    y = float(rng.uniform(1, max(2.0, height - h - 1))) - top
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    draw.text((x - left, y), word, fill=ink, font=font)
    return img, {"word": word}


def _scene_detail_wide(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    """Grey clutter on a wide 3:1 canvas and one small marker of a colour."""
    marker = pick(rng, MARKER_COLORS)
    short, long = WIDE_SIZE
    tone = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (long, short), tone)
    draw = ImageDraw.Draw(img)
    r = short * 0.08
    n = int(rng.integers(8, 14))
    centres = [
        (float(rng.uniform(r + 1, long - r - 1)), float(rng.uniform(r + 1, short - r - 1)))
        for _ in range(n)
    ]
    for cx, cy in centres:
        grey = int(rng.integers(90, 170))
        draw_shape(draw, pick(rng, SHAPES), cx, cy, r, (grey, grey, grey))
    s = short * float(rng.uniform(0.025, 0.035))
    cx, cy = float(rng.uniform(s + 2, long - s - 2)), float(rng.uniform(s + 2, short - s - 2))
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=jitter(COLORS[marker], rng, 10))
    return img, {"marker": marker}


SCENES: dict[str, Callable[[np.random.Generator], tuple[Image.Image, Scene]]] = {
    "ocr_strip": _scene_ocr_strip,
    "detail_wide": _scene_detail_wide,
}
