"""The "Baseline" of Chen et al.: a linear classifier trained on the support set's features.

Chen, Liu, Kira, Wang and Huang, "A Closer Look at Few-shot Classification" (ICLR 2019),
Section 3.1: the backbone stays frozen and a new linear layer (weights and bias) is trained with
cross-entropy on the support features of the episode. The optimiser follows their fine-tuning
stage: SGD with learning rate 0.01, momentum 0.9, dampening 0.9, weight decay 0.001, mini-batches
of 4 for 100 epochs. The initial weights and the batch order are seeded, so a run is repeatable.

The distance is ``-log softmax(logits)``, so the confidences ``softmax(-d)`` are the
classifier's probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from patchproto.methods.base import FewShotMethod, ImageFeatures, check_support
from patchproto.methods.protonet import stack_pooled

# Chen et al. (2019), fine-tuning on the novel support set.
DEFAULT_EPOCHS = 100
DEFAULT_LR = 0.01
DEFAULT_BATCH_SIZE = 4
_MOMENTUM, _DAMPENING, _WEIGHT_DECAY = 0.9, 0.9, 0.001


class Finetune(FewShotMethod):
    """A linear classifier on frozen pooled features, trained on the support set.

    Args:
        epochs: Passes over the support set.
        lr: SGD learning rate.
        batch_size: Support images per step.
        seed: Seeds the initial weights and the batch order.

    Example:
        >>> def image(key, x):
        ...     none = torch.zeros(1, 1)
        ...     return ImageFeatures(key, none, (1, 1), torch.zeros(1), torch.tensor(x))
        >>> method = Finetune().fit([image("a", [1.0, 0]), image("b", [0.0, 1])], [0, 1])
        >>> method.predict([image("q", [0.1, 0.9])]).labels.tolist()
        [1]
    """

    name = "finetune"

    def __init__(
        self,
        epochs: int = DEFAULT_EPOCHS,
        lr: float = DEFAULT_LR,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
    ) -> None:
        for label, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{label}={value!r} must be a whole number >= 1"
                raise ValueError(msg)
        if not lr > 0:
            msg = f"lr={lr!r} must be > 0"
            raise ValueError(msg)
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.weight = torch.zeros(0, 0)
        self.bias = torch.zeros(0)

    def __repr__(self) -> str:
        return (
            f"Finetune(epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}, "
            f"seed={self.seed})"
        )

    def fit(self, support: Sequence[ImageFeatures], labels: Sequence[int]) -> Finetune:
        """Train a fresh linear layer on the support features."""
        ways = check_support(support, labels)
        features = stack_pooled(support)
        targets = torch.as_tensor(list(labels), dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed)

        # The default initialisation of a linear layer: uniform in +-1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(features.shape[1])
        weight = (torch.rand(ways, features.shape[1], generator=generator) * 2 - 1) * bound
        bias = (torch.rand(ways, generator=generator) * 2 - 1) * bound
        one_hot = F.one_hot(targets, ways).float()

        # SGD with momentum, dampening and weight decay (as torch.optim.SGD computes it), on the
        # closed-form gradient of the mean cross-entropy: autograd costs more than the model.
        momentum: tuple[torch.Tensor, torch.Tensor] | None = None
        for _ in range(self.epochs):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                x = features[batch]
                error = (torch.softmax(x @ weight.T + bias, dim=1) - one_hot[batch]) / len(batch)
                grads = (error.T @ x + _WEIGHT_DECAY * weight, error.sum(0) + _WEIGHT_DECAY * bias)
                if momentum is None:
                    momentum = grads
                else:
                    momentum = tuple(
                        _MOMENTUM * m + (1 - _DAMPENING) * g
                        for m, g in zip(momentum, grads, strict=True)
                    )
                weight = weight - self.lr * momentum[0]
                bias = bias - self.lr * momentum[1]
        self.weight, self.bias = weight, bias
        return self

    def distances(self, queries: Sequence[ImageFeatures]) -> torch.Tensor:
        """``(Q, N)`` negative log probability of each class under the trained classifier."""
        if self.weight.numel() == 0:
            raise RuntimeError("Finetune has no support set: call fit() first")
        if not queries:
            return torch.zeros(0, len(self.weight))
        logits = stack_pooled(queries) @ self.weight.T + self.bias
        return -torch.log_softmax(logits, dim=1)
