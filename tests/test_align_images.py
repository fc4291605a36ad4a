"""Grid alignment (:mod:`experts.align`) and image intake (:mod:`experts.images`).

Each alignment method is checked against an independent reference: bilinear against
``F.interpolate``, average pooling against a brute-force mean over each cell's source window,
pixel-unshuffle against a brute-force index loop. Masked (ragged) maps must never let padding
values into valid cells, and Pix2Struct's top-left content must fill the target grid. Image
intake is checked mode by mode against per-pixel formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from experts import FeatureMap, ImageError, align_to_grid, load_image, resize_normalise
from experts.align import aligned_channels, unshuffle_factor


def _fmap(b: int, c: int, h: int, w: int, mask: torch.Tensor | None = None) -> FeatureMap:
    torch.manual_seed(h * 100 + w)
    return FeatureMap(torch.randn(b, c, h, w, dtype=torch.float64), 16, "test", mask)


def _brute_adaptive_mean(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling by loops: cell (i, j) averages source rows
    ``floor(i*H/h) .. ceil((i+1)*H/h)`` (and the same for columns)."""
    b, c, hh, ww = x.shape
    h, w = grid
    out = torch.zeros(b, c, h, w, dtype=x.dtype)
    for i in range(h):
        r0, r1 = (i * hh) // h, math.ceil((i + 1) * hh / h)
        for j in range(w):
            c0, c1 = (j * ww) // w, math.ceil((j + 1) * ww / w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


# ---------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("src,dst", [((8, 8), (24, 24)), ((64, 64), (24, 24)), ((10, 6), (7, 9))])
def test_bilinear_equals_f_interpolate(src: tuple[int, int], dst: tuple[int, int]) -> None:
    fmap = _fmap(2, 5, *src)
    out = align_to_grid(fmap, dst, "bilinear")
    ref = F.interpolate(fmap.features, size=dst, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.features, ref)
    assert out.grid == dst and out.mask is None and out.source == "test"
    assert out.stride == max(1, round(16 * src[0] / dst[0]))


@pytest.mark.parametrize("src,dst", [((64, 64), (32, 32)), ((9, 6), (3, 3)), ((37, 37), (24, 24))])
def test_avgpool_equals_brute_force_mean(src: tuple[int, int], dst: tuple[int, int]) -> None:
    fmap = _fmap(2, 3, *src)
    out = align_to_grid(fmap, dst, "avgpool")
    torch.testing.assert_close(out.features, _brute_adaptive_mean(fmap.features, dst))


@pytest.mark.parametrize("src,dst", [((64, 64), (32, 32)), ((12, 8), (3, 2))])
def test_unshuffle_equals_brute_force_reshape(src: tuple[int, int], dst: tuple[int, int]) -> None:
    fmap = _fmap(2, 3, *src)
    out = align_to_grid(fmap, dst, "unshuffle")
    r = src[0] // dst[0]
    b, c = 2, 3
    ref = torch.zeros(b, c * r * r, *dst, dtype=fmap.features.dtype)
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                for y in range(dst[0]):
                    for x in range(dst[1]):
                        ref[:, ch * r * r + i * r + j, y, x] = fmap.features[
                            :, ch, y * r + i, x * r + j
                        ]
    assert torch.equal(out.features, ref)
    assert out.stride == 16 * r
    assert out.channels == aligned_channels(c, src, dst, "unshuffle") == c * r * r


def test_auto_pools_down_and_interpolates_up() -> None:
    big, small = _fmap(1, 2, 64, 64), _fmap(1, 2, 8, 8)
    torch.testing.assert_close(
        align_to_grid(big, (32, 32)).features, align_to_grid(big, (32, 32), "avgpool").features
    )
    torch.testing.assert_close(
        align_to_grid(small, (24, 24)).features, align_to_grid(small, (24, 24), "bilinear").features
    )
    assert align_to_grid(small, (8, 8), "bilinear") is small  # same grid: nothing to do


