"""PatchCore anomaly scoring: a memory bank of normal patch embeddings and nearest neighbours.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), Section 3:
the patch embeddings of normal images, subsampled by a greedy coreset, form the memory bank.
A patch's anomaly score is the distance to its nearest neighbour in the bank; an image's score
is its highest patch score; the anomaly map is the patch scores upsampled to the image and
smoothed with a Gaussian (sigma 4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import faiss
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from patchproto.coreset import DEFAULT_PROJECTION_DIM, coreset_size, greedy_coreset

logger = logging.getLogger(__name__)

# PatchCore keeps 1% to 25% of the patches; 10% is its usual setting for MVTec AD.
DEFAULT_CORESET_RATIO = 0.1
# Gaussian smoothing of the anomaly map (Roth et al., Section 4.2).
MAP_SIGMA = 4.0
# How patch scores are normalised before Algorithm 2 reads them: "none" is the paper (PatchCore's
# distances as they are); "position" standardises each grid position (see PositionNorm).
SCORE_NORMS = ("none", "position")
DEFAULT_SCORE_NORM = "position"
# A position's standard deviation is kept at or above this share of the mean one, so that a
# position that barely varied over few held-back images cannot blow its scores up.
MIN_STD_SHARE = 0.1


class MemoryBank:
    """Normal patch embeddings with exact (or optionally approximate) nearest-neighbour search.

    Args:
        coreset_ratio: Fraction of the normal patches kept (1.0 keeps all).
        approximate: Use an HNSW index instead of exact search (for banks of millions).
        projection_dim: Random projection used only while selecting the coreset.
        seed: Seeds the coreset selection.

    Example:
        >>> bank = MemoryBank(coreset_ratio=1.0).fit(torch.zeros(4, 3))
        >>> bank.patch_scores(torch.tensor([[3.0, 4.0, 0.0]])).tolist()
        [5.0]
    """

    def __init__(
        self,
        coreset_ratio: float = DEFAULT_CORESET_RATIO,
        approximate: bool = False,
        projection_dim: int | None = DEFAULT_PROJECTION_DIM,
        seed: int = 0,
    ) -> None:
        coreset_size(1, coreset_ratio)  # validates the ratio early
        self.coreset_ratio = coreset_ratio
        self.approximate = approximate
        self.projection_dim = projection_dim
        self.seed = seed
        self.embeddings: torch.Tensor | None = None
        self._index: faiss.Index | None = None

    def fit(
        self, patches: torch.Tensor, on_step: Callable[[int], None] | None = None
    ) -> MemoryBank:
        """Build the bank from ``(n, d)`` normal patch embeddings."""
        if patches.ndim != 2 or patches.shape[0] == 0:
            msg = f"need a non-empty (n, d) tensor of normal patches, got {tuple(patches.shape)}"
            raise ValueError(msg)
        count = coreset_size(patches.shape[0], self.coreset_ratio)
        if count < patches.shape[0]:
            chosen = greedy_coreset(patches, count, self.projection_dim, self.seed, on_step)
            patches = patches[chosen]
        return self.load(patches)

    def load(self, embeddings: torch.Tensor) -> MemoryBank:
        """Use ``embeddings`` as the bank as they are (for example a saved bank)."""
        self.embeddings = embeddings.float().contiguous()
        dim = self.embeddings.shape[1]
        if self.approximate:
            index = faiss.IndexHNSWFlat(dim, 32)
            index.hnsw.efSearch = 64
        else:
            index = faiss.IndexFlatL2(dim)
        index.add(self.embeddings.numpy())
        self._index = index
        return self

    def nearest(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, each patch's nearest bank embedding."""
        if self._index is None:
            raise RuntimeError("the memory bank is empty: call fit() or load() first")
        query = np.ascontiguousarray(patches.detach().float().numpy())
        squared, index = self._index.search(query, 1)
        distance = torch.from_numpy(np.sqrt(np.maximum(squared[:, 0], 0.0)))
        return distance, torch.from_numpy(index[:, 0])

    def patch_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Anomaly score per patch: Euclidean distance to the nearest normal embedding."""
        return self.nearest(patches)[0]


def image_score(patch_scores: torch.Tensor) -> float:
    """The image's anomaly score: its highest patch score."""
    return float(patch_scores.max())


def anomaly_map(
    patch_scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Upsample patch scores on ``grid`` to ``size`` = (height, width) and smooth them.

    Example:
        >>> anomaly_map(torch.ones(4), (2, 2), (8, 8)).shape
        (8, 8)
    """
    scores = patch_scores.float().reshape(1, 1, *grid)
    upsampled = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return gaussian_filter(upsampled[0, 0].numpy(), sigma=MAP_SIGMA)


class PositionNorm:
    """Standardise patch scores per grid position by the scores of held-back normal images.

    PatchCore scores the patches at the image border higher than those inside, even on normal
    images (on magnetic_tile with efficientnet_lite2 the normal mean is 29.9 at the corners and
    22.5 inside, and the top patch of 96% of normal images lies on the two-patch border). The
    most anomalous patches of a defective image are then often border patches, not the defect.
    Subtracting each position's normal mean and dividing by its normal standard deviation
    removes that bias; the result reads "how unusual is this patch for this place".

    Args:
        mean: ``(P,)`` mean normal score per position.
        std: ``(P,)`` standard deviation per position (floored, see :data:`MIN_STD_SHARE`).

    Example:
        >>> norm = PositionNorm.from_scores([torch.tensor([1.0, 10.0]), torch.tensor([3.0, 30.0])])
        >>> norm(torch.tensor([2.0, 20.0])).tolist()
        [0.0, 0.0]
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != std.shape or mean.ndim != 1:
            msg = f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must be equal (P,) shapes"
            raise ValueError(msg)
        self.mean = mean.float().contiguous()
        self.std = std.float().contiguous()

    @classmethod
    def from_scores(cls, scores: list[torch.Tensor]) -> PositionNorm:
        """Statistics from the ``(P,)`` patch scores of two or more normal images on one grid.

        Raises:
            ValueError: Fewer than two images, or images on different patch grids.
        """
        if len(scores) < 2 or len({tuple(s.shape) for s in scores}) != 1:
            msg = (
                "position normalisation needs the scores of two or more held-back normal "
                "images embedded at one size"
            )
            raise ValueError(msg)
        stacked = torch.stack([s.float().reshape(-1) for s in scores])
        std = stacked.std(dim=0)
        floor = max(float(std.mean()) * MIN_STD_SHARE, 1e-6)
        return cls(stacked.mean(dim=0), std.clamp_min(floor))

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - mean) / std`` per position, for ``(P,)`` or ``(n, P)`` scores on the grid."""
        if scores.shape[-1:] != self.mean.shape:
            msg = (
                f"patch scores of shape {tuple(scores.shape)}, but the position statistics cover "
                f"{self.mean.shape[0]} positions; embed images at the size they were made with"
            )
            raise ValueError(msg)
        return (scores.float() - self.mean) / self.std
