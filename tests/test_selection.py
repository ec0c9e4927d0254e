"""Algorithm 2 (anomaly embedding selection) on hand-made patch scores."""

from __future__ import annotations

import math

import pytest
import torch

from patchproto.selection import normalized_scores, select_patches, selection_order


def literal_algorithm2(scores: torch.Tensor, gamma: float, m: int | None) -> list[int]:
    """Algorithm 2 as printed, plus the rule that at least one patch is kept."""
    mass = torch.softmax(scores.double(), dim=0).tolist()
    order = sorted(range(len(mass)), key=lambda i: -mass[i])  # Python's sort is stable
    chosen: list[int] = []
    c = 0.0
    bound = m if m is not None else len(mass)
    while (c < gamma or not chosen) and len(chosen) < bound and len(chosen) < len(mass):
        chosen.append(order[len(chosen)])
        c += mass[chosen[-1]]
    return chosen


def test_gamma_zero_keeps_only_the_most_anomalous_patch() -> None:
    indices, weights = selection_order(torch.tensor([0.5, 2.0, 1.0, 1.9]), gamma=0.0)
    assert indices.tolist() == [1]
    assert weights.shape == (1,)


def test_gamma_one_keeps_every_patch_most_anomalous_first() -> None:
    scores = torch.tensor([0.0, 40.0, 3.0, 1.0, 2.0])  # the tail mass is far below float eps
    indices, weights = selection_order(scores, gamma=1.0)
    assert indices.tolist() == [1, 2, 4, 3, 0]
    assert torch.all(weights[:-1] >= weights[1:])


def test_selection_stops_once_the_mass_reaches_gamma() -> None:
    scores = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    assert selection_order(scores, gamma=0.4)[0].tolist() == [0]
    assert selection_order(scores, gamma=0.6)[0].tolist() == [0, 1]
    assert selection_order(scores, gamma=0.85)[0].tolist() == [0, 1, 2]


def test_mass_exactly_at_gamma_stops_the_loop() -> None:
    # Four equal scores: masses 0.25 each, exactly representable. c = 0.5 after two patches,
    # and the loop test c < 0.5 then fails.
    assert len(selection_order(torch.zeros(4), gamma=0.5)[0]) == 2


def test_m_caps_the_number_of_patches() -> None:
    scores = torch.arange(10, dtype=torch.float32)
    assert selection_order(scores, gamma=1.0, m=1)[0].tolist() == [9]
    assert selection_order(scores, gamma=1.0, m=3)[0].tolist() == [9, 8, 7]
    assert len(selection_order(scores, gamma=1.0, m=50)[0]) == 10
    assert len(selection_order(scores, gamma=1.0, m=None)[0]) == 10


def test_ties_keep_the_original_patch_order() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    indices, weights = selection_order(scores, gamma=1.0)
    assert indices.tolist() == [1, 2, 4, 0, 3]
    assert selection_order(scores, gamma=0.5)[0].tolist() == [1, 2]
    assert weights[0] == weights[1] == weights[2]


def test_a_single_patch_is_always_selected_with_all_the_mass() -> None:
    for gamma in (0.0, 0.5, 1.0):
        indices, weights = selection_order(torch.tensor([7.0]), gamma=gamma)
        assert indices.tolist() == [0]
        assert weights.tolist() == [1.0]


def test_weights_are_the_softmax_of_all_patch_scores() -> None:
    scores = torch.tensor([0.3, -1.0, 2.0, 0.7])
    indices, weights = selection_order(scores, gamma=0.9)
    expected = torch.softmax(scores.double(), dim=0)[indices].float()
    torch.testing.assert_close(weights, expected)
    assert float(weights.sum()) <= 1.0 + 1e-6


def test_temperature_divides_the_scores_before_the_softmax() -> None:
    scores = torch.tensor([2.0 * math.log(3.0), 0.0], dtype=torch.float64)
    # temperature 1: softmax gives [0.9, 0.1]; temperature 2: [0.75, 0.25].
    _, sharp = selection_order(scores, gamma=0.5, temperature=1.0)
    _, soft = selection_order(scores, gamma=0.5, temperature=2.0)
    assert sharp.tolist() == pytest.approx([0.9])
    assert soft.tolist() == pytest.approx([0.75])
    assert len(selection_order(scores, gamma=0.8, temperature=1.0)[0]) == 1
    assert len(selection_order(scores, gamma=0.8, temperature=2.0)[0]) == 2
    torch.testing.assert_close(
        normalized_scores(scores, 2.0), torch.tensor([0.75, 0.25], dtype=torch.float64)
    )


def test_matches_the_literal_loop_on_random_scores() -> None:
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        count = 1 + trial % 17
        scores = torch.randn(count, generator=generator) * (0.5 + trial % 4)
        gamma = float(torch.rand(1, generator=generator)) * 0.99
        m = None if trial % 3 == 0 else 1 + trial % 6
        got = selection_order(scores, gamma=gamma, m=m)[0].tolist()
        assert got == literal_algorithm2(scores, gamma, m), (scores, gamma, m)


def test_select_patches_returns_the_matching_embedding_rows() -> None:
    embeddings = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    selection = select_patches(embeddings, torch.tensor([0.0, 5.0, 1.0, 4.0]), gamma=0.99, m=2)
    assert selection.indices.tolist() == [1, 3]
    assert torch.equal(selection.embeddings, embeddings[[1, 3]])
    assert len(selection) == 2


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"gamma": -0.1}, "gamma=-0.1"),
        ({"gamma": 1.5}, "gamma=1.5"),
        ({"gamma": float("nan")}, "gamma=nan"),
        ({"gamma": 0.5, "m": 0}, "m=0"),
        ({"gamma": 0.5, "m": 2.5}, "m=2.5"),
        ({"gamma": 0.5, "m": True}, "m=True"),
        ({"gamma": 0.5, "temperature": 0.0}, "temperature=0.0"),
        ({"gamma": 0.5, "temperature": -1.0}, "temperature=-1.0"),
        ({"gamma": 0.5, "temperature": float("inf")}, "temperature=inf"),
    ],
)
def test_bad_parameters_are_rejected_by_name(params: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        selection_order(torch.zeros(3), **params)


def test_bad_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        selection_order(torch.zeros(0), gamma=0.5)
    with pytest.raises(ValueError, match="non-empty"):
        selection_order(torch.zeros(2, 2), gamma=0.5)
    with pytest.raises(ValueError, match="NaN"):
        selection_order(torch.tensor([0.0, float("nan")]), gamma=0.5)
    with pytest.raises(ValueError, match="do not match"):
        select_patches(torch.zeros(3, 2), torch.zeros(4), gamma=0.5)
