"""Reading images and masks from disk, whatever their format, into one consistent form.

Every image becomes 8-bit RGB with its EXIF orientation applied, so that a grayscale JPEG, a
16-bit TIFF, a palette PNG and an RGBA screenshot of the same part give the same tensor.
Masks become boolean arrays. Anything Pillow cannot read raises :class:`ImageError`, whose
message names the file and says what to do.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# Pillow's own guard is a warning at 89 MP and an error at twice that; an image this large is
# either a mistake or an attack, so both cases become a clear error here.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image or mask that cannot be used, with the file and the fix in the message."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}. {fix}")


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a regular file with an image suffix (hidden files excluded)."""
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name for reproducibility."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _open(source: str | Path | bytes, name: str) -> Image.Image:
    """Open and fully decode an image, turning every failure into an :class:`ImageError`."""
    if isinstance(source, bytes | bytearray):
        if len(source) == 0:
            raise ImageError(name, "the file is empty", "Upload or copy the image again")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(name, "no such file", "Check the path")
        if path.is_dir():
            raise ImageError(name, "this is a folder, not an image", "Give an image file")
        if path.stat().st_size == 0:
            raise ImageError(name, "the file is empty", "Copy the image again from its source")
        stream = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    name,
                    f"the image is {width} x {height} pixels, over the limit of {MAX_PIXELS:,}",
                    "Downscale it before use (defect classification runs at 224 pixels)",
                )
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            name, f"the image is too large to decode safely ({error})", "Downscale it before use"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageError(
            name,
            "not an image Pillow can read",
            "Give a PNG, JPEG, BMP, TIFF or WebP file, or remove this file from the folder",
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            name,
            f"the image is corrupt or truncated ({error})",
            "Copy the image again from its source, or remove it from the folder",
        ) from error
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; 16-bit and float images are rescaled to 0-255."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        values = ((values - low) * scale).round().astype(np.uint8)
        image = Image.fromarray(values, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # NOTE: transparent pixels are composited onto white; a part photographed against a
        # transparent background then looks like one photographed against a white one.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Read an image as 8-bit RGB with EXIF orientation applied.

    Args:
        source: A path, or the raw bytes of an uploaded file.
        name: What to call the image in error messages (defaults to the path).

    Returns:
        The decoded image in mode ``"RGB"``.

    Raises:
        ImageError: The file is missing, empty, corrupt, truncated, not an image or too large.

    Example:
        >>> from PIL import Image
        >>> import io
        >>> buffer = io.BytesIO()
        >>> Image.new("L", (4, 3), 128).save(buffer, format="PNG")
        >>> load_image(buffer.getvalue(), name="upload.png").mode
        'RGB'
    """
    label = name or str(source)
    return _to_rgb(_open(source, label))


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a boolean array (non-zero pixels are defect).

    Args:
        path: A mask image, usually ``<stem>_mask.png``.
        size: ``(width, height)`` to resize to with nearest-neighbour sampling, if given.
    """
    image = ImageOps.exif_transpose(_open(path, str(path))).convert("L")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.NEAREST)
    return np.asarray(image) > 0