def test_bad_factors_and_methods_raise() -> None:
    fmap = _fmap(1, 2, 64, 64)
    with pytest.raises(ValueError, match="integer multiple"):
        align_to_grid(fmap, (24, 24), "unshuffle")
    with pytest.raises(ValueError, match="integer multiple"):
        unshuffle_factor((64, 48), (32, 32))  # different factors per axis
    with pytest.raises(ValueError, match="integer multiple"):
        align_to_grid(_fmap(1, 2, 8, 8), (16, 16), "unshuffle")  # upsampling
    with pytest.raises(ValueError, match="unknown alignment method 'nearest'"):
        align_to_grid(fmap, (32, 32), "nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown alignment method"):
        aligned_channels(4, (8, 8), (4, 4), "cubic")  # type: ignore[arg-type]


def _ragged(
    b: int, c: int, h: int, w: int, rectangles: bool = False
) -> tuple[FeatureMap, FeatureMap]:
    """A masked map whose padding holds huge values, and the same map with zero padding.
    ``rectangles``: Pix2Struct's layout (each image's cells a top-left rectangle); otherwise
    irregular valid regions (an L shape, a block off the corner) that cannot be cropped."""
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    if rectangles:
        mask[0, : h // 2, : w - 3] = True  # a wide image in the top-left corner
        mask[1, : h - 2, : w // 3] = True  # a tall one
    else:
        mask[0, : h // 2, : w - 3] = True
        mask[0, : h - 2, : w // 3] = True  # an L
        mask[1, 2 : h - 2, 1 : w // 2] = True  # a block away from the corner
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    noisy = torch.where(mask[:, None], x, torch.full_like(x, 1e6))
    clean = torch.where(mask[:, None], x, torch.zeros_like(x))
    return FeatureMap(noisy, 16, "ragged", mask), FeatureMap(clean, 16, "ragged", mask)


@pytest.mark.parametrize(
    "method,dst",
    [("bilinear", (5, 7)), ("bilinear", (24, 24)), ("avgpool", (4, 4)), ("unshuffle", (6, 4))],
)
def test_masked_maps_never_leak_padding(method: str, dst: tuple[int, int]) -> None:
    noisy, clean = _ragged(2, 3, 12, 8)
    a, b = align_to_grid(noisy, dst, method), align_to_grid(clean, dst, method)
    assert a.mask is not None and a.mask.shape == (2, *dst)
    assert torch.equal(a.mask, b.mask) and a.mask.any()
    valid = a.mask[:, None].expand_as(a.features)
    torch.testing.assert_close(a.features[valid], b.features[valid])
    assert a.features[valid].abs().max() < 1e3  # no padding value reached a valid cell
    if method == "avgpool":  # a valid cell is the mean of its valid source cells only
        m = clean.mask[:, None].to(torch.float64)
        ref = _brute_adaptive_mean(clean.features, dst) / _brute_adaptive_mean(m, dst).clamp_min(
            1e-12
        )
        torch.testing.assert_close(a.features[valid], ref[valid])


@pytest.mark.parametrize(
    "method,dst",
    [("bilinear", (5, 7)), ("bilinear", (24, 24)), ("avgpool", (4, 4)), ("auto", (5, 3))],
)
def test_top_left_content_fills_the_target_grid(method: str, dst: tuple[int, int]) -> None:
    """Pix2Struct's layout: each sample's valid rectangle alone is resampled to the whole grid
    (no mask left), exactly as the cropped map would be, and no padding value reaches it."""
    noisy, clean = _ragged(2, 3, 12, 8, rectangles=True)
    a, b = align_to_grid(noisy, dst, method), align_to_grid(clean, dst, method)
    assert a.mask is None and a.features.shape == (2, 3, *dst)
    torch.testing.assert_close(a.features, b.features)
    for i, (rows, cols) in enumerate([(6, 5), (10, 2)]):
        crop = clean.features[i : i + 1, :, :rows, :cols]
        pool = method == "avgpool" or (method == "auto" and rows >= dst[0] and cols >= dst[1])
        if pool:
            ref = _brute_adaptive_mean(crop, dst)
        else:
            ref = F.interpolate(crop, size=dst, mode="bilinear", align_corners=False)
        torch.testing.assert_close(a.features[i : i + 1], ref)


def test_a_square_pix2struct_image_lands_cell_for_cell_on_the_base_grid() -> None:
    """A square image fills 8x8 of an 11x11 Pix2Struct grid: aligned to CLIP's 8x8 grid, cell
    (i, j) must be the patch at (i, j), in register with every other expert's map."""
    x = torch.randn(1, 4, 11, 11, dtype=torch.float64)
    mask = torch.zeros(1, 11, 11, dtype=torch.bool)
    mask[:, :8, :8] = True
    for method in ("auto", "bilinear", "avgpool"):
        out = align_to_grid(FeatureMap(x, 16, "pix2struct", mask), (8, 8), method)
        assert out.mask is None
        torch.testing.assert_close(out.features, x[:, :, :8, :8])


def test_a_fully_valid_mask_changes_nothing() -> None:
    fmap = _fmap(1, 2, 12, 12)
    full = FeatureMap(fmap.features, 16, "test", torch.ones(1, 12, 12, dtype=torch.bool))
    for method, dst in [("bilinear", (5, 5)), ("avgpool", (4, 4))]:
        torch.testing.assert_close(
            align_to_grid(full, dst, method).features, align_to_grid(fmap, dst, method).features
        )


def test_feature_map_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        FeatureMap(torch.zeros(2, 3, 4), 16, "bad")
    with pytest.raises(ValueError, match=r"mask must be \(B, H, W\)"):
        FeatureMap(torch.zeros(2, 3, 4, 4), 16, "bad", torch.ones(2, 4, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------- images
def _rng_image(mode_shape: tuple[int, ...], dtype=np.uint8, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(7).integers(0, hi, mode_shape).astype(dtype)


def test_rgb_passes_through_and_greyscale_repeats() -> None:
    arr = _rng_image((5, 7, 3))
    im = Image.fromarray(arr, "RGB")
    assert load_image(im) is im
    grey = _rng_image((5, 7))
    out = np.asarray(load_image(Image.fromarray(grey, "L")))
    assert out.shape == (5, 7, 3) and all((out[..., k] == grey).all() for k in range(3))


def test_rgba_and_palette_composite_on_white() -> None:
    arr = _rng_image((6, 4, 4))
    out = np.asarray(load_image(Image.fromarray(arr, "RGBA"))).astype(np.float64)
    a = arr[..., 3:4] / 255.0
    ref = np.round(arr[..., :3] * a + 255.0 * (1 - a))
    assert np.array_equal(out, ref)
    rgb = Image.fromarray(_rng_image((6, 4, 3)), "RGB")
    pal = rgb.convert("P")
    assert np.array_equal(np.asarray(load_image(pal)), np.asarray(pal.convert("RGB")))


def test_sixteen_and_thirty_two_bit_images_are_scaled() -> None:
    arr = _rng_image((4, 5), np.uint16, 65536)
    out = np.asarray(load_image(Image.fromarray(arr)))
    assert np.array_equal(out[..., 0], np.round(arr / 65535.0 * 255.0).astype(np.uint8))
    small = _rng_image((4, 5), np.int32, 256)  # mode I holding 8-bit values: unchanged
    out = np.asarray(load_image(Image.fromarray(small, "I")))
    assert np.array_equal(out[..., 1], small.astype(np.uint8))
    f = np.linspace(-2.0, 3.0, 20, dtype=np.float32).reshape(4, 5)  # mode F: min-max
    out = np.asarray(load_image(Image.fromarray(f, "F")))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_uint8_tensors_of_every_layout() -> None:
    arr = _rng_image((3, 5, 6))
    im = load_image(torch.from_numpy(arr))
    assert np.array_equal(np.asarray(im), arr.transpose(1, 2, 0))
    grey = load_image(torch.from_numpy(arr[0]))
    assert np.array_equal(np.asarray(grey)[..., 2], arr[0])
    one = load_image(torch.from_numpy(arr[:1]))
    assert np.array_equal(np.asarray(one)[..., 0], arr[0])
    rgba = np.concatenate([arr, np.full((1, 5, 6), 255, np.uint8)])
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(rgba))), arr.transpose(1, 2, 0))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(3, 4, 4), "uint8"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), r"\(C, H, W\)"),
        (torch.zeros(5, 4, 4, dtype=torch.uint8), "1\\|3\\|4"),
        (torch.zeros(3, 0, 4, dtype=torch.uint8), "empty"),
        ([[1, 2]], "PIL image"),
    ],
)
def test_bad_in_memory_images_raise(bad: object, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        load_image(bad)  # type: ignore[arg-type]


def test_files_load_and_bad_files_name_the_path(tmp_path) -> None:
    arr = _rng_image((8, 9, 3))
    good = tmp_path / "good.png"
    Image.fromarray(arr).save(good)
    assert np.array_equal(np.asarray(load_image(str(good))), arr)
    assert np.array_equal(np.asarray(load_image(good)), arr)  # os.PathLike too
    with pytest.raises(ImageError, match="not found.*missing.png"):
        load_image(str(tmp_path / "missing.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="broken.png.*corrupt or truncated"):
        load_image(str(broken))


def test_resize_normalise_uses_the_given_size_mean_and_std() -> None:
    im = Image.new("RGB", (40, 10), (255, 128, 0))
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.2, 0.3)
    x = resize_normalise(im, (12, 20), mean, std)
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32
    for k, v in enumerate((255, 128, 0)):
        torch.testing.assert_close(x[k], torch.full((12, 20), (v / 255 - mean[k]) / std[k]))


# ---------------------------------------------------------------------------- hostile files
def test_truncated_jpeg_and_empty_file_are_caught(tmp_path) -> None:
    from hostile import truncated_jpeg

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(truncated_jpeg())
    with Image.open(cut) as im:
        assert im.size == (64, 48)  # the header alone looks fine
    with pytest.raises(ImageError, match="cut.jpg.*truncated"):
        load_image(cut)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*empty \\(0 bytes\\)"):
        load_image(empty)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch) -> None:
    from hostile import png_claiming

    from experts import images

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(10_000, 10_000))  # 100M pixels in ~100 bytes
    decoded = []
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(
        images.ImageTooLargeError,
        match=r"10000x10000 = 100000000 pixels.*"
        r"limit of 50000000.*MOE_VISION_MAX_IMAGE_PIXELS",
    ):
        load_image(bomb)
    assert decoded == []  # refused from the header
    with pytest.raises(ImageError, match="limit of 99"):
        load_image(bomb, max_pixels=99)
    monkeypatch.undo()
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(20_000, 20_000))  # past PIL's own bomb limit
    with pytest.raises(ImageError, match="huge.png.*decompression bomb"):
        load_image(huge, max_pixels=10**9)
    images.set_max_image_pixels(10**6)
    try:
        with pytest.raises(ImageError, match="limit of 1000000"):
            load_image(bomb)
    finally:
        images.set_max_image_pixels(50_000_000)


