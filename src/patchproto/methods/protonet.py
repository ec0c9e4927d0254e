"""Prototypical networks on pooled image features.

Snell, Swersky and Zemel, "Prototypical Networks for Few-shot Learning" (NeurIPS 2017): a class
prototype is the mean of its support images' features, and a query belongs to the class whose
prototype is nearest. Here the features are the globally pooled last stage of a pretrained
backbone; there is no meta-training, because industrial defect data have too few classes for it.

The distance is the squared Euclidean distance of Snell et al. (Equation 2), so the confidences
``softmax(-d)`` are the class probabilities of their model. Ranking by the plain Euclidean
distance, as some implementations do, gives the same nearest class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from patchproto.methods.base import FewShotMethod, ImageFeatures, check_support

# Which ImageFeatures field each image-level method reads, with how to get it when it is missing.
_FIELD_HELP = {
    "pooled": "embed the image with a backbone first",
    "seg_pooled": "prepare the features with segmentation-masked images (see methods.masked)",
    "gt_pooled": "prepare the features with ground-truth-masked images; it needs a mask per image",
}


def stack_pooled(images: Sequence[ImageFeatures], field: str = "pooled") -> torch.Tensor:
    """Stack one pooled feature vector per image into a ``(n, C)`` float tensor.

    Args:
        images: The images.
        field: ``pooled``, ``seg_pooled`` or ``gt_pooled``.

    Raises:
        ValueError: An image lacks the field, or the vectors differ in size.
    """
    if field not in _FIELD_HELP:
        msg = f"unknown feature field {field!r}; choose one of {sorted(_FIELD_HELP)}"
        raise ValueError(msg)
    vectors = []
    for image in images:
        vector = getattr(image, field)
        if vector is None:
            msg = f"image {image.key!r} has no {field} features: {_FIELD_HELP[field]}"
            raise ValueError(msg)
        vectors.append(vector.reshape(-1).float())
    if not vectors:
        return torch.zeros(0, 0)
    sizes = sorted({len(v) for v in vectors})
    if len(sizes) > 1:
        msg = f"{field} features differ in size {sizes}; embed all images with the same backbone"
        raise ValueError(msg)
    return torch.stack(vectors)


def class_means(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """``(N, C)`` mean feature of each class's support images."""
    one_hot = F.one_hot(labels, ways).to(features.dtype)
    return (one_hot / one_hot.sum(dim=0, keepdim=True)).T @ features


class PrototypicalNetworks(FewShotMethod):
    """Nearest class mean of pooled features under the squared Euclidean distance.

    Example:
        >>> def image(key, x):
        ...     none = torch.zeros(1, 1)
        ...     return ImageFeatures(key, none, (1, 1), torch.zeros(1), torch.tensor(x))
        >>> support = [image("a", [0.0, 0]), image("b", [5.0, 5])]
        >>> method = PrototypicalNetworks().fit(support, [0, 1])
        >>> method.predict([image("q", [4.0, 4])]).labels.tolist()
        [1]
    """

    name = "protonet"
    #: The ImageFeatures field this method classifies.
    field = "pooled"

    def __init__(self) -> None:
        self.prototypes = torch.zeros(0, 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def fit(self, support: Sequence[ImageFeatures], labels: Sequence[int]) -> PrototypicalNetworks:
        """Average the support features of each class into its prototype."""
        ways = check_support(support, labels)
        features = stack_pooled(support, self.field)
        self.prototypes = class_means(features, torch.as_tensor(list(labels)), ways)
        return self

    def distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` squared Euclidean distance from each query to each prototype."""
        if self.prototypes.numel() == 0:
            msg = f"{type(self).__name__} has no support set: call fit() first"
            raise RuntimeError(msg)
        if not queries:
            return torch.zeros(0, len(self.prototypes))
        features = stack_pooled(queries, self.field)
        return torch.cdist(features.double(), self.prototypes.double()).pow(2).float()
