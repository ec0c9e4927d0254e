"""Episode sampling: K per way, disjoint support and queries, reproducible, left-out types."""

from __future__ import annotations

from collections import Counter

import pytest

from patchproto.episodes import sample_episodes

# Type sizes like a small MVTec AD category, with one type too small for 5-shot.
LABELS = ["blowhole"] * 9 + ["break"] * 7 + ["combined"] * 5 + ["crack"] * 12


@pytest.mark.parametrize("shots", [1, 3, 5])
def test_support_and_queries_are_disjoint_and_cover_the_ways(shots):
    found = sample_episodes(LABELS, shots, episodes=20, seed=3, stream="tile")
    assert len(found.episodes) == 20
    for episode in found.episodes:
        support = [index for index, _ in episode.support]
        queries = [index for index, _ in episode.queries]
        assert not set(support) & set(queries)
        assert len(set(support)) == len(support)
        # Every image of a taking-part type is either support or query.
        taking_part = {i for i, label in enumerate(LABELS) if label in episode.ways}
        assert set(support) | set(queries) == taking_part


@pytest.mark.parametrize("shots", [1, 3, 5])
def test_k_support_images_per_way_and_labels_match(shots):
    found = sample_episodes(LABELS, shots, episodes=10, seed=0)
    for episode in found.episodes:
        assert Counter(way for _, way in episode.support) == dict.fromkeys(
            range(len(episode.ways)), shots
        )
        assert episode.shots == shots
        for index, way in episode.support + episode.queries:
            assert LABELS[index] == episode.ways[way]


def test_reproducible_by_seed_and_different_seeds_differ():
    first = sample_episodes(LABELS, 3, episodes=15, seed=7, stream="tile")
    again = sample_episodes(LABELS, 3, episodes=15, seed=7, stream="tile")
    other = sample_episodes(LABELS, 3, episodes=15, seed=8, stream="tile")
    other_stream = sample_episodes(LABELS, 3, episodes=15, seed=7, stream="tire")
    assert first.episodes == again.episodes
    assert first.episodes != other.episodes
    assert first.episodes != other_stream.episodes
    # Episodes within one run differ from each other too.
    assert len({e.support for e in first.episodes}) > 1


def test_types_with_fewer_than_k_plus_one_images_are_left_out_and_reported():
    found = sample_episodes(LABELS, 5, episodes=4, seed=0)
    assert found.left_out == {"combined": 5}
    assert found.ways == ("blowhole", "break", "crack")
    for episode in found.episodes:
        assert all(LABELS[i] != "combined" for i, _ in episode.support + episode.queries)
    assert sample_episodes(LABELS, 4, episodes=1, seed=0).left_out == {}


def test_fewer_than_two_usable_types_gives_no_episodes_and_a_reason():
    found = sample_episodes(["a"] * 3 + ["b"] * 9, 3, episodes=5, seed=0)
    assert found.episodes == []
    assert found.left_out == {"a": 3}
    assert "two" in found.skipped


@pytest.mark.parametrize(("shots", "episodes", "seed"), [(0, 5, 0), (1, 0, 0), (1, 5, -1)])
def test_bad_arguments_raise(shots, episodes, seed):
    with pytest.raises(ValueError):
        sample_episodes(LABELS, shots, episodes, seed)
