"""Patch embeddings: neighbourhood aggregation, upsampling, channel pooling and the embedder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchproto.backbones import IMAGENET_MEAN, IMAGENET_STD
from patchproto.embedding import PatchEmbedder, aggregate_patches, to_tensor


def _local_mean(values: np.ndarray) -> np.ndarray:
    """Mean over each 3x3 neighbourhood that lies inside the map, written out by hand."""
    channels, height, width = values.shape
    out = np.zeros_like(values)
    for i in range(height):
        for j in range(width):
            window = values[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            out[:, i, j] = window.reshape(channels, -1).mean(axis=1)
    return out


def _bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize sampling pixel centres (half-pixel offsets, edges clamped)."""
    _, in_h, in_w = values.shape
    out = np.zeros((values.shape[0], height, width))
    for i in range(height):
        for j in range(width):
            y = max((i + 0.5) * in_h / height - 0.5, 0.0)
            x = max((j + 0.5) * in_w / width - 0.5, 0.0)
            y0, x0 = min(int(y), in_h - 1), min(int(x), in_w - 1)
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            dy, dx = y - y0, x - x0
            out[:, i, j] = (
                values[:, y0, x0] * (1 - dy) * (1 - dx)
                + values[:, y0, x1] * (1 - dy) * dx
                + values[:, y1, x0] * dy * (1 - dx)
                + values[:, y1, x1] * dy * dx
            )
    return out


def test_neighbourhood_mean_on_a_three_by_three_map() -> None:
    stride8 = torch.arange(9.0).reshape(1, 1, 3, 3)
    stride16 = torch.full((1, 1, 2, 2), 7.0)

    patches = aggregate_patches(stride8, stride16)

    # Corner: mean of 0, 1, 3, 4. Edge: mean of 0..5. Centre: mean of 0..8.
    assert patches.shape == (1, 9, 2)
    assert patches[0, :, 0].tolist() == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]
    assert patches[0, :, 1].tolist() == [7.0] * 9


def test_aggregation_matches_a_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    stride8 = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    stride16 = torch.randn(2, 2, 2, 3, generator=generator, dtype=torch.float64)

    patches = aggregate_patches(stride8, stride16)

    assert patches.shape == (2, 4 * 5, 5)
    for b in range(2):
        local8 = _local_mean(stride8[b].numpy())
        local16 = _bilinear(_local_mean(stride16[b].numpy()), 4, 5)
        expected = np.concatenate([local8, local16]).reshape(5, -1).T  # row-major patches
        np.testing.assert_allclose(patches[b].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_dim_pooling_averages_neighbouring_channels() -> None:
    stride8 = torch.arange(4.0).reshape(1, 4, 1, 1)
    stride16 = torch.arange(4.0, 6.0).reshape(1, 2, 1, 1)  # channels 0..5 in all

    assert aggregate_patches(stride8, stride16, dim=3)[0, 0].tolist() == [0.5, 2.5, 4.5]
    assert aggregate_patches(stride8, stride16, dim=6)[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert aggregate_patches(stride8, stride16, dim=64)[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert aggregate_patches(stride8, stride16, dim=None).shape == (1, 1, 6)


def test_dim_pooling_with_uneven_bins() -> None:
    stride8 = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
    stride16 = torch.tensor([8.0, 16.0]).reshape(1, 2, 1, 1)

    pooled = aggregate_patches(stride8, stride16, dim=2)[0, 0]

    # Five channels into two bins: channels 0-2 and 2-4 (the middle one is shared).
    assert pooled.tolist() == pytest.approx([7.0 / 3.0, 28.0 / 3.0])


def test_to_tensor_resizes_and_normalises() -> None:
    white = Image.new("RGB", (50, 30), (255, 255, 255))

    tensor = to_tensor(white, 64)

    assert tensor.shape == (3, 64, 64)
    for channel in range(3):
        expected = (1.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert torch.allclose(tensor[channel], torch.tensor(expected), atol=1e-6)


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(count)
    ]


def test_embedder_shapes_and_batching(random_backbone) -> None:
    images = _images(5)
    calls: list[int] = []

    whole = PatchEmbedder(random_backbone, image_size=64, batch_size=8).embed(images)
    split = PatchEmbedder(random_backbone, image_size=64, batch_size=2).embed(images, calls.append)

    assert calls == [2, 2, 1]
    assert len(whole) == 5
    assert whole[0].grid == (8, 8)
    assert tuple(whole[0].patches.shape) == (64, 128 + 256)
    assert tuple(whole[0].pooled.shape) == (512,)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a.patches, b.patches, rtol=1e-5, atol=1e-5)


def test_embedder_dim_and_key(random_backbone) -> None:
    embedder = PatchEmbedder(random_backbone, image_size=96, dim=100)

    embedding = embedder.embed(_images(1))[0]

    assert embedding.grid == (12, 12)
    assert tuple(embedding.patches.shape) == (144, 100)
    assert embedder.key == "resnet18-random-init-96px-100d"
    assert PatchEmbedder(random_backbone).key == "resnet18-random-init-224px-fulld"


@pytest.mark.parametrize("size", [16, 100, 0])
def test_embedder_refuses_bad_image_sizes(random_backbone, size: int) -> None:
    with pytest.raises(ValueError, match=str(size)):
        PatchEmbedder(random_backbone, image_size=size)
