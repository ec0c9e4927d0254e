"""The interface every few-shot method shares: give the support set, then classify queries.

A method never sees pixels. It sees :class:`ImageFeatures`, everything computed once per image
(patch embeddings, their anomaly scores, pooled features of the whole and of masked images),
so that every method in an evaluation works from the same cached features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """What the methods may use about one image.

    Attributes:
        key: A stable identifier (the cache key of the image file).
        patches: ``(P, D)`` patch embeddings (see :mod:`patchproto.embedding`).
        grid: The ``(h, w)`` patch grid, ``h * w == P``.
        patch_scores: ``(P,)`` PatchCore anomaly scores of the patches.
        pooled: ``(C,)`` pooled last-stage features of the whole image.
        seg_pooled: Pooled features of the image masked by its PatchCore segmentation.
        gt_pooled: Pooled features of the image masked by its ground-truth mask.
    """

    key: str
    patches: torch.Tensor
    grid: tuple[int, int]
    patch_scores: torch.Tensor
    pooled: torch.Tensor
    seg_pooled: torch.Tensor | None = None
    gt_pooled: torch.Tensor | None = None


@dataclass
class Prediction:
    """Per query: the distance to every class, the winning class and a confidence per class.

    Attributes:
        distances: ``(Q, N)``; lower is nearer.
        labels: ``(Q,)`` index of the nearest class.
        confidences: ``(Q, N)`` softmax of the negative distances.
    """

    distances: torch.Tensor
    labels: torch.Tensor
    confidences: torch.Tensor

    @classmethod
    def from_distances(cls, distances: torch.Tensor) -> Prediction:
        """Nearest class wins; confidence is a softmax over negative distances."""
        distances = distances.float()
        return cls(distances, distances.argmin(dim=1), torch.softmax(-distances, dim=1))


class FewShotMethod(ABC):
    """Base class: ``fit(support, labels)`` once, then ``predict(queries)`` any number of times."""

    name: str = "method"

    @abstractmethod
    def fit(self, support: Sequence[ImageFeatures], labels: Sequence[int]) -> FewShotMethod:
        """Remember the support set; ``labels[i]`` in ``0..N-1`` is the class of ``support[i]``."""

    @abstractmethod
    def distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` distance from each query to each class (lower is nearer)."""

    def predict(self, queries: Sequence[ImageFeatures]) -> Prediction:
        """Classify queries by their distances."""
        return Prediction.from_distances(self.distances(queries))


def check_support(support: Sequence[ImageFeatures], labels: Sequence[int]) -> int:
    """Validate a support set and return the number of classes ``N``.

    Raises:
        ValueError: Sizes differ, the set is empty, or a class in ``0..N-1`` has no example.
    """
    if len(support) != len(labels):
        msg = f"{len(support)} support images but {len(labels)} labels"
        raise ValueError(msg)
    if not support:
        raise ValueError("the support set is empty: give at least one example per class")
    ways = max(labels) + 1
    empty = sorted(set(range(ways)) - set(labels))
    if empty:
        msg = f"classes {empty} have no support example; every class needs at least one"
        raise ValueError(msg)
    return ways
