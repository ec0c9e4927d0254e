"""Pictures of anomaly maps: a heatmap blended over the image, with masks and boxes drawn on it.

The heatmap is drawn at the image's own size and orientation, so an anomaly map computed on the
square network input lines up with the original (non-square) photograph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation, binary_erosion

logger = logging.getLogger(__name__)

HEATMAP_ALPHA = 0.5
HEATMAP_COLORMAP = "jet"
MASK_COLOUR = (0, 255, 0)
BOX_COLOUR = (255, 255, 255)


def normalise_heatmap(
    heatmap: np.ndarray, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Map anomaly scores to ``[0, 1]``.

    Args:
        heatmap: ``(h, w)`` anomaly scores (any real values).
        value_range: ``(low, high)``; scores at or below ``low`` become 0 and at or above
            ``high`` become 1, linearly in between. Share one range across images to compare
            them. ``None`` stretches this heatmap's own minimum to 0 and maximum to 1 (a flat
            heatmap becomes all 0).

    Example:
        >>> normalise_heatmap(np.array([[1.0, 3.0]])).tolist()
        [[0.0, 1.0]]
        >>> normalise_heatmap(np.array([[1.0, 3.0]]), (0.0, 2.0)).tolist()
        [[0.5, 1.0]]
    """
    values = np.asarray(heatmap, dtype=np.float64)
    low, high = value_range if value_range is not None else (values.min(), values.max())
    if not high > low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float map to ``size`` = (width, height) bilinearly."""
    if (values.shape[1], values.shape[0]) == size:
        return values
    image = Image.fromarray(values.astype(np.float32))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float64)


def _contour(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """The boundary pixels of a boolean mask, ``thickness`` pixels wide."""
    inner = binary_erosion(mask, iterations=1, border_value=0)
    edge = mask & ~inner
    return binary_dilation(edge, iterations=thickness - 1) if thickness > 1 else edge


def overlay_heatmap(
    image: Image.Image,
    heatmap: np.ndarray,
    mask: np.ndarray | None = None,
    boxes: Sequence[tuple[float, float, float, float]] | None = None,
    value_range: tuple[float, float] | None = None,
    alpha: float = HEATMAP_ALPHA,
) -> Image.Image:
    """Blend a coloured anomaly heatmap over an image, with a mask contour and boxes on top.

    The heatmap is normalised with :func:`normalise_heatmap` (per image min-max unless
    ``value_range`` is given), resized bilinearly to the image size if its shape differs,
    coloured with the ``jet`` colour map (blue low, red high) and blended with weight ``alpha``.

    Args:
        image: The picture, any mode (converted to RGB).
        heatmap: ``(h, w)`` anomaly scores, e.g. from :func:`patchproto.patchcore.anomaly_map`.
        mask: Optional boolean ground-truth mask, resized with nearest neighbour if needed;
            its outline is drawn in green.
        boxes: Optional ``(x0, y0, x1, y1)`` rectangles in image pixels, drawn in white.
        value_range: ``(low, high)`` scores for the ends of the colour map; see
            :func:`normalise_heatmap`.
        alpha: Weight of the heatmap in the blend, in ``[0, 1]``.

    Returns:
        A new RGB image of the same size as ``image``.

    Example:
        >>> picture = Image.new("L", (40, 30), 128)
        >>> overlay_heatmap(picture, np.random.rand(8, 8)).size
        (40, 30)
    """
    if np.ndim(heatmap) != 2:
        msg = f"heatmap must be a 2-D array, got shape {np.shape(heatmap)}"
        raise ValueError(msg)
    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha {alpha} must be in [0, 1]"
        raise ValueError(msg)
    base = image.convert("RGB")
    levels = normalise_heatmap(_resize_map(np.asarray(heatmap), base.size), value_range)

    colours = colormaps[HEATMAP_COLORMAP](levels)[..., :3]
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float64) + alpha * 255.0 * colours
    pixels = blended.round().clip(0, 255).astype(np.uint8)

    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if (mask.shape[1], mask.shape[0]) != base.size:
            resized = Image.fromarray(mask).resize(base.size, Image.Resampling.NEAREST)
            mask = np.asarray(resized, dtype=bool)
        pixels[_contour(mask)] = MASK_COLOUR

    result = Image.fromarray(pixels)
    if boxes:
        draw = ImageDraw.Draw(result)
        for box in boxes:
            draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=2)
    return result


def side_by_side(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Place images left to right on a white strip, top-aligned."""
    if not images:
        raise ValueError("no images to place side by side")
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    height = max(image.height for image in images)
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for image in images:
        strip.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return strip
