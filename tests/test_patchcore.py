"""The PatchCore memory bank: nearest-neighbour patch scores, image scores and anomaly maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from patchproto.coreset import greedy_coreset
from patchproto.patchcore import MAP_SIGMA, MemoryBank, anomaly_map, image_score


def _data(seed: int = 0, n: int = 600, q: int = 150, d: int = 32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(q, d, generator=generator)


def test_exact_scores_equal_brute_force() -> None:
    normal, queries = _data()

    bank = MemoryBank(coreset_ratio=1.0).fit(normal)
    distance, index = bank.nearest(queries)

    expected = torch.cdist(queries.double(), normal.double())
    torch.testing.assert_close(
        bank.patch_scores(queries).double(), expected.amin(dim=1), rtol=1e-5, atol=0
    )
    assert torch.equal(index.long(), expected.argmin(dim=1))
    assert torch.equal(distance, bank.patch_scores(queries))


def test_coreset_bank_holds_the_greedy_selection() -> None:
    normal, queries = _data(1)

    bank = MemoryBank(coreset_ratio=0.25, seed=3).fit(normal)

    chosen = greedy_coreset(normal, 150, seed=3)
    assert torch.equal(bank.embeddings, normal[chosen])
    expected = torch.cdist(queries.double(), normal[chosen].double()).amin(dim=1)
    torch.testing.assert_close(bank.patch_scores(queries).double(), expected, rtol=1e-5, atol=0)
    # A smaller bank can only be farther away.
    full = MemoryBank(coreset_ratio=1.0).fit(normal).patch_scores(queries)
    assert (bank.patch_scores(queries) >= full - 1e-5).all()


def test_bank_members_score_zero() -> None:
    normal, _ = _data(2)
    bank = MemoryBank(coreset_ratio=0.1).fit(normal)

    scores = bank.patch_scores(bank.embeddings)

    assert float(scores.max()) < 1e-3


def test_approximate_search_agrees_closely() -> None:
    normal, queries = _data(3, n=3000, q=300, d=24)

    exact = MemoryBank(coreset_ratio=1.0).fit(normal).patch_scores(queries)
    approximate = MemoryBank(coreset_ratio=1.0, approximate=True).fit(normal).patch_scores(queries)

    assert (approximate >= exact - 1e-4).all()  # never nearer than the true neighbour
    assert float(((approximate - exact) / exact).abs().mean()) < 1e-2
    assert float((approximate - exact).abs().lt(1e-4).float().mean()) > 0.9


def test_load_uses_the_embeddings_as_given() -> None:
    bank = MemoryBank().load(torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64))

    assert bank.embeddings.dtype == torch.float32
    assert bank.patch_scores(torch.tensor([[3.0, 4.0], [10.0, 1.0]])).tolist() == [5.0, 1.0]


def test_misuse_is_refused() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        MemoryBank().patch_scores(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBank().fit(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBank().fit(torch.zeros(5))
    with pytest.raises(ValueError, match="ratio"):
        MemoryBank(coreset_ratio=0.0)


def test_image_score_is_the_highest_patch_score() -> None:
    assert image_score(torch.tensor([0.5, 2.5, 1.0])) == 2.5


def test_anomaly_map_shape_and_smoothing() -> None:
    scores = torch.zeros(4 * 6)
    scores[1 * 6 + 4] = 1.0  # one anomalous patch at row 1, column 4

    heatmap = anomaly_map(scores, (4, 6), (32, 48))

    assert heatmap.shape == (32, 48)
    peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert peak[0] // 8 == 1 and peak[1] // 8 == 4
    upsampled = F.interpolate(
        scores.reshape(1, 1, 4, 6), size=(32, 48), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(heatmap, gaussian_filter(upsampled, sigma=MAP_SIGMA), atol=1e-6)
    assert heatmap.max() < upsampled.max()  # smoothing spreads the peak
    assert heatmap.sum() == pytest.approx(upsampled.sum(), rel=0.02)


def test_anomaly_map_of_constant_scores_is_constant() -> None:
    heatmap = anomaly_map(torch.full((28 * 28,), 3.0), (28, 28), (224, 224))

    assert heatmap.shape == (224, 224)
    np.testing.assert_allclose(heatmap, 3.0, rtol=1e-6)
