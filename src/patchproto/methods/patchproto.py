"""PatchProto networks: prototypes made of the anomalous patches of each support image.

Wang and Zhuo, "PatchProto Networks for Few-shot Visual Anomaly Classification", Algorithm 1.
Every image's patches are scored against normal images (PatchCore), and only its anomaly
patches are kept (Algorithm 2, :mod:`patchproto.selection`). A class prototype is the *set* of
the kept patch embeddings of each of its support images; nothing is averaged, because each
image keeps a different number of patches. A query's distance to class ``y`` is Equation 1:

    d^y = 1/N  sum_n  sum_i  s_i * min_j (1 - cos(z_i, Z^y[n]_j))

over the ``N`` support images ``n`` of the class, the query's selected patches ``z_i`` with
normalised anomaly scores ``s_i``, and the selected patches ``Z^y[n]_j`` of support image ``n``.

The weights ``s_i`` are the softmax-normalised scores of the selected query patches,
renormalised to sum to 1 by default, so that ``d^y`` is a weighted mean of cosine distances in
``[0, 2]`` whatever share of the anomaly mass the selection covered. The weights are the same for
every class, so this changes no prediction, only the scale of the distances (and so the
confidences and any threshold on them).

NOTE: the confidences ``softmax(-d)`` of :class:`~patchproto.methods.base.Prediction` are close
to uniform here, because cosine distances differ between classes by a few hundredths; they
rank the classes but are not calibrated probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from patchproto.methods.base import FewShotMethod, ImageFeatures, check_support
from patchproto.selection import (
    DEFAULT_TEMPERATURE,
    Selection,
    check_selection_params,
    select_patches,
)

logger = logging.getLogger(__name__)

# The paper gives no numbers for gamma and m (Section 4.4 shows them only as a plot) but
# recommends its "mix strategy": a high gamma with an upper bound m. With the paper's softmax
# temperature of 1, PatchCore scores are distances of tens of units (efficientnet_lite2), and
# the softmax is so peaked that gamma = 0.8 or 0.95 keeps only 1 to 10 patches per image; on
# magnetic_tile that lost 5 points of 3-shot accuracy against gamma = 1, where the bound m
# decides. m = 32 patches is about the area of a 45-pixel square defect at 224 pixels.
# NOTE: these defaults were checked on one data set and one backbone only; the evaluation's
# parameter sweep tunes gamma, m and the temperature for yours.
DEFAULT_GAMMA = 1.0
DEFAULT_M = 32

# Bounds the (query patches x prototype patches) similarity matrix held at once.
_MAX_PAIRS = 1 << 24
# Support images' patch sets are padded to one length when that adds at most this factor.
_PAD_SLACK = 1.5


class PatchProtoNetworks(FewShotMethod):
    """Few-shot classification by the anomalous patches of each image (Algorithm 1, Equation 1).

    Args:
        gamma: Share of an image's normalised anomaly score to cover (Algorithm 2), in [0, 1].
        m: Upper bound on the patches kept per image (Algorithm 2); ``None`` for none.
        temperature: Softmax temperature of the patch scores (1 in the paper).
        normalize_weights: Rescale a query's selected weights to sum to 1 (see the module).

    Example:
        >>> def image(key, hot):
        ...     patches = torch.eye(4)[[0, 1, 2, hot]]
        ...     scores = torch.tensor([0.0, 0.0, 0.0, 9.0])
        ...     return ImageFeatures(key, patches, (2, 2), scores, torch.zeros(1))
        >>> method = PatchProtoNetworks(gamma=0.5).fit([image("a", 0), image("b", 3)], [0, 1])
        >>> method.predict([image("q", 3)]).labels.tolist()
        [1]
    """

    name = "patchproto"

    def __init__(
        self,
        gamma: float = DEFAULT_GAMMA,
        m: int | None = DEFAULT_M,
        temperature: float = DEFAULT_TEMPERATURE,
        normalize_weights: bool = True,
    ) -> None:
        check_selection_params(gamma, m, temperature)
        self.gamma, self.m, self.temperature = gamma, m, temperature
        self.normalize_weights = normalize_weights
        self.support: list[ImageFeatures] = []
        self.support_selections: list[Selection] = []
        self.labels = torch.zeros(0, dtype=torch.long)
        self.ways = 0
        self._prototypes = torch.zeros(0, 0)
        self._owner = torch.zeros(0, dtype=torch.long)
        self._padded = False
        self._padding = torch.zeros(0, dtype=torch.bool)
        self._starts: list[int] = []

    def __repr__(self) -> str:
        return (
            f"PatchProtoNetworks(gamma={self.gamma}, m={self.m}, temperature={self.temperature}, "
            f"normalize_weights={self.normalize_weights})"
        )

    def select(self, image: ImageFeatures) -> Selection:
        """The anomaly patches of one image (Algorithm 2) with this method's parameters."""
        if image.patches.ndim != 2 or image.patch_scores.reshape(-1).shape[0] != len(image.patches):
            msg = (
                f"image {image.key!r}: patches {tuple(image.patches.shape)} and patch_scores "
                f"{tuple(image.patch_scores.shape)} do not match; need (P, D) and (P,)"
            )
            raise ValueError(msg)
        return select_patches(
            image.patches.float(), image.patch_scores, self.gamma, self.m, self.temperature
        )

    def fit(self, support: Sequence[ImageFeatures], labels: Sequence[int]) -> PatchProtoNetworks:
        """Select the anomaly patches of every support image; they form the class prototypes."""
        self.ways = check_support(support, labels)
        self.support = list(support)
        self.support_selections = [self.select(image) for image in support]
        dims = {sel.embeddings.shape[1] for sel in self.support_selections}
        if len(dims) > 1:
            msg = f"support images have patch embeddings of different sizes {sorted(dims)}"
            raise ValueError(msg)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

        # All prototype patches in one matrix; _owner[j] is the support image of row j. When the
        # support images keep similar numbers of patches, each image's rows are padded to the
        # longest, so that the per-image minimum is a reshape and a max rather than a scatter
        # (3x faster); padded rows are masked out.
        lengths = [len(sel) for sel in self.support_selections]
        longest = max(lengths)
        self._padded = len(lengths) * longest <= _PAD_SLACK * sum(lengths)
        if self._padded:
            prototypes = torch.zeros(len(lengths), longest, next(iter(dims)))
            self._padding = torch.ones(len(lengths), longest, dtype=torch.bool)
            for n, sel in enumerate(self.support_selections):
                prototypes[n, : lengths[n]] = sel.embeddings.float()
                self._padding[n, : lengths[n]] = False
            self._prototypes = F.normalize(prototypes.reshape(-1, prototypes.shape[2]), dim=1)
            self._padding = self._padding.reshape(-1)
        else:
            self._prototypes = F.normalize(
                torch.cat([sel.embeddings for sel in self.support_selections]), dim=1
            )
        self._owner = torch.cat(
            [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)]
        )
        # First prototype row of each support image.
        step = [longest] * len(lengths) if self._padded else lengths
        self._starts = [sum(step[:i]) for i in range(len(lengths))]
        logger.debug(
            "PatchProto prototypes: %d patches from %d support images",
            len(self._prototypes),
            len(support),
        )
        return self

    def _weights(self, selection: Selection) -> torch.Tensor:
        weights = selection.weights.float()
        return weights / weights.sum() if self.normalize_weights else weights

    def _check_fitted(self) -> None:
        if not self.support_selections:
            raise RuntimeError("PatchProtoNetworks has no support set: call fit() first")

    def _image_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """``(k, S)``: cosine distance from each query patch to each support image's nearest."""
        similarity = F.normalize(patches, dim=1) @ self._prototypes.T
        if self._padded:
            similarity.masked_fill_(self._padding, -2.0)
            return 1.0 - similarity.view(len(patches), len(self.support), -1).amax(dim=2)
        owner = self._owner.expand(len(patches), -1)
        nearest = torch.full((len(patches), len(self.support)), -2.0)
        nearest = nearest.scatter_reduce(1, owner, similarity, reduce="amax", include_self=False)
        return 1.0 - nearest

    def _class_means(self, per_image: torch.Tensor) -> torch.Tensor:
        """``(Q, S)`` per support image to ``(Q, N)``: the mean over each class's images."""
        one_hot = F.one_hot(self.labels, self.ways).float()
        return per_image @ (one_hot / one_hot.sum(dim=0, keepdim=True))

    def distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` Equation 1 distances from each query to each class."""
        return self._class_means(self.support_distances(queries))

    def support_distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, S)``: Equation 1's inner sum, from each query to each support image's set.

        :meth:`distances` is its mean over each class's support images.
        """
        self._check_fitted()
        selections = [self.select(query) for query in queries]
        per_image = torch.zeros(len(queries), len(self.support))
        if not queries:
            return per_image

        # Chunk the queries so that the similarity matrix stays bounded in memory.
        budget = max(1, _MAX_PAIRS // max(1, len(self._prototypes)))
        start = 0
        while start < len(queries):
            stop, rows = start, 0
            while stop < len(queries) and (stop == start or rows + len(selections[stop]) <= budget):
                rows += len(selections[stop])
                stop += 1
            chunk = selections[start:stop]
            patches = torch.cat([sel.embeddings for sel in chunk]).float()
            weights = torch.cat([self._weights(sel) for sel in chunk])
            owner = torch.cat(
                [torch.full((len(sel),), q, dtype=torch.long) for q, sel in enumerate(chunk)]
            )
            weighted = weights[:, None] * self._image_distances(patches)
            per_image[start:stop] = torch.zeros(len(chunk), len(self.support)).index_add_(
                0, owner, weighted
            )
            start = stop
        return per_image

    def explain(self, query: ImageFeatures) -> dict[str, Any]:
        """Why a query is classified as it is: its selected patches and their nearest matches.

        Returns:
            A dict of plain Python values:

            - ``distances``: ``[d^y]`` per class (Equation 1); ``label``: the nearest class.
            - ``grid``: the query's ``(h, w)`` patch grid.
            - ``patches``: one entry per selected query patch, most anomalous first, with
              ``index`` (row-major), ``row``, ``col``, ``score`` (raw anomaly score), ``weight``
              (``s_i`` as used in Equation 1) and ``nearest``: per class, the closest prototype
              patch over that class's support images, as ``class``, ``support`` (index into
              the fitted support set), ``key``, ``patch``, ``row``, ``col``, ``distance``
              (cosine distance) and ``contribution`` (this patch's share of ``d^y``).
            - ``support``: per support image, ``key``, ``label``, the selected ``patches``
              (row-major indices) and their ``weights``.
        """
        self._check_fitted()
        selection = self.select(query)
        weights = self._weights(selection)
        similarity = F.normalize(selection.embeddings.float(), dim=1) @ self._prototypes.T
        per_image = torch.zeros(1, len(self.support))
        per_image[0] = weights @ self._image_distances(selection.embeddings.float())
        distances = self._class_means(per_image)[0]

        patches: list[dict[str, Any]] = []
        width = query.grid[1]
        for row_index, (index, weight) in enumerate(zip(selection.indices, weights, strict=True)):
            nearest = []
            for label in range(self.ways):
                matches = []
                for n in torch.nonzero(self.labels == label).flatten().tolist():
                    start = self._starts[n]
                    sims = similarity[row_index, start : start + len(self.support_selections[n])]
                    j = int(torch.argmax(sims))
                    matches.append(
                        (1.0 - float(sims[j]), n, int(self.support_selections[n].indices[j]))
                    )
                distance, n, patch = min(matches)
                support_width = self.support[n].grid[1]
                nearest.append(
                    {
                        "class": label,
                        "support": n,
                        "key": self.support[n].key,
                        "patch": patch,
                        "row": patch // support_width,
                        "col": patch % support_width,
                        "distance": distance,
                        "contribution": float(weight) * sum(m[0] for m in matches) / len(matches),
                    }
                )
            index = int(index)
            patches.append(
                {
                    "index": index,
                    "row": index // width,
                    "col": index % width,
                    "score": float(query.patch_scores.reshape(-1)[index]),
                    "weight": float(weight),
                    "nearest": nearest,
                }
            )
        return {
            "distances": distances.tolist(),
            "label": int(distances.argmin()),
            "grid": tuple(query.grid),
            "patches": patches,
            "support": [
                {
                    "key": image.key,
                    "label": int(label),
                    "patches": sel.indices.tolist(),
                    "weights": sel.weights.tolist(),
                }
                for image, label, sel in zip(
                    self.support, self.labels, self.support_selections, strict=True
                )
            ],
        }
