"""Shared test setup: offline hub, one torch thread, deterministic seeds, sample images.

One thread per process: on a 2-core machine that is also running something else, two OpenMP
threads per test process spin against each other (one step of the laptop Eagle run cost 0.29 s
of CPU on one thread and 3.1-4.3 s on two, load ~11), so the suite must not depend on an idle
machine. Subprocesses the tests start inherit ``OMP_NUM_THREADS=1`` unless they set their own."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def _mixed_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L")
    pal = rgb.convert("P")
    i16 = Image.fromarray(rng.integers(0, 65536, (40, 30), dtype=np.uint16))
    assert i16.mode == "I;16"
    one = Image.new("RGB", (1, 1), (200, 10, 10))
    strip = Image.fromarray(rng.integers(0, 256, (300, 4000, 3), dtype=np.uint8), "RGB")
    return {"RGB": rgb, "RGBA": rgba, "L": grey, "P": pal, "I;16": i16, "1x1": one, "strip": strip}


@pytest.fixture(scope="session")
def mixed_images() -> dict[str, Image.Image]:
    """Real PIL images of mixed sizes and modes: RGB, RGBA, L, P, I;16, 1x1, 4000x300 strip."""
    return _mixed_images()
