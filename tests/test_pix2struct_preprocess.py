"""Pix2Struct preprocessing never holds a full image as floats, and computes the same thing.

The library's math (standardise the float image, then resize) is the reference: strip-wise
resizing and histogram statistics must reproduce it, over several strips and for a 1-bit page.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from transformers import Pix2StructImageProcessor

import experts
from experts.families.pix2struct import histogram_mean_std, resize_uint8


def _page(h: int, w: int, seed: int = 0) -> Image.Image:
    """A 1-bit 'document' (lines and noise) as the RGB image load_image would give."""
    rng = np.random.default_rng(seed)
    bits = rng.random((h, w)) < 0.05
    bits[::17, :] = True
    bits[:, ::23] = True
    return Image.fromarray(bits).convert("1").convert("RGB")


def test_strip_resize_and_histogram_stats_match_the_float_path() -> None:
    image = _page(301, 517)
    full = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    ref = tvF.resize(
        full[None], [48, 80], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True
    )
    strip = 4 * 3 * 517 * 10  # ten rows per strip: 31 strips
    torch.testing.assert_close(resize_uint8(image, 48, 80, strip_bytes=strip), ref)
    up = tvF.resize(full[None], [320, 528], interpolation=tvF.InterpolationMode.BILINEAR)
    torch.testing.assert_close(resize_uint8(image, 320, 528, strip_bytes=strip), up)
    mean, std = histogram_mean_std(image)
    assert abs(mean - full.double().mean().item()) < 1e-9
    assert abs(std - full.double().std().item()) < 1e-9


def test_a_large_page_equals_the_library_processor() -> None:
    expert = experts.create_expert("pix2struct-tiny", arch={"max_aspect_ratio": 64.0})
    processor = Pix2StructImageProcessor()
    image = _page(1800, 1300, seed=1)  # two strips of the default size
    ref = processor(images=image, max_patches=64, return_tensors="pt")
    got = expert.preprocess_one(image)
    torch.testing.assert_close(got["flattened_patches"], ref["flattened_patches"][0])
    assert torch.equal(got["attention_mask"], ref["attention_mask"][0])
