"""SimpleShot: nearest class centroid of centred, L2-normalised features.

Wang, Chao, Weinberger and van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor
Classification for Few-Shot Learning" (2019): features are centred by subtracting a mean
feature, scaled to unit length ("CL2N"), and a query goes to the class whose centroid of
transformed support features is nearest in Euclidean distance.

Two choices the paper leaves open:

- SimpleShot subtracts the mean feature of the base-training classes. Without meta-training
  there is no base set, so the mean of the episode's support features stands in for it; queries
  are centred by the same vector.
- The mean of unit vectors lies inside the unit ball, shorter the more a class's support
  images differ; the Euclidean distance to such a centroid favours diverse classes. The centroid
  is therefore scaled back to unit length (the mean direction), which makes the Euclidean
  distance ``sqrt(2 - 2 cos)``: the ranking is that of the cosine to the class centroid, as in
  easyfsl's SimpleShot. With one shot both readings agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from patchproto.methods.base import FewShotMethod, ImageFeatures, check_support
from patchproto.methods.protonet import class_means, stack_pooled


class SimpleShot(FewShotMethod):
    """Nearest class direction after centring on the support mean and L2 normalisation (CL2N).

    Example:
        >>> def image(key, x):
        ...     none = torch.zeros(1, 1)
        ...     return ImageFeatures(key, none, (1, 1), torch.zeros(1), torch.tensor(x))
        >>> method = SimpleShot().fit([image("a", [1.0, 0]), image("b", [0.0, 1])], [0, 1])
        >>> method.predict([image("q", [0.2, 0.9])]).labels.tolist()
        [1]
    """

    name = "simpleshot"

    def __init__(self) -> None:
        self.center = torch.zeros(0)
        self.centroids = torch.zeros(0, 0)

    def __repr__(self) -> str:
        return "SimpleShot()"

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Centre on the support mean and scale to unit length (CL2N)."""
        return F.normalize(features.double() - self.center, dim=1)

    def fit(self, support: Sequence[ImageFeatures], labels: Sequence[int]) -> SimpleShot:
        """Centre on the support mean, normalise, and take each class's mean direction."""
        ways = check_support(support, labels)
        features = stack_pooled(support).double()
        self.center = features.mean(dim=0)
        means = class_means(self.transform(features), torch.as_tensor(list(labels)), ways)
        self.centroids = F.normalize(means, dim=1)
        return self

    def distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` Euclidean distance from each transformed query to each centroid."""
        if self.centroids.numel() == 0:
            raise RuntimeError("SimpleShot has no support set: call fit() first")
        if not queries:
            return torch.zeros(0, len(self.centroids))
        return torch.cdist(self.transform(stack_pooled(queries)), self.centroids).float()
