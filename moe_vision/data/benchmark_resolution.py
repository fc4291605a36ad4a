"""An opt-in benchmark category whose answer is absent at the base expert's input resolution.

*texture*: a ``TEXTURE_SIZE`` (256 px) canvas of grey clutter and one small coloured square
whose pattern is the answer (:data:`~moe_vision.data.benchmark_tasks.TEXTURES`, chance 1/4):

=============  =========================================================================
``plain``      the square's colour, flat
``horizontal`` rows alternating ``colour + a`` / ``colour - a`` (1-px stripes)
``vertical``   columns alternating the same way
``checkered``  a 1-px checkerboard of the two
=============  =========================================================================

All four have the same mean colour, and the patterns sit at the Nyquist frequency of the
256-px image. A 4x downscale with a symmetric filter (PIL's bicubic resize to 64 px, what
CLIP-mini's preprocessing does: ``experts.images.resize_normalise``) weighs the pixels of each
alternating pair equally and so cancels them; the pattern's amplitude ramps up over
``TAPER`` px from the square's edges (a raised cosine), so that the truncated pattern at the
edges leaks (almost) nothing either. Measured: the 64-px resizes of one scene drawn with the
four patterns differ by at most one intensity level (of 255). At 256 px (ConvNeXt-mini's input)
the pattern is plain to see. ``tests/test_benchmark.py`` checks both on raw pixels.

The category draws from a random stream of its own (``[seed, split index, TEXTURE_STREAM]``),
so listing it in ``BenchmarkSizes(categories=...)`` leaves the other categories' images and
questions as they were (in the same order; only the record numbering interleaves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from moe_vision.data.benchmark_scenes import (
    Scene,
    background,
    draw_shape,
    jitter,
    pick,
    place,
)
from moe_vision.data.benchmark_tasks import COLORS, MARKER_COLORS, SHAPES, TEXTURES

TEXTURE_SIZE = 256
"""Side of a *texture* canvas (ConvNeXt-mini's input size; CLIP-mini's is 64)."""
TEXTURE_STREAM = 0x7E47_0001
"""Third entropy word of the *texture* category's generator (its own stream)."""
AMPLITUDE = 48
"""Intensity the pattern adds to and takes from the square's colour (every channel)."""
TAPER = 6.0
"""Width (px) of the raised-cosine ramp of the pattern's amplitude inside the square's edges."""
HALF_SIDE = (9.0, 13.0)
"""Range of the square's half side in px (18-26 px wide at 256 px, 4.5-6.5 px at 64 px)."""


@dataclass(frozen=True)
class TextureLayout:
    """Everything of a *texture* scene but its pattern (so a test can draw all four)."""

    background: Image.Image
    clutter: tuple[tuple[str, float, float, float, int], ...]  # (shape, cx, cy, r, grey)
    box: tuple[int, int, int, int]  # the square's x0, y0, x1, y1 (exclusive)
    color: tuple[int, int, int]  # the square's mean colour
    marker: str  # the colour's name (not asked: a distractor)


def texture_layout(rng: np.random.Generator) -> TextureLayout:
    """Draw a scene's layout: background, clutter, the square's place, size and colour."""
    marker = pick(rng, MARKER_COLORS)
    canvas = background(TEXTURE_SIZE, rng)
    n_clutter = int(rng.integers(6, 11))
    r_clutter = TEXTURE_SIZE * 0.06
    # Centres at least 25 px from the border: the square's pattern stays clear of the resize
    # filter's border handling, and of the clutter.
    centres = place(rng, n_clutter + 1, 24.0, TEXTURE_SIZE)
    clutter = tuple(
        (pick(rng, SHAPES), cx, cy, r_clutter, int(rng.integers(90, 170)))
        for cx, cy in centres[:-1]
    )
    cx, cy = centres[-1]
    half = float(rng.uniform(*HALF_SIDE))
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    mid = tuple((v + 128) // 2 for v in COLORS[marker])  # leaves room for +-AMPLITUDE
    color = jitter(mid, rng, 10)
    return TextureLayout(canvas, clutter, box, color, marker)  # type: ignore[arg-type]


def _ramp(lo: int, hi: int) -> np.ndarray:
    """``(hi - lo,)`` amplitude profile across the square: a raised cosine over ``TAPER`` px
    inside each edge, 1 in between (0 outside)."""
    x = np.arange(lo, hi) + 0.5
    d = np.minimum(x - lo, hi - x)
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(d, 0.0, TAPER) / TAPER)


def render_texture(layout: TextureLayout, texture: str) -> Image.Image:
    """The ``TEXTURE_SIZE`` RGB image of ``layout`` with the square's pattern ``texture``."""
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; expected one of {list(TEXTURES)}")
    img = layout.background.copy()
    draw = ImageDraw.Draw(img)
    for shape, cx, cy, r, grey in layout.clutter:
        draw_shape(draw, shape, cx, cy, r, (grey, grey, grey))
    x0, y0, x1, y1 = layout.box
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=layout.color)
    if texture == "plain":
        return img
    amp = np.rint(AMPLITUDE * np.outer(_ramp(y0, y1), _ramp(x0, x1))).astype(np.int32)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    phase = {"horizontal": yy, "vertical": xx, "checkered": xx + yy}[texture]
    pixels = np.array(img, dtype=np.int32)
    pixels[y0:y1, x0:x1] += (amp * (1 - 2 * (phase % 2)))[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _scene_texture(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    texture = pick(rng, TEXTURES)
    layout = texture_layout(rng)  # draws the same numbers whatever the texture
    return render_texture(layout, texture), {"texture": texture, "marker": layout.marker}


SCENES = {"texture": _scene_texture}
"""Scene generator of each category here (each drawn from its own stream)."""
