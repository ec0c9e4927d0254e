"""Anomaly embedding selection: keep the patches that carry most of an image's anomaly score.

Wang and Zhuo, "PatchProto Networks for Few-shot Visual Anomaly Classification", Algorithm 2:
the patch scores of one image are normalised by a softmax, sorted in decreasing order, and
patches are taken while the cumulative normalised score ``c`` is below the threshold ``gamma``
and fewer than ``m`` patches have been taken. ``gamma`` adapts the number of patches to the
size of the defect; ``m`` stops a poorly located defect from spreading over the whole image
(Section 3.1).

Edge cases, decided here because the algorithm is silent on them:

- At least one patch is always kept. Read literally, Algorithm 2 with ``gamma = 0`` keeps no
  patch (the loop test ``c < gamma`` fails at once), yet Section 4.4 says that ``gamma = 0``
  "denotes selecting only one patch with highest anomaly score". So the number kept is
  ``min(m, k)`` where ``k >= 1`` is the smallest count whose cumulative mass reaches ``gamma``.
- ``gamma = 1`` keeps every patch (up to ``m``), even where rounding makes the cumulative
  mass reach 1.0 a few patches early.
- Ties keep the patches' original (row-major) order: the sort is stable.
- ``temperature`` divides the scores before the softmax (the paper uses a plain softmax,
  ``temperature = 1``). Patch scores are distances in feature space, so their scale depends on
  the backbone; a higher temperature spreads the mass over more patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Algorithm 2 normalises the scores with a plain softmax.
DEFAULT_TEMPERATURE = 1.0


@dataclass
class Selection:
    """The anomaly patches selected from one image, most anomalous first.

    Attributes:
        indices: ``(k,)`` row-major patch indices into the image's patch grid.
        embeddings: ``(k, D)`` the selected patch embeddings.
        weights: ``(k,)`` their softmax-normalised scores (over all patches of the image, so
            they sum to the cumulative mass ``c`` of Algorithm 2, at most 1).
    """

    indices: torch.Tensor
    embeddings: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def check_selection_params(gamma: float, m: int | None, temperature: float) -> None:
    """Validate the parameters of Algorithm 2.

    Raises:
        ValueError: ``gamma`` outside ``[0, 1]``, ``m`` below 1, or ``temperature`` not positive.
    """
    if not isinstance(gamma, int | float) or math.isnan(gamma) or not 0.0 <= gamma <= 1.0:
        msg = f"gamma={gamma!r} must be a fraction of the anomaly score in [0, 1]"
        raise ValueError(msg)
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        msg = f"m={m!r} must be a whole number of patches >= 1 (or None for no upper bound)"
        raise ValueError(msg)
    if not isinstance(temperature, int | float) or not temperature > 0 or math.isinf(temperature):
        msg = f"temperature={temperature!r} must be a finite number > 0 (the paper uses 1)"
        raise ValueError(msg)


def normalized_scores(
    scores: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Softmax of patch scores divided by ``temperature`` (Algorithm 2, line 2), in float64."""
    return torch.softmax(scores.detach().double().flatten() / temperature, dim=0)


def selection_order(
    scores: torch.Tensor,
    gamma: float,
    m: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of the selected patches and their normalised scores (Algorithm 2).

    Args:
        scores: ``(P,)`` anomaly scores of one image's patches (higher is more anomalous).
        gamma: Fraction of the total normalised score to cover, in ``[0, 1]``.
        m: Upper bound on the number of patches; ``None`` for none.
        temperature: Softmax temperature (1 in the paper).

    Returns:
        ``(indices, weights)``, both ``(k,)`` with ``1 <= k <= min(m, P)``, most anomalous first;
        ``weights`` are float32.

    Raises:
        ValueError: A parameter is out of range, or ``scores`` is empty, not 1-D or not finite.

    Example:
        >>> idx, w = selection_order(torch.tensor([0.0, 3.0, 1.0]), gamma=0.9)
        >>> idx.tolist()
        [1, 2]
    """
    check_selection_params(gamma, m, temperature)
    if scores.ndim != 1 or scores.shape[0] == 0:
        msg = f"need a non-empty (P,) tensor of patch scores, got shape {tuple(scores.shape)}"
        raise ValueError(msg)
    if not bool(torch.isfinite(scores).all()):
        msg = "patch scores contain NaN or infinity; check the memory bank and the embeddings"
        raise ValueError(msg)

    mass = normalized_scores(scores, temperature)
    order = torch.sort(mass, descending=True, stable=True).indices
    cumulative = torch.cumsum(mass[order], dim=0)

    # Taking k patches leaves c = cumulative[k - 1]; the loop stops at the first k with c >= gamma.
    count = len(order) if gamma >= 1.0 else int(torch.searchsorted(cumulative, gamma)) + 1
    count = max(1, min(count, len(order), m if m is not None else len(order)))
    chosen = order[:count]
    return chosen, mass[chosen].float()


def select_patches(
    embeddings: torch.Tensor,
    scores: torch.Tensor,
    gamma: float,
    m: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Selection:
    """Select an image's anomaly embeddings (Algorithm 2).

    Args:
        embeddings: ``(P, D)`` patch embeddings of one image.
        scores: ``(P,)`` their anomaly scores.
        gamma: Fraction of the total normalised score to cover, in ``[0, 1]``.
        m: Upper bound on the number of patches; ``None`` for none.
        temperature: Softmax temperature (1 in the paper).

    Returns:
        The :class:`Selection`, most anomalous patch first.

    Raises:
        ValueError: A parameter is out of range or the shapes disagree.

    Example:
        >>> sel = select_patches(torch.eye(3), torch.tensor([0.0, 3.0, 1.0]), gamma=0.0)
        >>> sel.indices.tolist(), sel.embeddings.tolist()
        ([1], [[0.0, 1.0, 0.0]])
    """
    if embeddings.ndim != 2 or embeddings.shape[0] != scores.reshape(-1).shape[0]:
        msg = (
            f"embeddings of shape {tuple(embeddings.shape)} do not match "
            f"{scores.numel()} patch scores: need (P, D) and (P,)"
        )
        raise ValueError(msg)
    indices, weights = selection_order(scores.reshape(-1), gamma, m, temperature)
    return Selection(indices, embeddings[indices], weights)
