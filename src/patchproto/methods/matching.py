"""Matching networks without meta-training: a cosine attention kernel over the support set.

Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, "Matching Networks for One Shot
Learning" (NeurIPS 2016), Equations 1 and 2: a query attends to every support image with the
softmax of their cosine similarities, and the probability of a class is the attention summed
over its support images.

The paper's full-context embeddings (LSTMs over the support set) must be meta-trained; with no
base classes to train them on, the embeddings here are the pooled backbone features as they are.
The distance is ``-log p(y | query)``, so the confidences ``softmax(-d)`` equal ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from patchproto.methods.base import FewShotMethod, ImageFeatures, check_support
from patchproto.methods.protonet import stack_pooled


class MatchingNetworks(FewShotMethod):
    """Class probability = softmax attention over support images, by cosine similarity.

    Example:
        >>> def image(key, x):
        ...     none = torch.zeros(1, 1)
        ...     return ImageFeatures(key, none, (1, 1), torch.zeros(1), torch.tensor(x))
        >>> support = [image("a", [1.0, 0]), image("b", [0.0, 1]), image("c", [0.1, 1])]
        >>> method = MatchingNetworks().fit(support, [0, 1, 1])
        >>> method.predict([image("q", [0.3, 1])]).labels.tolist()
        [1]
    """

    name = "matching"

    def __init__(self) -> None:
        self.support_features = torch.zeros(0, 0)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.ways = 0

    def __repr__(self) -> str:
        return "MatchingNetworks()"

    def fit(self, support: Sequence[ImageFeatures], labels: Sequence[int]) -> MatchingNetworks:
        """Keep the unit-length support features and their labels."""
        self.ways = check_support(support, labels)
        self.support_features = F.normalize(stack_pooled(support).double(), dim=1)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        return self

    def log_probabilities(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` log of the attention mass each class receives (Vinyals et al., Eq. 1-2)."""
        if self.support_features.numel() == 0:
            raise RuntimeError("MatchingNetworks has no support set: call fit() first")
        if not queries:
            return torch.zeros(0, self.ways, dtype=torch.float64)
        cosine = F.normalize(stack_pooled(queries).double(), dim=1) @ self.support_features.T
        attention = torch.log_softmax(cosine, dim=1)

        # log sum over each class's support images, computed stably in log space.
        per_class = torch.full((len(cosine), self.ways), float("-inf"), dtype=torch.float64)
        for label in range(self.ways):
            columns = attention[:, self.labels == label]
            per_class[:, label] = torch.logsumexp(columns, dim=1)
        return per_class

    def distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` negative log probability of each class."""
        return (-self.log_probabilities(queries)).float()
