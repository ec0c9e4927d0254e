"""The few-shot methods on small synthetic tasks whose answers are known."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from patchproto.methods import METHODS, ImageFeatures, make_method
from patchproto.methods import patchproto as patchproto_module
from patchproto.methods.masked import (
    GroundTruthProto,
    SegmentationProto,
    mask_image,
    segmentation_mask,
    segmentation_threshold,
    white_image,
)
from patchproto.methods.matching import MatchingNetworks
from patchproto.methods.patchproto import PatchProtoNetworks
from patchproto.methods.protonet import PrototypicalNetworks
from patchproto.methods.simpleshot import SimpleShot
from patchproto.selection import select_patches

IMAGE_LEVEL = ["protonet", "simpleshot", "matching", "finetune"]


def features(
    key: str,
    patches: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> ImageFeatures:
    """ImageFeatures with the mean patch as the pooled feature unless one is given."""
    grid = grid or (1, len(patches))
    pooled = patches.mean(dim=0) if pooled is None else pooled
    seg, gt = pooled.clone(), pooled.clone()
    return ImageFeatures(key, patches, grid, scores, pooled, seg_pooled=seg, gt_pooled=gt)


def random_images(count: int, seed: int, patches: int = 12, dim: int = 6) -> list[ImageFeatures]:
    generator = torch.Generator().manual_seed(seed)
    return [
        features(
            f"img{seed}-{i}",
            torch.randn(patches, dim, generator=generator),
            torch.randn(patches, generator=generator) * 2,
            grid=(3, patches // 3),
        )
        for i in range(count)
    ]


def clusters(
    ways: int, shots: int, queries: int, seed: int = 0, dim: int = 16
) -> tuple[list[ImageFeatures], list[int], list[ImageFeatures], list[int]]:
    """Well-separated Gaussian clusters of pooled features (centres 10 apart, noise 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, dim, generator=generator) * 10
    support, support_labels, query, query_labels = [], [], [], []
    for label in range(ways):
        for i in range(shots + queries):
            pooled = centres[label] + 0.5 * torch.randn(dim, generator=generator)
            image = features(f"c{label}-{i}", torch.zeros(4, 2), torch.zeros(4), pooled=pooled)
            if i < shots:
                support.append(image)
                support_labels.append(label)
            else:
                query.append(image)
                query_labels.append(label)
    return support, support_labels, query, query_labels


def equation1_loop(
    support: Sequence[ImageFeatures],
    labels: Sequence[int],
    query: ImageFeatures,
    gamma: float,
    m: int | None,
    normalize: bool,
) -> list[float]:
    """Equation 1 written as nested loops over classes, support images and patches."""
    selected = select_patches(query.patches, query.patch_scores, gamma, m)
    weights = selected.weights / selected.weights.sum() if normalize else selected.weights
    out = []
    for label in range(max(labels) + 1):
        images = [s for s, y in zip(support, labels, strict=True) if y == label]
        total = 0.0
        for image in images:
            prototype = select_patches(image.patches, image.patch_scores, gamma, m).embeddings
            for i in range(len(selected)):
                nearest = min(
                    1.0 - float(torch.cosine_similarity(selected.embeddings[i], z, dim=0))
                    for z in prototype
                )
                total += float(weights[i]) * nearest
        out.append(total / len(images))
    return out


# --- PatchProto networks ---------------------------------------------------------------------


# Support patch sets are padded to one length (and masked), or kept ragged and reduced by a
# scatter, depending on their lengths; both layouts must give Equation 1.
LAYOUTS = pytest.mark.parametrize("pad_slack", [0.0, 100.0], ids=["ragged", "padded"])


