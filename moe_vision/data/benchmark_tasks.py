"""The built-in benchmark's tasks as words: categories, answer sets, question and caption templates.

Each of the six default categories (:mod:`moe_vision.data.benchmark`), and the opt-in
*texture* (:mod:`moe_vision.data.benchmark_resolution`), asks about one property of a scene and
answers from a finite set (:data:`ANSWERS`), so chance accuracy is defined (:data:`CHANCE`).
Questions and captions are templates filled with the scene's fields
(:mod:`moe_vision.data.benchmark_scenes` draws the scenes); :func:`corpus` lists every string
the six default categories can produce, for the offline tokenizer of the tiny LLMs (the opt-in
categories' words are left out, so the tokenizer, and every default run, stay unchanged; the
byte-level tokenizer still encodes them).
"""

from __future__ import annotations

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
TEXTURES: tuple[str, ...] = ("plain", "horizontal", "vertical", "checkered")
"""The *texture* marker's pattern: none, 1-px rows, 1-px columns or a 1-px checkerboard."""
RESOLUTION_CATEGORIES: tuple[str, ...] = ("texture",)
"""Opt-in categories whose answer is absent at 64 px (``benchmark_resolution``)."""

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "spatial": RELATIONS,
    "ocr": WORDS,
    "detail": MARKER_COLORS,
    "texture": TEXTURES,
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
    "texture": (
        "What pattern does the small marker have?",
        "Is the tiny square plain, horizontal, vertical or checkered?",
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
    "texture": "Gray shapes and a small marker with a {texture} pattern.",
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
    "texture": "texture",
}


def corpus() -> list[str]:
    """Every string the six default categories can produce (templates filled with every value).

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
    for category in CATEGORIES:
        texts.extend(ANSWERS[category])
    templates = [t for c in CATEGORIES for t in QUESTIONS[c]] + [CAPTIONS[c] for c in CATEGORIES]
    for template in templates:
        # Two passes over the values give every word in every slot without a full product.
        for i in range(max(len(v) for v in fields.values())):
            values = {k: v[i % len(v)] for k, v in fields.items()}
            values2 = {k: v[(i + 1) % len(v)] for k, v in fields.items()}
            texts.append(template.format(**values))
            texts.append(template.format(**values2))
    return texts
