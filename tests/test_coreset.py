"""Greedy k-center coreset: the lazy search selects exactly what the plain algorithm selects."""

from __future__ import annotations

import itertools

import pytest
import torch

from patchproto.coreset import coreset_size, coverage_radius, greedy_coreset, random_projection


def _plain_greedy(points: torch.Tensor, count: int, first: int) -> list[int]:
    """Textbook greedy k-center: add the point farthest from every chosen one, one at a time."""
    points = points.double()
    chosen = [first]
    nearest = torch.cdist(points, points[first : first + 1])[:, 0]
    while len(chosen) < count:
        new = int(torch.argmax(nearest))
        chosen.append(new)
        nearest = torch.minimum(nearest, torch.cdist(points, points[new : new + 1])[:, 0])
    return chosen


def _first_center(n: int, seed: int) -> int:
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


def _radius(points: torch.Tensor, chosen) -> float:
    return float(torch.cdist(points.double(), points[list(chosen)].double()).amin(dim=1).max())


@pytest.mark.parametrize(("n", "d", "count", "seed"), [(300, 16, 40, 0), (500, 48, 120, 3)])
def test_matches_plain_greedy_in_full_dimension(n: int, d: int, count: int, seed: int) -> None:
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))

    chosen = greedy_coreset(features, count, projection_dim=None, seed=seed)

    assert chosen.tolist() == _plain_greedy(features, count, _first_center(n, seed))


def test_matches_plain_greedy_after_projection() -> None:
    features = torch.randn(400, 64, generator=torch.Generator().manual_seed(7))

    chosen = greedy_coreset(features, 60, projection_dim=8, seed=2)

    projected = random_projection(features, 8, seed=2)
    assert chosen.tolist() == _plain_greedy(projected, 60, _first_center(400, 2))


def test_clustered_data_gets_one_center_per_cluster() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    features = (centres[:, None, :] + torch.randn(4, 50, 2, generator=generator)).reshape(200, 2)

    chosen = greedy_coreset(features, 4, projection_dim=None)

    assert sorted((chosen // 50).tolist()) == [0, 1, 2, 3]


def test_coverage_radius_is_the_farthest_distance_to_the_coreset() -> None:
    features = torch.randn(250, 12, generator=torch.Generator().manual_seed(1))
    chosen = greedy_coreset(features, 30, projection_dim=None)

    radius = coverage_radius(features, chosen)

    assert radius == pytest.approx(_radius(features, chosen.tolist()), rel=1e-5)
    # The next greedy center is exactly the point that sets the radius.
    following = greedy_coreset(features, 31, projection_dim=None)
    assert following[:30].tolist() == chosen.tolist()
    next_distance = float(torch.cdist(features[following[30:]], features[chosen]).min())
    assert radius == pytest.approx(next_distance, rel=1e-5)


def test_radius_is_within_twice_the_best_possible() -> None:
    features = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    best = min(_radius(features, subset) for subset in itertools.combinations(range(12), 3))

    chosen = greedy_coreset(features, 3, projection_dim=None)

    assert coverage_radius(features, chosen) <= 2 * best + 1e-6


def test_selection_is_seeded_and_unique() -> None:
    features = torch.randn(200, 160, generator=torch.Generator().manual_seed(5))

    first = greedy_coreset(features, 50, seed=11)
    again = greedy_coreset(features, 50, seed=11)

    assert torch.equal(first, again)
    assert len(set(first.tolist())) == 50
    assert first.dtype == torch.int64


def test_progress_adds_up_to_the_count() -> None:
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(6))
    steps: list[int] = []

    greedy_coreset(features, 260, projection_dim=None, on_step=steps.append)

    assert steps == [256, 4]


def test_whole_set_and_single_center() -> None:
    features = torch.randn(20, 4, generator=torch.Generator().manual_seed(8))
    assert sorted(greedy_coreset(features, 20, projection_dim=None).tolist()) == list(range(20))
    assert greedy_coreset(features, 1, projection_dim=None).tolist() == [_first_center(20, 0)]


@pytest.mark.parametrize("count", [0, 21])
def test_impossible_counts_are_refused(count: int) -> None:
    with pytest.raises(ValueError, match=str(count)):
        greedy_coreset(torch.zeros(20, 4), count)


def test_coreset_size() -> None:
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(1000, 1.0) == 1000
    assert coreset_size(5, 0.01) == 1
    assert coreset_size(15, 0.1) == 2
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            coreset_size(10, ratio)


def test_random_projection() -> None:
    features = torch.randn(10, 300, generator=torch.Generator().manual_seed(9))

    projected = random_projection(features, 128, seed=1)

    assert projected.shape == (10, 128)
    assert torch.equal(projected, random_projection(features, 128, seed=1))
    assert not torch.equal(projected, random_projection(features, 128, seed=2))
    assert torch.equal(random_projection(features[:, :64], 128), features[:, :64])
    # Distances are roughly preserved (Johnson-Lindenstrauss).
    ratio = torch.pdist(projected) / torch.pdist(features)
    assert 0.7 < float(ratio.mean()) < 1.3