@LAYOUTS
@pytest.mark.parametrize(("gamma", "m", "normalize"), [(0.7, 5, True), (0.9, None, False)])
def test_equation1_matches_a_direct_loop(
    gamma: float, m: int | None, normalize: bool, pad_slack: float, monkeypatch
) -> None:
    monkeypatch.setattr(patchproto_module, "_PAD_SLACK", pad_slack)
    support = random_images(7, seed=1)
    labels = [0, 1, 2, 0, 1, 2, 0]  # class 0 has three shots, the others two
    queries = random_images(5, seed=2)
    method = PatchProtoNetworks(gamma=gamma, m=m, normalize_weights=normalize)
    got = method.fit(support, labels).distances(queries)
    assert method._padded == (pad_slack > 1)
    expected = torch.tensor(
        [equation1_loop(support, labels, q, gamma, m, normalize) for q in queries]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@LAYOUTS
def test_support_distances_are_the_inner_sum_per_support_image(pad_slack, monkeypatch) -> None:
    monkeypatch.setattr(patchproto_module, "_PAD_SLACK", pad_slack)
    support, queries = random_images(5, seed=5), random_images(3, seed=6)
    method = PatchProtoNetworks(gamma=0.8, m=6).fit(support, [0, 1, 1, 0, 1])

    got = method.support_distances(queries)

    expected = torch.tensor(
        [[equation1_loop([s], [0], q, 0.8, 6, True)[0] for s in support] for q in queries]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    class_means = torch.stack([got[:, [0, 3]].mean(dim=1), got[:, [1, 2, 4]].mean(dim=1)], 1)
    torch.testing.assert_close(method.distances(queries), class_means)


def test_equation1_is_the_same_when_the_queries_are_chunked(monkeypatch) -> None:
    support, queries = random_images(6, seed=3), random_images(9, seed=4)
    labels = [0, 1, 0, 1, 2, 2]
    whole = PatchProtoNetworks(gamma=0.8, m=4).fit(support, labels).distances(queries)
    monkeypatch.setattr(patchproto_module, "_MAX_PAIRS", 30)  # a few query patches per chunk
    chunked = PatchProtoNetworks(gamma=0.8, m=4).fit(support, labels).distances(queries)
    torch.testing.assert_close(whole, chunked)


def shared_background_task() -> tuple[
    list[ImageFeatures], list[int], list[ImageFeatures], list[int]
]:
    """Two defect types on two backgrounds, with the backgrounds swapped in the queries.

    Each image has 30 background patches (one of two textures, with noise) and 3 defect patches
    (one of two directions) that score high. The support of class 0 shows defect A on texture 1,
    class 1 shows defect B on texture 2; every query shows its defect on the *other* texture.
    The pooled feature, the mean patch, is dominated by the background.
    """
    generator = torch.Generator().manual_seed(5)
    dim = 8
    texture = [torch.zeros(dim), torch.zeros(dim)]
    texture[0][0], texture[1][1] = 5.0, 5.0
    defect = [torch.zeros(dim), torch.zeros(dim)]
    defect[0][2], defect[1][3] = 5.0, 5.0

    def image(key: str, background: int, kind: int) -> ImageFeatures:
        normal = texture[background] + 0.3 * torch.randn(30, dim, generator=generator)
        anomalous = defect[kind] + 0.3 * torch.randn(3, dim, generator=generator)
        scores = torch.cat(
            [torch.rand(30, generator=generator), 6 + torch.rand(3, generator=generator)]
        )
        order = torch.randperm(33, generator=generator)
        return features(key, torch.cat([normal, anomalous])[order], scores[order])

    support = [image("s0", 0, 0), image("s1", 1, 1)]
    queries, truth = [], []
    for i in range(6):
        queries += [image(f"qa{i}", 1, 0), image(f"qb{i}", 0, 1)]
        truth += [0, 1]
    return support, [0, 1], queries, truth


def test_patchproto_sees_the_defect_where_pooled_features_see_the_background() -> None:
    support, labels, queries, truth = shared_background_task()
    patchproto = PatchProtoNetworks(gamma=0.9, m=8).fit(support, labels).predict(queries)
    protonet = PrototypicalNetworks().fit(support, labels).predict(queries)
    assert patchproto.labels.tolist() == truth
    assert protonet.labels.tolist() == [1 - t for t in truth]  # fooled by the background


@LAYOUTS
def test_explain_reports_the_selected_patches_and_their_nearest_matches(
    pad_slack: float, monkeypatch
) -> None:
    monkeypatch.setattr(patchproto_module, "_PAD_SLACK", pad_slack)
    support, labels, queries, _ = shared_background_task()
    method = PatchProtoNetworks(gamma=0.9, m=8).fit(support, labels)
    query = queries[0]
    report = method.explain(query)

    assert report["label"] == 0
    torch.testing.assert_close(torch.tensor(report["distances"]), method.distances([query])[0])
    top = torch.sort(query.patch_scores, descending=True, stable=True).indices[:3].tolist()
    assert [p["index"] for p in report["patches"]][:3] == top
    assert sum(p["weight"] for p in report["patches"]) == pytest.approx(1.0)
    for label in (0, 1):
        share = sum(p["nearest"][label]["contribution"] for p in report["patches"])
        assert share == pytest.approx(report["distances"][label], abs=1e-5)
    best = report["patches"][0]["nearest"][0]
    assert best["support"] == 0 and best["key"] == "s0"
    # The nearest support patch of a defect patch is one of that support image's defect patches.
    assert (
        best["patch"] in torch.sort(support[0].patch_scores, descending=True).indices[:3].tolist()
    )
    assert [s["key"] for s in report["support"]] == ["s0", "s1"]


def test_patchproto_rejects_mismatched_patches_and_scores() -> None:
    image = ImageFeatures("bad", torch.zeros(4, 2), (2, 2), torch.zeros(5), torch.zeros(2))
    with pytest.raises(ValueError, match="'bad'"):
        PatchProtoNetworks().fit([image], [0])


def test_patchproto_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="gamma=2"):
        PatchProtoNetworks(gamma=2)
    with pytest.raises(ValueError, match="m=0"):
        make_method("patchproto", m=0)


# --- image-level baselines ----------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_LEVEL + ["seg_proto", "gt_proto", "patchproto"])
def test_every_method_separates_well_separated_clusters(name: str) -> None:
    support, labels, queries, truth = clusters(ways=4, shots=3, queries=8)
    if name == "patchproto":  # clusters in the patch embeddings instead of the pooled features
        support = [features(s.key, s.pooled.repeat(3, 1), torch.zeros(3)) for s in support]
        queries = [features(q.key, q.pooled.repeat(3, 1), torch.zeros(3)) for q in queries]
    prediction = make_method(name).fit(support, labels).predict(queries)
    assert prediction.labels.tolist() == truth


@pytest.mark.parametrize("name", list(METHODS))
def test_prediction_shapes_and_confidences(name: str) -> None:
    support, labels, queries, _ = clusters(ways=3, shots=2, queries=2, seed=7)
    support = [features(s.key, torch.randn(6, 4), torch.randn(6), s.pooled) for s in support]
    queries = [features(q.key, torch.randn(6, 4), torch.randn(6), q.pooled) for q in queries]
    method = make_method(name).fit(support, labels)
    prediction = method.predict(queries)
    assert prediction.distances.shape == (6, 3)
    assert prediction.labels.shape == (6,)
    assert prediction.confidences.shape == (6, 3)
    torch.testing.assert_close(prediction.confidences.sum(dim=1), torch.ones(6))
    assert torch.equal(prediction.labels, prediction.distances.argmin(dim=1))
    assert method.distances([]).shape == (0, 3)


@pytest.mark.parametrize("name", list(METHODS))
def test_support_errors(name: str) -> None:
    support, labels, _, _ = clusters(ways=2, shots=1, queries=0)
    with pytest.raises(ValueError, match="labels"):
        make_method(name).fit(support, labels[:1])
    with pytest.raises(ValueError, match="empty"):
        make_method(name).fit([], [])
    with pytest.raises(ValueError, match="no support example"):
        make_method(name).fit(support, [0, 2])
    with pytest.raises(RuntimeError, match="fit"):
        make_method(name).distances(support)


def test_prototypical_networks_use_the_squared_distance_to_the_class_mean() -> None:
    def image(key: str, x: list[float]) -> ImageFeatures:
        return features(key, torch.zeros(1, 2), torch.zeros(1), pooled=torch.tensor(x))

    support = [image("a", [0.0, 0.0]), image("b", [2.0, 0.0]), image("c", [0.0, 4.0])]
    distances = PrototypicalNetworks().fit(support, [0, 0, 1]).distances([image("q", [1.0, 1.0])])
    torch.testing.assert_close(distances, torch.tensor([[1.0, 10.0]]))


def test_simpleshot_centres_on_the_support_mean() -> None:
    support, labels, queries, _ = clusters(ways=3, shots=3, queries=4, seed=2)
    shift = torch.full((16,), 50.0)
    moved = [
        features(i.key, i.patches, i.patch_scores, i.pooled + shift) for i in support + queries
    ]
    plain = SimpleShot().fit(support, labels).distances(queries)
    shifted = SimpleShot().fit(moved[: len(support)], labels).distances(moved[len(support) :])
    torch.testing.assert_close(plain, shifted, atol=1e-4, rtol=1e-4)

    # Hand-computed CL2N on one query.
    method = SimpleShot().fit(support, labels)
    stacked = torch.stack([s.pooled for s in support]).double()
    unit = torch.nn.functional.normalize(stacked - stacked.mean(0), dim=1)
    centroid = torch.nn.functional.normalize(unit[:3].mean(0), dim=0)
    query = torch.nn.functional.normalize(queries[0].pooled.double() - stacked.mean(0), dim=0)
    assert float(method.distances(queries[:1])[0, 0]) == pytest.approx(
        float((query - centroid).norm()), abs=1e-5
    )


def test_matching_networks_sum_the_cosine_attention_per_class() -> None:
    support, labels, queries, _ = clusters(ways=3, shots=2, queries=1, seed=4)
    support_labels = [0, 0, 1, 1, 2, 2]
    method = MatchingNetworks().fit(support, support_labels)
    s = torch.nn.functional.normalize(torch.stack([i.pooled for i in support]).double(), dim=1)
    q = torch.nn.functional.normalize(torch.stack([i.pooled for i in queries]).double(), dim=1)
    attention = torch.softmax(q @ s.T, dim=1)
    probability = attention @ torch.nn.functional.one_hot(torch.tensor(support_labels)).double()
    torch.testing.assert_close(method.predict(queries).confidences, probability.float())


def test_finetune_is_seeded() -> None:
    support, labels, queries, _ = clusters(ways=3, shots=2, queries=2, seed=6)
    first = make_method("finetune", seed=1).fit(support, labels).distances(queries)
    again = make_method("finetune", seed=1).fit(support, labels).distances(queries)
    other = make_method("finetune", seed=2).fit(support, labels).distances(queries)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_finetune_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="epochs=0"):
        make_method("finetune", epochs=0)
    with pytest.raises(ValueError, match="lr=-1"):
        make_method("finetune", lr=-1)


