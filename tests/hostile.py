"""Hostile files for the image-intake and data tests: tiny PNGs that claim huge sizes,
truncated JPEGs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 1-bit greyscale PNG of ``width x height`` whose pixel data is a few bytes
    (a decompression bomb's header: a decoder would allocate ``width * height`` pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def truncated_jpeg(size: tuple[int, int] = (64, 48), keep: float = 0.5) -> bytes:
    """A random-noise JPEG cut after ``keep`` of its bytes (its header still reads fine)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[: int(len(data) * keep)]
