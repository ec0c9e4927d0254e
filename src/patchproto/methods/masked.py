"""Prototypical networks on masked images, the baselines of the paper's ablation.

Wang and Zhuo, "PatchProto Networks for Few-shot Visual Anomaly Classification", Section 4.3
and Figure 2: before the backbone sees them, support and query images are masked to their
defect, either by the PatchCore segmentation ("Segmentation + Proto") or by the ground-truth
mask; everything outside the mask is painted white, as the figure shows. Prototypical networks
then classify the pooled features of the masked images. An all-white support image, added as
an extra class, shows that these features still describe the whole (mostly white) image.

This module holds the two methods and the image helpers that prepare their features.

Choosing the segmentation threshold: a PatchCore anomaly map has no natural cut-off. When
normal images are held back from the memory bank, :func:`segmentation_threshold` takes a high
percentile (99 by default) of their anomaly-map pixels, so that about 1% of normal pixels would
be marked; this keeps the threshold on the same scale for every image. When no normal image is
held back, ``threshold=None`` makes :func:`segmentation_mask` cut each map halfway between its
own minimum and maximum. Either way, a mask that would keep less than ``min_fraction`` of the
image (for example a defect scored below the normal threshold) falls back to the image's most
anomalous ``min_fraction`` of pixels: every image classified here is known to be defective, and
an empty mask would turn it into the all-white image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from patchproto.methods.protonet import PrototypicalNetworks

logger = logging.getLogger(__name__)

WHITE = (255, 255, 255)
# Share of normal pixels allowed above the segmentation threshold.
DEFAULT_NORMAL_PERCENTILE = 99.0
# Without normal images held back: cut each map at this point between its minimum and maximum.
DEFAULT_RELATIVE_LEVEL = 0.5
# A mask never keeps less than this share of the image.
DEFAULT_MIN_FRACTION = 0.01


class SegmentationProto(PrototypicalNetworks):
    """Prototypical networks on images masked by their PatchCore segmentation (Section 4.3).

    Reads :attr:`ImageFeatures.seg_pooled`, the pooled features of the masked image.
    """

    name = "seg_proto"
    field = "seg_pooled"


class GroundTruthProto(PrototypicalNetworks):
    """Prototypical networks on images masked by their ground-truth defect mask (Section 4.3).

    Reads :attr:`ImageFeatures.gt_pooled`, the pooled features of the masked image.
    """

    name = "gt_proto"
    field = "gt_pooled"


def _as_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean ``(height, width)`` mask for an image of PIL ``size`` = (width, height)."""
    array = np.asarray(mask)
    if array.ndim != 2:
        msg = f"mask must be 2-D (height, width), got shape {array.shape}"
        raise ValueError(msg)
    array = array > 0 if array.dtype != bool else array
    width, height = size
    if array.shape != (height, width):
        logger.debug("Resizing a %s mask to the image's %dx%d", array.shape, height, width)
        resized = Image.fromarray(array.astype(np.uint8) * 255).resize(
            (width, height), Image.Resampling.NEAREST
        )
        array = np.asarray(resized) > 127
    return array


def mask_image(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Paint every pixel outside ``mask`` white (Figure 2 of the paper).

    Args:
        image: Any PIL image; the result is RGB of the same size.
        mask: ``(height, width)`` array, true (or non-zero) where the defect is. A mask of
            another size is resized to the image with nearest-neighbour sampling.

    Returns:
        A new RGB image; an empty mask gives an all-white image.

    Example:
        >>> out = mask_image(Image.new("RGB", (2, 1), (0, 0, 0)), np.array([[True, False]]))
        >>> out.getpixel((0, 0)), out.getpixel((1, 0))
        ((0, 0, 0), (255, 255, 255))
    """
    keep = _as_mask(mask, image.size)
    pixels = np.array(image.convert("RGB"))
    pixels[~keep] = WHITE
    return Image.fromarray(pixels)


def white_image(size: tuple[int, int]) -> Image.Image:
    """An all-white RGB image of PIL ``size`` = (width, height): the ablation's extra class."""
    width, height = size
    if width < 1 or height < 1:
        msg = f"image size {size} must be positive (width, height)"
        raise ValueError(msg)
    return Image.new("RGB", (int(width), int(height)), WHITE)


def segmentation_threshold(
    normal_maps: Sequence[np.ndarray], percentile: float = DEFAULT_NORMAL_PERCENTILE
) -> float:
    """A threshold from the anomaly maps of normal images held back from the memory bank.

    Args:
        normal_maps: Anomaly maps (any sizes) of normal images that are not in the memory bank.
        percentile: Percentile of their pixel scores, in ``(0, 100]``.

    Raises:
        ValueError: No map given, or ``percentile`` out of range.

    Example:
        >>> segmentation_threshold([np.arange(101, dtype=float).reshape(1, -1)], 99.0)
        99.0
    """
    if not 0.0 < percentile <= 100.0:
        msg = f"percentile={percentile} must be in (0, 100]"
        raise ValueError(msg)
    if len(normal_maps) == 0:
        msg = "no normal anomaly maps to set a threshold from; pass threshold=None instead"
        raise ValueError(msg)
    pixels = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in normal_maps])
    return float(np.percentile(pixels, percentile))


def segmentation_mask(
    anomaly_map: np.ndarray,
    threshold: float | None,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> np.ndarray:
    """The pixels of an anomaly map above a threshold, as a boolean mask.

    Args:
        anomaly_map: ``(height, width)`` pixel anomaly scores, as from
            :func:`patchproto.patchcore.anomaly_map`.
        threshold: From :func:`segmentation_threshold`; ``None`` cuts the map halfway between its
            own minimum and maximum.
        min_fraction: The least share of pixels kept; below it, the most anomalous
            ``min_fraction`` of the pixels are kept instead. 0 disables the fallback.

    Returns:
        A boolean array of the map's shape.

    Example:
        >>> segmentation_mask(np.array([[0.0, 1.0], [2.0, 3.0]]), 1.5).tolist()
        [[False, False], [True, True]]
    """
    scores = np.asarray(anomaly_map, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        msg = f"anomaly map must be a non-empty 2-D array, got shape {scores.shape}"
        raise ValueError(msg)
    if not 0.0 <= min_fraction <= 1.0:
        msg = f"min_fraction={min_fraction} must be in [0, 1]"
        raise ValueError(msg)
    if threshold is None:
        low, high = float(scores.min()), float(scores.max())
        threshold = low + DEFAULT_RELATIVE_LEVEL * (high - low)
        mask = scores >= threshold if high > low else np.ones_like(scores, dtype=bool)
    else:
        mask = scores > threshold

    least = int(np.ceil(min_fraction * scores.size))
    if mask.sum() < least:
        logger.debug("Segmentation keeps %d pixels; keeping the top %d instead", mask.sum(), least)
        cut = np.partition(scores.ravel(), scores.size - least)[scores.size - least]
        mask = scores >= cut
    return mask
