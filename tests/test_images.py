"""Reading images: every format and mode becomes the same RGB image; bad files name themselves."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchproto import images
from patchproto.images import ImageError, is_image_file, list_images, load_image, load_mask


def _reference(width: int = 40, height: int = 30) -> Image.Image:
    """A smooth RGB image with one red quadrant, so orientation mistakes show (JPEG-friendly)."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [xs * 255 // width, ys * 255 // height, (xs + ys) * 127 // (width + height)], -1
    )
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("suffix", "fmt", "lossless"),
    [(".png", "PNG", True), (".bmp", "BMP", True), (".tif", "TIFF", True), (".jpg", "JPEG", False)],
)
def test_formats_load_as_the_same_rgb_image(tmp_path: Path, suffix, fmt, lossless) -> None:
    original = _reference()
    path = tmp_path / f"part{suffix}"
    original.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.size == original.size
    difference = np.abs(np.asarray(loaded, int) - np.asarray(original, int))
    assert difference.max() == 0 if lossless else difference.mean() < 12


def test_bytes_and_path_give_the_same_image(tmp_path: Path) -> None:
    path = tmp_path / "part.png"
    _reference().save(path)
    from_bytes = load_image(path.read_bytes(), name="upload.png")
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = _reference().convert("L")
    path = tmp_path / "gray.jpg"
    gray.save(path, quality=100)

    loaded = np.asarray(load_image(path), int)

    assert loaded.shape == (30, 40, 3)
    assert np.array_equal(loaded[..., 0], loaded[..., 1])
    assert np.array_equal(loaded[..., 1], loaded[..., 2])
    assert np.abs(loaded[..., 0] - np.asarray(gray, int)).mean() < 3


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[:, :10] = (10, 20, 30, 255)  # opaque left half
    rgba[:, 10:] = (10, 20, 30, 0)  # transparent right half
    path = tmp_path / "shot.png"
    Image.fromarray(rgba).save(path)

    loaded = np.asarray(load_image(path))

    assert loaded.shape == (10, 20, 3)
    assert (loaded[:, :10] == (10, 20, 30)).all()
    assert (loaded[:, 10:] == 255).all()


def test_sixteen_bit_is_rescaled_to_the_full_eight_bit_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(1000, 61000, 32).astype(np.uint16), (8, 1))
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")

    loaded = np.asarray(load_image(path), int)

    assert loaded.shape == (8, 32, 3)
    assert loaded[..., 0].min() == 0
    assert loaded[..., 0].max() == 255
    assert (np.diff(loaded[0, :, 0]) >= 0).all()


def test_palette_image_keeps_its_colours(tmp_path: Path) -> None:
    palette = _reference().quantize(colors=16)
    path = tmp_path / "palette.png"
    palette.save(path)
    assert Image.open(path).mode == "P"

    loaded = load_image(path)

    assert np.array_equal(np.asarray(loaded), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation, transpose) -> None:
    stored = _reference()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=100, exif=exif)

    loaded = load_image(path)
    expected = stored.transpose(transpose)

    assert loaded.size == expected.size
    difference = np.abs(np.asarray(loaded, int) - np.asarray(expected, int))
    assert difference.mean() < 12


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header then claims ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = io.BytesIO()
    _reference(200, 150).save(good, format="PNG")
    files = {
        "corrupt": (tmp_path / "corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        "truncated": (tmp_path / "truncated.png", good.getvalue()[: len(good.getvalue()) // 2]),
        "empty": (tmp_path / "empty.jpg", b""),
        "not an image": (tmp_path / "notes.png", b"this is a text file, not a picture\n"),
        "bomb header": (tmp_path / "bomb.png", _png_with_header_size(100_000, 100_000)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    paths = {name: path for name, (path, _) in files.items()}
    paths["folder"] = tmp_path / "folder.png"
    paths["folder"].mkdir()
    paths["missing"] = tmp_path / "missing.png"
    return paths


@pytest.mark.parametrize(
    "kind", ["corrupt", "truncated", "empty", "not an image", "bomb header", "folder", "missing"]
)
def test_unusable_files_raise_image_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]

    with pytest.raises(ImageError) as caught:
        load_image(path)

    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    assert caught.value.fix  # every error says what to do


def test_bad_bytes_are_named_after_the_upload() -> None:
    with pytest.raises(ImageError, match="upload.jpg"):
        load_image(b"garbage", name="upload.jpg")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", name="upload.jpg")


def test_image_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    # A real 1-bit image just over the limit: small on disk, huge once decoded.
    side = int(np.ceil(np.sqrt(images.MAX_PIXELS + 1)))
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)
    assert path.stat().st_size < 1_000_000

    with pytest.raises(ImageError, match="over the limit") as caught:
        load_image(path)
    assert str(path) in str(caught.value)


def test_pixel_limit_is_the_module_setting(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "small.png"
    _reference().save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 40 * 30 - 1)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 40 * 30)
    assert load_image(path).size == (40, 30)


def test_mask_is_boolean_and_resized_with_nearest_neighbour(tmp_path: Path) -> None:
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[:15, :20] = 255
    mask[20, 30] = 1  # any non-zero value is defect
    path = tmp_path / "a_mask.png"
    Image.fromarray(mask).save(path)

    full = load_mask(path)
    half = load_mask(path, (20, 15))

    assert full.dtype == bool
    assert full.shape == (30, 40)
    assert full.sum() == 15 * 20 + 1
    assert half.shape == (15, 20)
    assert set(np.unique(half)) <= {False, True}
    assert half[:7, :10].all()
    assert not half[8:, :].any() or half[8:, :].sum() <= 1


def test_list_images_sorts_and_skips_non_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.tiff", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()

    listed = [p.name for p in list_images(tmp_path)]

    assert listed == ["a.jpg", "b.PNG", "c.tiff"]
    assert not is_image_file(tmp_path / "sub.png")
