"""Heatmap overlays: normalisation, resizing, mask outlines and boxes."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from patchproto.visualize import (
    BOX_COLOUR,
    MASK_COLOUR,
    normalise_heatmap,
    overlay_heatmap,
    side_by_side,
)


def test_normalisation_per_image_and_with_a_shared_range() -> None:
    heatmap = np.array([[2.0, 4.0], [6.0, 10.0]])

    assert normalise_heatmap(heatmap).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert normalise_heatmap(heatmap, (4.0, 8.0)).tolist() == [[0.0, 0.0], [0.5, 1.0]]
    assert normalise_heatmap(np.full((2, 2), 3.0)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_overlay_blends_the_colour_map_at_the_image_size() -> None:
    image = Image.new("L", (40, 20), 100)
    heatmap = np.zeros((5, 10))
    heatmap[:, 5:] = 1.0  # right half hot

    overlay = np.asarray(overlay_heatmap(image, heatmap, alpha=0.5), dtype=float)

    assert overlay.shape == (20, 40, 3)
    cold = 0.5 * 100 + 0.5 * 255 * np.array(colormaps["jet"](0.0)[:3])
    hot = 0.5 * 100 + 0.5 * 255 * np.array(colormaps["jet"](1.0)[:3])
    np.testing.assert_allclose(overlay[10, 2], cold, atol=1)
    np.testing.assert_allclose(overlay[10, 37], hot, atol=1)


def test_alpha_zero_keeps_the_image() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))

    overlay = overlay_heatmap(image, rng.random((3, 4)), alpha=0.0)

    assert np.array_equal(np.asarray(overlay), np.asarray(image))


def test_mask_outline_and_boxes_are_drawn() -> None:
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    mask = np.zeros((16, 16), dtype=bool)  # half resolution: resized to the image
    mask[4:12, 4:12] = True

    pixels = np.asarray(
        overlay_heatmap(image, np.zeros((4, 4)), mask=mask, boxes=[(0, 0, 31, 31)], alpha=0.0)
    )

    assert tuple(pixels[8, 16]) == MASK_COLOUR  # on the outline
    assert tuple(pixels[16, 16]) == (0, 0, 0)  # inside the mask
    assert tuple(pixels[2, 16]) == (0, 0, 0)  # outside it
    assert tuple(pixels[0, 16]) == BOX_COLOUR
    assert tuple(pixels[16, 31]) == BOX_COLOUR


def test_bad_arguments_are_refused() -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="2-D"):
        overlay_heatmap(image, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, np.zeros((2, 2)), alpha=1.5)


def test_side_by_side() -> None:
    strip = side_by_side([Image.new("RGB", (10, 5), (1, 2, 3)), Image.new("L", (6, 8), 9)], gap=2)

    assert strip.size == (18, 8)
    assert strip.getpixel((0, 0)) == (1, 2, 3)
    assert strip.getpixel((11, 0)) == (255, 255, 255)
    assert strip.getpixel((12, 7)) == (9, 9, 9)