# ---------------------------------------------------------------------------- special files
def _png_head(path) -> bytes:
    Image.fromarray(_rng_image((8, 9, 3))).save(path)
    return path.read_bytes()


@pytest.mark.timeout(60)
def test_special_and_huge_files_are_refused_unread(tmp_path) -> None:
    """Issue 27 item 10: a sparse file past the size limit is refused before any byte is read
    (it begins with a valid PNG), a FIFO is "not a regular file" (never opened for a blocking
    read), and a link to /dev/zero too; the limit is configurable and named."""
    import os

    from experts import images

    sparse = tmp_path / "sparse.png"
    _png_head(sparse)
    with open(sparse, "r+b") as f:
        f.truncate(300 * 2**20)  # 300 MiB, nearly all holes
    for fn in (images.image_content_key, load_image):
        with pytest.raises(
            images.ImageTooLargeError,
            match=r"sparse.png is 314572800 bytes, more than the limit of 268435456 bytes "
            r"\(256 MiB; raise it with MOE_VISION_MAX_IMAGE_BYTES",
        ):
            fn(sparse)
    images.set_max_image_bytes(2**30)
    try:
        assert len(images.image_content_key(sparse)) == 64  # under a raised limit it is read
        with pytest.raises(images.ImageTooLargeError, match="limit of 100 bytes"):
            images.image_content_key(sparse, max_bytes=100)
    finally:
        images.set_max_image_bytes(256 * 2**20)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (zero, "a character device")):
        for fn in (images.image_content_key, load_image, images.check_image_file):
            with pytest.raises(ImageError, match=f"{path.name} is not a regular file \\({kind}"):
                fn(path)
    with pytest.raises(images.ImageNotFoundError, match="not found"):
        images.image_content_key(tmp_path / "nothing.png")


