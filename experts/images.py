"""Raw image intake and the shared resize + normalise step.

:func:`load_image` is where images enter the platform, so it is where bad images are caught:
missing files, unreadable or truncated files, and modes that need care (greyscale ``L``,
``LA``, ``RGBA`` on a white background, palette ``P``, 16-bit ``I;16``, 32-bit ``I``/``F``,
``CMYK``) are all converted to 8-bit RGB or rejected with a message naming the image and what
was expected. Experts call :func:`resize_normalise` with their *own* size, mean and std.

Image files are fully decoded when loaded (a truncated JPEG or PNG is an :class:`ImageError`,
never a half-grey image), and their pixel count is checked from the header *before* decoding:
a 12 KB PNG that claims 10000x10000 pixels is refused without allocating them. The limit is
:data:`MAX_IMAGE_PIXELS` (default 50 megapixels, about 7071x7071; environment variable
``MOE_VISION_MAX_IMAGE_PIXELS``), per call ``load_image(path, max_pixels=N)``, or globally
:func:`set_max_image_pixels`. A JPEG's EXIF orientation is applied (``ImageOps.exif_transpose``),
so a portrait photo stored sideways is read upright.

Before an image file is opened or hashed, :func:`check_image_file` looks at what the path is
(following symbolic links): only a regular file is read -- a FIFO would block the reader
forever and ``/dev/zero`` never ends -- and one larger than :data:`MAX_IMAGE_BYTES` (default
256 MiB; ``MOE_VISION_MAX_IMAGE_BYTES`` or :func:`set_max_image_bytes`) is refused unread, so a
huge sparse file costs nothing. :func:`image_content_key` (the feature cache's key of an image:
the sha256 of its bytes) reads at most that many bytes and remembers the key of each path by
``(device, inode, size, modification time)``, so a million records over a few hundred images
hash each file once per process.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS: int = int(os.environ.get("MOE_VISION_MAX_IMAGE_PIXELS", 50_000_000))
"""Largest width x height accepted from an image file (checked before decoding)."""

MAX_IMAGE_BYTES: int = int(os.environ.get("MOE_VISION_MAX_IMAGE_BYTES", 256 * 2**20))
"""Largest image file read, in bytes (checked before reading; default 256 MiB)."""

KEY_MEMO_SIZE = 1_000_000
"""Paths whose content key :func:`image_content_key` remembers (oldest forgotten first)."""

_KEYS: dict[str, tuple[tuple[int, int, int, int], str]] = {}  # path -> (stamp, sha256)
_KEYS_LOCK = threading.Lock()  # the feature cache hashes files from a thread pool
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot be used: names the image and what was expected."""


class ImageNotFoundError(ImageError):
    """The image file does not exist."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the limit (checked before decoding)."""


def set_max_image_pixels(limit: int) -> None:
    """Change :data:`MAX_IMAGE_PIXELS` (the pixel limit of image files) for this process."""
    global MAX_IMAGE_PIXELS
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the image pixel limit must be a positive int, got {limit!r}")
    MAX_IMAGE_PIXELS = limit


def set_max_image_bytes(limit: int) -> None:
    """Change :data:`MAX_IMAGE_BYTES` (the size limit of image files) for this process."""
    global MAX_IMAGE_BYTES
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the image file size limit must be a positive int, got {limit!r}")
    MAX_IMAGE_BYTES = limit


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _checked(path: Path, st: os.stat_result, max_bytes: int | None) -> os.stat_result:
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(
            f"image {path} is not a regular file ({_file_kind(st.st_mode)}); expected an image file"
        )
    limit = MAX_IMAGE_BYTES if max_bytes is None else int(max_bytes)
    if st.st_size > limit:
        raise ImageTooLargeError(
            f"image file {path} is {st.st_size} bytes, more than the limit of {limit} bytes "
            f"({limit / 2**20:.0f} MiB; raise it with MOE_VISION_MAX_IMAGE_BYTES or "
            "experts.images.set_max_image_bytes)"
        )
    if st.st_size == 0:
        raise ImageError(f"cannot read image {path}: the file is empty (0 bytes)")
    return st


