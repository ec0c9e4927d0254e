"""PatchCore patch embeddings: local neighbourhood aggregation of two mid-level feature maps.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), Section 3.1:
each feature map is averaged over a 3x3 neighbourhood so that a patch sees a little context,
the stride-16 map is upsampled to the stride-8 grid, and the two are concatenated per patch.
An optional channel pooling reduces the embedding to a target dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from patchproto.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone

logger = logging.getLogger(__name__)

# The paper resizes every image to 224 x 224 (Section 4.1).
DEFAULT_IMAGE_SIZE = 224


@dataclass
class Embedding:
    """The embeddings of one image.

    Attributes:
        patches: ``(h * w, D)`` patch embeddings, row-major over the stride-8 grid.
        grid: ``(h, w)``, the stride-8 grid size.
        pooled: ``(C,)`` global average of the backbone's last stage.
    """

    patches: torch.Tensor
    grid: tuple[int, int]
    pooled: torch.Tensor


def to_tensor(image: Image.Image, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Resize an RGB image to ``image_size`` squared and normalise it with ImageNet statistics."""
    resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def aggregate_patches(
    stride8: torch.Tensor, stride16: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """Combine two feature maps into patch embeddings.

    Args:
        stride8: ``(B, C8, h, w)``.
        stride16: ``(B, C16, h', w')``, upsampled to ``(h, w)``.
        dim: Pool the ``C8 + C16`` channels down to this many (no pooling when ``None`` or
            not smaller).

    Returns:
        ``(B, h * w, D)`` patch embeddings.

    Example:
        >>> out = aggregate_patches(torch.ones(2, 4, 8, 8), torch.ones(2, 6, 4, 4))
        >>> tuple(out.shape)
        (2, 64, 10)
    """
    size = stride8.shape[-2:]
    local8 = F.avg_pool2d(stride8, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    local16 = F.avg_pool2d(stride16, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    local16 = F.interpolate(local16, size=size, mode="bilinear", align_corners=False)
    patches = torch.cat([local8, local16], dim=1).flatten(2).transpose(1, 2)

    if dim is not None and dim < patches.shape[-1]:
        batch, count, channels = patches.shape
        pooled = F.adaptive_avg_pool1d(patches.reshape(batch * count, 1, channels), dim)
        patches = pooled.reshape(batch, count, dim)
    return patches.contiguous()


class PatchEmbedder:
    """Turns images into :class:`Embedding` objects with a frozen backbone.

    Args:
        backbone: From :func:`patchproto.backbones.load_backbone`.
        image_size: Side of the square input (224 in the paper).
        dim: Optional target embedding dimension (see :func:`aggregate_patches`).
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        backbone: Backbone,
        image_size: int = DEFAULT_IMAGE_SIZE,
        dim: int | None = None,
        batch_size: int = 16,
    ) -> None:
        if image_size < 32 or image_size % 16:
            msg = f"image_size {image_size} must be a multiple of 16 and at least 32"
            raise ValueError(msg)
        self.backbone, self.image_size, self.dim, self.batch_size = (
            backbone,
            image_size,
            dim,
            batch_size,
        )

    @property
    def key(self) -> str:
        """Identifies everything that changes the embeddings (for the feature cache)."""
        dim = self.dim or "full"
        return f"{self.backbone.name}-{self.backbone.weights_id}-{self.image_size}px-{dim}d"

    @torch.inference_mode()
    def embed(
        self,
        images: Sequence[Image.Image],
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Embedding]:
        """Embed RGB images; ``on_batch(n)`` is called after each batch of ``n`` images."""
        out: list[Embedding] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([to_tensor(image, self.image_size) for image in chunk])
            maps = self.backbone(batch)
            patches = aggregate_patches(maps.stride8, maps.stride16, self.dim)
            grid = (int(maps.stride8.shape[-2]), int(maps.stride8.shape[-1]))
            out.extend(
                Embedding(patches[i].clone(), grid, maps.pooled[i].clone())
                for i in range(len(chunk))
            )
            if on_batch is not None:
                on_batch(len(chunk))
        return out