def test_an_image_is_hashed_once_per_path_until_it_changes(tmp_path, monkeypatch) -> None:
    """1M records over 300 images: each file is read once per process, not once per record."""
    import hashlib

    from experts import images

    path = tmp_path / "a.png"
    first = hashlib.sha256(_png_head(path)).hexdigest()
    hashed: list[int] = []
    real = hashlib.sha256
    monkeypatch.setattr(images.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert [images.image_content_key(path) for _ in range(1000)] == [first] * 1000
    assert len(hashed) == 1
    Image.new("RGB", (5, 5)).save(path)  # new bytes, new size: hashed again
    assert images.image_content_key(path) == real(path.read_bytes()).hexdigest() != first
    assert len(hashed) == 2


def test_symlink_leaving_the_image_root_is_refused(tmp_path) -> None:
    from moe_vision.data.records import RecordProblem
    from moe_vision.data.validation import resolve_image_path

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    _png_head(outside)
    _png_head(root / "sub" / "inside.png")
    (root / "link.png").symlink_to(outside)
    (root / "ok.png").symlink_to(root / "sub" / "inside.png")  # stays inside: followed
    (root / "dir").symlink_to(tmp_path)
    assert resolve_image_path(root, "ok.png") == root / "ok.png"
    for name in ("link.png", "dir/secret.png"):
        with pytest.raises(RecordProblem, match="resolves outside the image root") as err:
            resolve_image_path(root, name)
        assert err.value.kind == "outside_root"
        assert resolve_image_path(root, name, allow_outside_root=True) == root / name


@pytest.mark.timeout(120)
def test_data_check_and_training_data_call_a_fifo_not_a_regular_file(tmp_path) -> None:
    """`data check` said "missing" for a FIFO, and training hung on it; both name it now."""
    import json
    import os

    import experts
    from moe_vision.data.check import check_files
    from moe_vision.data.llava import LlavaDataset
    from moe_vision.data.validation import RecordValidator
    from moe_vision.model.llm import build_tokenizer

    root = tmp_path / "images"
    root.mkdir()
    _png_head(root / "good.png")
    os.mkfifo(root / "pipe.png")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": n, "image": f"{n}.png", "conversations": conv} for n in ("pipe", "good")]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    tokenizer = build_tokenizer()
    report = check_files([data], root, RecordValidator(tokenizer, num_visual_tokens=4), workers=0)
    assert "missing_image" not in report["problems"]
    (example,) = report["problems"]["corrupt_image"]["examples"]
    assert "pipe.png is not a regular file (a FIFO" in example["problem"]
    pre = [experts.create_expert("clip-tiny").preprocessor]
    ds = LlavaDataset(data, root, pre, tokenizer, num_visual_tokens=4, on_bad_record="skip")
    assert ds[0]["id"] == "good"  # the FIFO's record skipped, not waited on
    assert "not a regular file" in ds.skipped[0].reason


# ---------------------------------------------------------------------------- EXIF orientation
def test_exif_orientation_is_applied_where_images_enter(tmp_path) -> None:
    """A portrait photo stored as a landscape JPEG with orientation 6 ("rotate 90 clockwise to
    display") is read upright: 40 wide, 60 high, the stored left half (white) at the top."""
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255
    stored = Image.fromarray(arr)
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (60, 40)  # what a reader that ignores EXIF sees
        from_pil = np.asarray(load_image(raw))
    for out in (np.asarray(load_image(path)), from_pil):
        assert out.shape == (60, 40, 3)
        assert out[:28].mean() > 240 and out[32:].mean() < 15
    upright = load_image(path)
    assert load_image(upright).size == (40, 60)  # applied once, not again
