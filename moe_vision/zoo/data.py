"""Procedurally generated pretraining data of the mini zoo.

Scenes carry the signals the built-in benchmark asks about (colours, shapes, counts, positions,
rendered text, small markers in clutter), drawn with the benchmark's own primitives
(:mod:`moe_vision.data.benchmark`: backgrounds, shapes, placement, colours, PIL's default font),
but from a **separate seed stream** (``np.random.default_rng([seed, PRETRAIN_STREAM, step])``;
the benchmark uses ``[seed, split]``) and with wider value ranges than the benchmark's answer
sets (6 objects instead of 5, random 1-5 character strings instead of 16 words, markers in 8
colours instead of 4). A test checks that no pretraining image equals, pixel for pixel, an image
of the default benchmark.

A :class:`Scene` keeps its objects (shape, colour, centre, radius), so every objective builds
its own kind of target from the same scene: a caption (CLIP, SigLIP, ConvNeXt-CLIP), the text to
read (Pix2Struct), an instance mask under a prompt point (SAM), or nothing (DINOv2, EVA-02).

=========  ==========================================================  =========
kind       image                                                       size
=========  ==========================================================  =========
object     one large shape                                             64 px
objects    1-6 small identical shapes                                  64 px
pair       two shapes, one left of / right of / above / below the other 64 px
text       1-5 characters (A-Z, 0-9), sometimes next to a shape        64 px
marker     grey clutter and one small coloured marker                  192 px
=========  ==========================================================  =========
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moe_vision.data.benchmark_scenes import (
    DETAIL_SIZE,
    IMAGE_SIZE,
    background,
    draw_shape,
    jitter,
    pick,
    place,
)
from moe_vision.data.benchmark_tasks import COLORS, RELATION_PHRASES, RELATIONS, SHAPES

PRETRAIN_STREAM = 0x5EED_2001
"""Second entropy word of every pretraining generator (the benchmark's is its split index)."""

KINDS: tuple[str, ...] = ("object", "objects", "pair", "text", "marker")
CHARSET: str = string.ascii_uppercase + string.digits
"""Characters of the rendered strings (the benchmark's 16 words use a subset)."""
MAX_TEXT = 5
MAX_OBJECTS = 6
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
GREY = "gray"


@dataclass(frozen=True)
class Obj:
    """One drawn object: shape, colour name and disc ``(cx, cy, r)`` in image pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Glyph:
    """One rendered character and its ink box ``(x0, y0, x1, y1)`` in image pixels."""

    char: str
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass
class Scene:
    """One generated image with what is in it.

    Attributes:
        kind: one of :data:`KINDS`.
        image: the RGB image.
        objects: the drawn objects (clutter included, colour ``"gray"``).
        text: the rendered string (``""`` when none).
        glyphs: the box of each character of ``text`` (spaces have none).
        relation: for ``pair``, where ``objects[0]`` is relative to ``objects[1]``.
    """

    kind: str
    image: Image.Image
    objects: list[Obj] = field(default_factory=list)
    text: str = ""
    relation: str = ""
    glyphs: list[Glyph] = field(default_factory=list)

    def caption(self) -> str:
        """A one-sentence caption naming colours, shapes, counts, positions, text, markers."""
        if self.kind == "object":
            o = self.objects[0]
            return f"a {o.color} {o.shape} at the {position(o, self.image.width)}"
        if self.kind == "objects":
            o, n = self.objects[0], len(self.objects)
            plural = "s" if n > 1 else ""
            return f"{NUMBER_WORDS[n - 1]} {o.color} {o.shape}{plural}"
        if self.kind == "pair":
            a, b = self.objects
            return f"a {a.color} {a.shape} {RELATION_PHRASES[self.relation]} a {b.color} {b.shape}"
        if self.kind == "text":
            return f"the text {' '.join(self.text)}"
        m = self.objects[-1]
        return f"gray shapes and a small {m.color} marker at the {position(m, self.image.width)}"

    def mask(self, index: int, size: int) -> np.ndarray:
        """Binary mask ``(size, size)`` of ``objects[index]`` drawn alone at ``size`` px."""
        o = self.objects[index]
        scale = size / self.image.width
        canvas = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(canvas), o.shape, o.cx * scale, o.cy * scale, o.r * scale, 255)
        return np.asarray(canvas) > 127


def position(o: Obj, size: int) -> str:
    """Coarse position of ``o`` in a ``size`` canvas: ``"top left"`` .. ``"bottom right"``."""
    row = ("top", "middle", "bottom")[min(2, int(3 * o.cy / size))]
    col = ("left", "center", "right")[min(2, int(3 * o.cx / size))]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def vocabulary() -> list[str]:
    """Every word a caption can contain (the text towers' vocabulary)."""
    words = {"a", "at", "the", "text", "gray", "shapes", "and", "small", "marker", "center"}
    words |= set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBER_WORDS)
    words |= {"top", "middle", "bottom", "left", "right", "of", "above", "below"}
    words |= set(CHARSET)
    return sorted(words)


# ---------------------------------------------------------------------------- scenes
def _object(rng: np.random.Generator) -> Scene:
    color, shape = pick(rng, tuple(COLORS)), pick(rng, SHAPES)
    img = background(IMAGE_SIZE, rng)
    r = float(rng.uniform(0.18, 0.42) * IMAGE_SIZE)
    cx, cy = (float(v) for v in rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2))
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, jitter(COLORS[color], rng, 16))
    return Scene("object", img, [Obj(shape, color, cx, cy, r)])


