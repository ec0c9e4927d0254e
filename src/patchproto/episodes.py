"""Episodes for few-shot evaluation: N-way K-shot tasks drawn from one category's defects.

Every defect type of a category is a way. An episode draws K support images per way and makes
every other defective image of those ways a query, so that an episode tests on all the data it
did not learn from. A type with fewer than K + 1 images cannot give K support images and a query;
it is left out at that K, and the left-out types are reported with the episodes.

Episodes are drawn from a numpy generator seeded by the run's seed, the shot count and the
category's name, so that each (category, K) is reproducible on its own and every method of a run
is scored on the same episodes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task over a list of labelled images.

    Attributes:
        support: ``(image index, way)`` pairs, K per way, grouped by way.
        queries: ``(image index, way)`` pairs of every other image of the ways, by index.
        ways: Defect type of each way: way ``i`` is ``ways[i]``.
    """

    support: tuple[tuple[int, int], ...]
    queries: tuple[tuple[int, int], ...]
    ways: tuple[str, ...]

    @property
    def shots(self) -> int:
        """Support images per way."""
        return len(self.support) // len(self.ways)


@dataclass(frozen=True)
class EpisodeSet:
    """The episodes of one category at one K, with the types that could not take part.

    Attributes:
        shots: K, support images per way.
        ways: The defect types that take part, sorted.
        left_out: Types left out at this K, with their image counts (fewer than K + 1).
        episodes: The episodes; empty when fewer than two types remain (see ``skipped``).
        skipped: Why there are no episodes, or ``None``.
    """

    shots: int
    ways: tuple[str, ...]
    left_out: dict[str, int] = field(default_factory=dict)
    episodes: list[Episode] = field(default_factory=list)
    skipped: str | None = None


def episode_seed(seed: int, shots: int, stream: str = "") -> np.random.SeedSequence:
    """The seed sequence of one (run seed, K, stream) triple; ``stream`` is a category's name."""
    if seed < 0:
        msg = f"seed {seed} must be a non-negative integer"
        raise ValueError(msg)
    return np.random.SeedSequence([seed, shots, zlib.crc32(stream.encode("utf-8"))])


def sample_episodes(
    labels: Sequence[str],
    shots: int,
    episodes: int,
    seed: int = 0,
    stream: str = "",
) -> EpisodeSet:
    """Draw ``episodes`` N-way K-shot episodes over images labelled by defect type.

    Args:
        labels: The defect type of each image; episodes refer to images by their index here.
        shots: K, support images per way (at least 1).
        episodes: How many episodes to draw (at least 1).
        seed: The run's seed.
        stream: Separates independent draws under one seed (the category's name).

    Returns:
        The episodes, the ways and the left-out types. Fewer than two usable types give no
        episodes, with the reason in ``skipped``.

    Raises:
        ValueError: ``shots`` or ``episodes`` below 1, or a negative seed.

    Example:
        >>> labels = ["crack"] * 3 + ["hole"] * 4 + ["cut"]
        >>> found = sample_episodes(labels, shots=2, episodes=5, seed=0)
        >>> found.ways, found.left_out, len(found.episodes)
        (('crack', 'hole'), {'cut': 1}, 5)
        >>> len(found.episodes[0].support), len(found.episodes[0].queries)
        (4, 3)
    """
    if shots < 1:
        msg = f"shots {shots} must be at least 1 (support images per defect type)"
        raise ValueError(msg)
    if episodes < 1:
        msg = f"episodes {episodes} must be at least 1"
        raise ValueError(msg)

    by_type: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_type.setdefault(label, []).append(index)
    left_out = {t: len(ix) for t, ix in sorted(by_type.items()) if len(ix) < shots + 1}
    ways = tuple(sorted(t for t in by_type if t not in left_out))
    if left_out:
        logger.info(
            "%s: %d-shot leaves out %s (fewer than %d images)",
            stream or "episodes",
            shots,
            ", ".join(f"{t} ({n})" for t, n in left_out.items()),
            shots + 1,
        )
    if len(ways) < 2:
        reason = (
            f"{len(ways)} defect type(s) with at least {shots + 1} images; "
            "a classification episode needs two"
        )
        return EpisodeSet(shots, ways, left_out, [], reason)

    rng = np.random.default_rng(episode_seed(seed, shots, stream))
    drawn: list[Episode] = []
    for _ in range(episodes):
        support: list[tuple[int, int]] = []
        queries: list[tuple[int, int]] = []
        for way, name in enumerate(ways):
            order = rng.permutation(len(by_type[name]))
            members = [by_type[name][i] for i in order]
            support.extend((index, way) for index in members[:shots])
            queries.extend((index, way) for index in members[shots:])
        drawn.append(Episode(tuple(support), tuple(sorted(queries)), ways))
    return EpisodeSet(shots, ways, left_out, drawn)