def check_image_file(path: str | os.PathLike, max_bytes: int | None = None) -> os.stat_result:
    """What ``path`` is, checked before it is opened: a regular, non-empty file (symbolic links
    followed) of at most ``max_bytes`` bytes (``None``: :data:`MAX_IMAGE_BYTES`).

    Returns:
        its ``os.stat`` result.

    Raises:
        ImageNotFoundError: nothing at ``path`` (or a dangling link).
        ImageTooLargeError: more bytes than the limit (nothing is read).
        ImageError: a FIFO, device, socket or folder ("not a regular file"), or an empty file.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise ImageNotFoundError(f"image file not found: {path}") from err
    except OSError as err:
        raise ImageError(f"cannot read image {path}: {err}") from err
    return _checked(path, st, max_bytes)


def image_content_key(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """Stable content hash of an image file (sha256 of its bytes): the feature cache's key.

    The file is checked first (:func:`check_image_file`), opened without blocking and checked
    again on the open descriptor, and read in 1 MiB blocks up to the size limit. The key is
    remembered per path with the file's ``(device, inode, size, mtime)``: a file changed since
    is hashed again.

    Raises:
        ImageError: see :func:`check_image_file`; also when the file grows past the limit while
            it is read.
    """
    path = Path(path)
    limit = MAX_IMAGE_BYTES if max_bytes is None else int(max_bytes)
    st = check_image_file(path, limit)
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    name = str(path)
    known = _KEYS.get(name)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ImageError(f"cannot read image {path}: {err}") from err
    with os.fdopen(fd, "rb") as f:
        st = _checked(path, os.fstat(fd), limit)  # the file opened is the file checked
        h, read = hashlib.sha256(), 0
        while block := f.read(min(2**20, limit + 1 - read)):
            read += len(block)
            if read > limit:
                raise ImageTooLargeError(
                    f"image file {path} grew past the limit of {limit} bytes while it was read"
                )
            h.update(block)
    key = h.hexdigest()
    with _KEYS_LOCK:
        if len(_KEYS) >= KEY_MEMO_SIZE:
            _KEYS.pop(next(iter(_KEYS)))
        _KEYS[name] = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), key)
    return key


def open_image_file(
    path: str | os.PathLike, max_pixels: int | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Read and fully decode an image file, refusing oversized images before decoding; the
    EXIF orientation is applied.

    Args:
        path: the image file.
        max_pixels: largest ``width * height`` (``None``: :data:`MAX_IMAGE_PIXELS`).
        max_bytes: largest file size (``None``: :data:`MAX_IMAGE_BYTES`).

    Raises:
        ImageError: missing, empty, unreadable, truncated or corrupt file, not a regular file,
            more bytes or pixels than the limits (the message says the limit and how to change
            it).
    """
    path = Path(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    check_image_file(path, max_bytes)
    try:
        with warnings.catch_warnings():  # the limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # reads the header only
        with im:
            w, h = im.size
            if w * h > limit:
                raise ImageTooLargeError(
                    f"image {path} is {w}x{h} = {w * h} pixels, more than the limit of {limit} "
                    "(raise it with MOE_VISION_MAX_IMAGE_PIXELS or "
                    "experts.images.set_max_image_pixels)"
                )
            im.load()  # full decode: truncated and corrupt files fail here
            return ImageOps.exif_transpose(im)  # a copy, upright
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"image {path} is a decompression bomb for PIL ({err}); refused before decoding"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(
            f"cannot read image {path}: {err} (is the file corrupt or truncated?)"
        ) from err


def _to_uint8_rgb(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{what}: expected an (H, W), (H, W, 1|3|4) image, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = (arr[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).round()
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def load_image(
    image: Image.Image | torch.Tensor | str | os.PathLike, max_pixels: int | None = None
) -> Image.Image:
    """Any supported image to an 8-bit RGB PIL image.

    Args:
        image: a PIL image of any mode, a uint8 tensor ``(C, H, W)`` with ``C`` in {1, 3, 4}
            or ``(H, W)``, or a path to an image file.
        max_pixels: pixel limit of image files (``None``: :data:`MAX_IMAGE_PIXELS`).

    Raises:
        ImageError: missing, unreadable, truncated or oversized file (including PIL's
            ``DecompressionBombError``), empty image, unsupported mode/dtype/shape.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        image = open_image_file(path, max_pixels)
        what = str(path)
    else:
        what = "image"
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype != torch.uint8:
            raise ImageError(f"{what}: tensor images must be uint8 in [0, 255], got {t.dtype}")
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ImageError(f"{what}: expected a (C, H, W) or (H, W) tensor, got {tuple(t.shape)}")
        if t.numel() == 0:
            raise ImageError(f"{what}: empty image {tuple(image.shape)}")
        return _to_uint8_rgb(t.numpy(), what)
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"expected a PIL image, a uint8 tensor or a path, got {type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{what}: empty image of size {image.size}")
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a PIL image opened by the caller
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            lo, hi = 0.0, 65535.0 if arr.max() > 255 else 255.0
        scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return _to_uint8_rgb(np.clip(scaled, 0, 255).round().astype(np.uint8), what)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        return _to_uint8_rgb(np.asarray(image.convert("RGBA")), what)
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    raise ImageError(
        f"{what}: unsupported image mode {mode!r}; expected RGB, L, RGBA, P, I;16, I or F"
    )


def resize_normalise(
    image: Image.Image,
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """Resize an RGB image to ``size = (H, W)`` and normalise it: returns ``(3, H, W)`` float32."""
    im = image.resize((size[1], size[0]), resample=resample)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s