@pytest.mark.parametrize(
    ("method", "field"), [(SegmentationProto, "seg_pooled"), (GroundTruthProto, "gt_pooled")]
)
def test_masked_prototypes_read_their_own_features(method: type, field: str) -> None:
    support, labels, queries, truth = clusters(ways=2, shots=2, queries=3, seed=8)
    # Whole-image features that say nothing; the masked features hold the clusters.
    for image in support + queries:
        setattr(image, field, image.pooled)
        image.pooled = torch.zeros_like(image.pooled)
    assert method().fit(support, labels).predict(queries).labels.tolist() == truth

    setattr(support[1], field, None)
    with pytest.raises(ValueError, match=f"'c0-1' has no {field}"):
        method().fit(support, labels)


def test_make_method_lists_the_names() -> None:
    with pytest.raises(ValueError, match="patchproto, protonet, simpleshot"):
        make_method("protonets")
    with pytest.raises(ValueError, match="does not take"):
        make_method("protonet", gamma=0.5)
    assert isinstance(make_method("patchproto", gamma=0.3), PatchProtoNetworks)


# --- masking helpers ------------------------------------------------------------------------------


def test_mask_image_paints_outside_the_mask_white() -> None:
    image = Image.new("L", (4, 2), 10)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    out = np.asarray(mask_image(image, mask))
    assert out.shape == (2, 4, 3)
    assert (out[0, :2] == 10).all() and (out[0, 2:] == 255).all() and (out[1] == 255).all()
    assert (np.asarray(mask_image(image, np.zeros((2, 4), bool))) == 255).all()


