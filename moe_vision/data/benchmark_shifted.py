"""The shifted test split (``test_shifted``): the six default categories' questions and answer
sets, drawn in a style the benchmark's other splits and the mini zoo's pretraining never use.

=============  =================================================================================
what           shifted to
=============  =================================================================================
font           Pillow's built-in bitmap font (``ImageFont.load_default_imagefont()``), drawn at
               1x and scaled up 1.8-2.4x (the other splits and pretraining: Pillow's default
               FreeType font, Aileron); shipped with Pillow, so the same on every machine
words          :data:`SHIFTED_WORDS`, 16 four-letter words, none of them a benchmark word
               (:data:`~moe_vision.data.benchmark_tasks.WORDS`, 1-3 characters) nor a word of
               the zoo's captions; pretraining renders random 1-5 character strings, so a given
               four-letter word comes up there about once in a million text images
palette        :data:`SHIFTED_COLORS`: other RGB values under the same eight names (each still
               nearest its own name among the default colours)
background     a linear gradient between two darker, pale tints with pixel noise (the others: one
               flat light tone)
=============  =================================================================================

The OCR answers are :data:`SHIFTED_WORDS`, so that category's answer set differs from the
in-distribution one; every other answer set is the same. The split draws from its own random
stream (``[seed, SPLITS.index("test_shifted")]``) and its images are de-duplicated against the
other splits like any split's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moe_vision.data.benchmark_scenes import Style

SHIFTED_WORDS: tuple[str, ...] = (
    "TREE", "LAMP", "FISH", "BIRD", "MOON", "SHIP", "KITE", "RING",
    "DOOR", "BELL", "FROG", "NEST", "ROSE", "WOLF", "CORN", "LEAF",
)  # fmt: skip
"""The words of the shifted split's OCR questions."""

SHIFTED_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (190, 20, 60),
    "green": (70, 175, 35),
    "blue": (30, 115, 200),
    "yellow": (215, 220, 70),
    "purple": (105, 35, 155),
    "orange": (225, 105, 15),
    "pink": (225, 145, 205),
    "brown": (100, 60, 20),
}
"""The shifted palette: the default colour names at other RGB values."""


def _shifted_background(size: int, rng: np.random.Generator) -> Image.Image:
    """``size`` x ``size`` RGB: a gradient between two pale tints (grey 185-230, each channel
    +-12) along a random direction, plus Gaussian pixel noise (sd 3)."""
    a, b = (
        (rng.integers(185, 231) + rng.integers(-12, 13, size=3)).astype(np.float32)
        for _ in range(2)
    )
    angle = float(rng.uniform(0, 2 * np.pi))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(0.5) + 0.5
    pixels = a + np.clip(t, 0, 1)[..., None] * (b - a)
    pixels += rng.normal(0, 3, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _bitmap_text(img: Image.Image, word: str, rng: np.random.Generator) -> None:
    """``word`` in Pillow's bitmap font, scaled 1.8-2.4x, dark ink, anywhere it fits."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = ImageDraw.Draw(img).textbbox((0, 0), word, font=font)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, fill=255, font=font)
    scale = float(rng.uniform(1.8, 2.4))
    w = min(round(mask.width * scale), img.width - 4)
    h = min(round(mask.height * scale), img.height - 4)
    mask = mask.resize((w, h), Image.Resampling.BICUBIC)
    x = int(rng.integers(2, img.width - w - 1))
    y = int(rng.integers(2, img.height - h - 1))
    ink = tuple(int(v) for v in rng.integers(0, 60, size=3))
    img.paste(Image.new("RGB", (w, h), ink), (x, y), mask)


SHIFTED_STYLE = Style(SHIFTED_COLORS, SHIFTED_WORDS, _shifted_background, _bitmap_text)
"""The shifted split's style (:class:`~moe_vision.data.benchmark_scenes.Style`)."""
