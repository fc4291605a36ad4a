"""The mini zoo's pretraining data: deterministic, its own seed stream, masks that match the
pixels, captions in the text tower's vocabulary, and no image shared with the benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from moe_vision.zoo.data import KINDS, Scene, make_scenes, pixel_hash, vocabulary
from moe_vision.zoo.text import WordTokenizer


def test_scenes_are_a_pure_function_of_seed_and_step() -> None:
    a = [pixel_hash(s.image) for s in make_scenes(3, 7, 10)]
    b = [pixel_hash(s.image) for s in make_scenes(3, 7, 10)]
    c = [pixel_hash(s.image) for s in make_scenes(3, 8, 10)]
    assert a == b
    assert not set(a) & set(c)


def test_every_kind_is_drawn_and_unknown_kinds_are_named() -> None:
    kinds = {s.kind for s in make_scenes(0, 0, 60)}
    assert kinds == set(KINDS)
    with pytest.raises(KeyError, match="valid kinds"):
        make_scenes(0, 0, 2, ("object", "hologram"))


def _background_mask(scene: Scene) -> np.ndarray:
    """Pixels that differ from the (uniform) background colour: an independent object mask."""
    px = np.asarray(scene.image).astype(int)
    return np.abs(px - px[0, 0]).sum(-1) > 30


@pytest.mark.parametrize("kind", ["object", "objects", "pair", "marker"])
def test_object_masks_cover_the_drawn_pixels(kind: str) -> None:
    for scene in make_scenes(1, 0, 4, (kind,)):
        size = scene.image.width
        union = np.zeros((size, size), dtype=bool)
        for i in range(len(scene.objects)):
            union |= scene.mask(i, size)
        drawn = _background_mask(scene)
        # the object masks and the drawn pixels agree except on anti-aliased edges
        assert (union ^ drawn).mean() < 0.02, (kind, (union ^ drawn).mean())
        assert drawn.any()


def test_captions_name_what_is_drawn_and_tokenise() -> None:
    tok = WordTokenizer()
    for scene in make_scenes(2, 0, 100):
        caption = scene.caption()
        assert set(caption.split()) <= set(vocabulary())
        ids = tok.encode(caption)
        assert ids[-1] == tok.eot == max(ids)
        if scene.kind == "text":
            assert caption.endswith(" ".join(scene.text))
        elif scene.kind == "objects":
            assert scene.objects[0].color in caption and scene.objects[0].shape in caption
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.encode("a plaid hexagon")


def test_no_pretraining_image_is_a_benchmark_image() -> None:
    """Pixel hashes of every kind of pretraining scene (the recipes' first batches, seed 0, and
    the fingerprint inputs) against every image of the default benchmark (generated once into
    the shared cache, as probes and runs do)."""
    from moe_vision.experiment.run_config import DataConfig
    from moe_vision.features.cache import default_cache_dir
    from moe_vision.zoo import MINI_RECIPES
    from moe_vision.zoo.core import fingerprint_inputs

    splits, image_root = DataConfig().resolve(default_cache_dir().parent)
    bench = set()
    for path in splits.values():
        for record in json.loads(path.read_text()):
            bench.add(pixel_hash(Image.open(image_root / record["image"])))
    assert len(bench) > 4000
    ours = {pixel_hash(s.image) for s in fingerprint_inputs()}
    for recipe in MINI_RECIPES.values():
        for step in range(2):
            ours |= {pixel_hash(s.image) for s in make_scenes(0, step, 32, recipe.config.kinds)}
    assert len(ours) > 150  # recipes that share kinds share their first batches
    assert not ours & bench