def test_mask_image_resizes_a_mask_of_another_size() -> None:
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    mask = np.array([[True, False], [True, False]])  # left half
    out = np.asarray(mask_image(image, mask))
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 255).all()
    with pytest.raises(ValueError, match="2-D"):
        mask_image(image, np.zeros((2, 2, 2)))


def test_white_image() -> None:
    image = white_image((5, 3))
    assert image.size == (5, 3) and image.mode == "RGB"
    assert (np.asarray(image) == 255).all()
    with pytest.raises(ValueError, match="positive"):
        white_image((0, 3))


def test_segmentation_threshold_is_a_percentile_of_normal_pixels() -> None:
    maps = [np.arange(50, dtype=float).reshape(5, 10), np.arange(50, 101, dtype=float)[None, :]]
    assert segmentation_threshold(maps, 99.0) == pytest.approx(99.0)
    assert segmentation_threshold(maps, 100.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no normal"):
        segmentation_threshold([])
    with pytest.raises(ValueError, match="percentile=0"):
        segmentation_threshold(maps, 0)


def test_segmentation_mask_thresholds_and_falls_back() -> None:
    scores = np.arange(100, dtype=float).reshape(10, 10)
    assert segmentation_mask(scores, 89.5).sum() == 10
    # Threshold above every pixel: the top 1% (one pixel) is kept instead of nothing.
    fallback = segmentation_mask(scores, 1000.0)
    assert fallback.sum() == 1 and fallback[9, 9]
    assert segmentation_mask(scores, 1000.0, min_fraction=0.05).sum() == 5
    assert segmentation_mask(scores, 1000.0, min_fraction=0.0).sum() == 0
    # No threshold: halfway between the map's minimum and maximum.
    assert segmentation_mask(scores, None).sum() == 50
    assert segmentation_mask(np.ones((3, 3)), None).all()
    with pytest.raises(ValueError, match="2-D"):
        segmentation_mask(np.zeros(4), 0.5)


def test_finetune_follows_torch_sgd() -> None:
    """The hand-written SGD step equals torch.optim.SGD with autograd on the same batches."""
    from patchproto.methods.finetune import Finetune

    support, labels, _, _ = clusters(ways=3, shots=3, queries=0, seed=9)
    method = Finetune(epochs=3, seed=4).fit(support, labels)

    features = torch.stack([s.pooled for s in support])
    targets = torch.tensor(labels)
    generator = torch.Generator().manual_seed(4)
    bound = 1.0 / features.shape[1] ** 0.5
    weight = (
        (torch.rand(3, features.shape[1], generator=generator) * 2 - 1) * bound
    ).requires_grad_()
    bias = ((torch.rand(3, generator=generator) * 2 - 1) * bound).requires_grad_()
    optimizer = torch.optim.SGD(
        [weight, bias], lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001
    )
    for _ in range(3):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), 4):
            batch = order[start : start + 4]
            loss = torch.nn.functional.cross_entropy(
                features[batch] @ weight.T + bias, targets[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.testing.assert_close(method.weight, weight.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(method.bias, bias.detach(), atol=1e-5, rtol=1e-4)