def _objects(rng: np.random.Generator) -> Scene:
    color, shape = pick(rng, tuple(COLORS)), pick(rng, SHAPES)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    img = background(IMAGE_SIZE, rng)
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(0.06, 0.11) * IMAGE_SIZE)
    fill = jitter(COLORS[color], rng, 16)
    objs = [Obj(shape, color, cx, cy, r) for cx, cy in place(rng, n, r, IMAGE_SIZE)]
    for o in objs:
        draw_shape(draw, o.shape, o.cx, o.cy, o.r, fill)
    return Scene("objects", img, objs)


def _pair(rng: np.random.Generator) -> Scene:
    c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    s1, s2 = pick(rng, SHAPES), pick(rng, SHAPES)
    relation = pick(rng, RELATIONS)
    img = background(IMAGE_SIZE, rng)
    r = float(rng.uniform(0.09, 0.15) * IMAGE_SIZE)
    lo, hi = r + 1, IMAGE_SIZE - r - 1
    a = float(rng.uniform(lo, hi - 2 * r - 4))
    b = float(rng.uniform(a + 2 * r + 4, hi))
    cross = rng.uniform(lo, hi, size=2)
    first, second = (a, b) if relation in ("left", "above") else (b, a)
    if relation in ("left", "right"):
        p1, p2 = (first, float(cross[0])), (second, float(cross[1]))
    else:
        p1, p2 = (float(cross[0]), first), (float(cross[1]), second)
    if relation in ("left", "right") and abs(p1[1] - p2[1]) > abs(p1[0] - p2[0]):
        p2 = (p2[0], p1[1])  # keep the named relation the dominant one
    if relation in ("above", "below") and abs(p1[0] - p2[0]) > abs(p1[1] - p2[1]):
        p2 = (p1[0], p2[1])
    objs = [Obj(s1, c1, *p1, r), Obj(s2, c2, *p2, r)]
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(draw, o.shape, o.cx, o.cy, o.r, jitter(COLORS[o.color], rng, 16))
    return Scene("pair", img, objs, relation=relation)


def _text(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_TEXT + 1))
    text = "".join(CHARSET[int(i)] for i in rng.integers(len(CHARSET), size=n))
    img = background(IMAGE_SIZE, rng)
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(12, 26))
    font = ImageFont.load_default(size=size)
    while size > 8 and draw.textlength(text, font=font) > IMAGE_SIZE - 4:
        size -= 1
        font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = float(rng.uniform(2, max(3.0, IMAGE_SIZE - w - 2))) - left
    y = float(rng.uniform(2, max(3.0, IMAGE_SIZE - h - 2))) - top
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    draw.text((x, y), text, fill=ink, font=font)
    return Scene("text", img, [], text=text, glyphs=glyph_boxes(draw, text, font, x, y))


def glyph_boxes(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, x: float, y: float
) -> list[Glyph]:
    """The ink box of each character of ``text`` drawn at ``(x, y)``: character ``i`` starts
    where the advance of ``text[:i]`` ends (what ``draw.text`` does for a font without
    kerning pairs between these characters, as PIL's default font)."""
    glyphs = []
    for i, char in enumerate(text):
        if char.isspace():
            continue
        start = x + draw.textlength(text[:i], font=font)
        glyphs.append(Glyph(char, *(float(v) for v in draw.textbbox((start, y), char, font=font))))
    return glyphs


def _marker(rng: np.random.Generator) -> Scene:
    color = pick(rng, tuple(COLORS))
    img = background(DETAIL_SIZE, rng)
    draw = ImageDraw.Draw(img)
    n_clutter = int(rng.integers(4, 13))
    r_clutter = DETAIL_SIZE * float(rng.uniform(0.045, 0.07))
    centres = place(rng, n_clutter + 1, r_clutter, DETAIL_SIZE)
    objs = []
    for cx, cy in centres[:-1]:
        grey = int(rng.integers(80, 180))
        shape = pick(rng, SHAPES)
        draw_shape(draw, shape, cx, cy, r_clutter, (grey, grey, grey))
        objs.append(Obj(shape, GREY, cx, cy, r_clutter))
    cx, cy = centres[-1]
    s = DETAIL_SIZE * float(rng.uniform(0.015, 0.035))
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=jitter(COLORS[color], rng, 12))
    objs.append(Obj("square", color, cx, cy, s / 0.85))  # draw_shape's square: half-side 0.85r
    return Scene("marker", img, objs)


SCENE_MAKERS = {"object": _object, "objects": _objects, "pair": _pair, "text": _text}
SCENE_MAKERS["marker"] = _marker


def scene_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of pretraining batch ``step`` under ``seed`` (a stream of its own)."""
    return np.random.default_rng([int(seed), PRETRAIN_STREAM, int(step)])


def make_scenes(seed: int, step: int, batch_size: int, kinds: Sequence[str] = KINDS) -> list[Scene]:
    """Batch ``step`` of the pretraining stream: ``batch_size`` scenes, kinds drawn uniformly
    from ``kinds``. A pure function of its arguments.

    Raises:
        KeyError: an unknown kind (the valid ones are listed).
    """
    bad = [k for k in kinds if k not in SCENE_MAKERS]
    if bad or not kinds:
        raise KeyError(f"unknown scene kinds {bad or list(kinds)}; valid kinds are {list(KINDS)}")
    rng = scene_rng(seed, step)
    return [SCENE_MAKERS[pick(rng, tuple(kinds))](rng) for _ in range(batch_size)]


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels (the benchmark's own de-duplication key)."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
