"""Do our image-level baselines predict what easyfsl predicts, given the very same features?

Over many random episodes, our Prototypical networks, SimpleShot and Matching networks classify
the queries; easyfsl's ``PrototypicalNetworks``, ``SimpleShot`` and ``MatchingNetworks`` (with
an identity backbone, so they see the same feature vectors) classify them too, through
``process_support_set`` and ``forward``. The script prints the share of queries on which the
predicted classes agree, per method and number of shots.

How each pair is made comparable:

- Prototypical networks: easyfsl as it is (it ranks by Euclidean distance, ours by its square).
- SimpleShot: easyfsl with ``feature_centering`` = the episode's support mean and
  ``feature_normalization=2``, which is the CL2N transform of ours. easyfsl ranks by the cosine
  to the class centroid; ours by the Euclidean distance to the centroid scaled to unit length,
  which ranks the same.
- Matching networks: easyfsl's full-context embeddings are LSTMs that only make sense once
  meta-trained, so they are switched off (the encoders are the identity) and
  ``feature_normalization=2`` makes easyfsl's query-times-normalised-support product the cosine.
  What is compared is easyfsl's attention and per-class sum against ours.

Features: the real pooled features (efficientnet_lite2, 224 px) of every ``magnetic_tile``
defect image, through the shared feature cache, and synthetic Gaussian classes that overlap.

Run with the environment that has easyfsl::

    PATCHPROTO_CACHE=/tmp/ppcache .venv-bench/bin/python benchmarks/bench_easyfsl.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from easyfsl.methods import MatchingNetworks as EasyMatching
from easyfsl.methods import PrototypicalNetworks as EasyProto
from easyfsl.methods import SimpleShot as EasySimpleShot
from torch import nn

from patchproto.backbones import load_backbone
from patchproto.cache import FeatureCache, default_cache_dir
from patchproto.datasets import default_data_root, load_category
from patchproto.embedding import PatchEmbedder
from patchproto.methods import ImageFeatures, make_method


class PlainMatching(EasyMatching):
    """easyfsl's Matching networks without the (untrained) full-context embeddings."""

    def encode_support_features(self, support_features: torch.Tensor) -> torch.Tensor:
        return support_features

    def encode_query_features(self, query_features: torch.Tensor) -> torch.Tensor:
        return query_features


def real_features(category: str, backbone: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and class indices of every defect image of a category."""
    data = load_category(default_data_root() / category)
    paths, labels = [], []
    for label, kind in enumerate(data.defect_types):
        for sample in data.defects[kind]:
            paths.append(Path(sample.path))
            labels.append(label)
    cache = FeatureCache(PatchEmbedder(load_backbone(backbone)), default_cache_dir())
    embeddings = cache.embed_files(paths)
    print(
        f"{category}: {len(paths)} defect images, {len(data.defect_types)} types, "
        f"cache hits {cache.hits}, misses {cache.misses}"
    )
    return torch.stack([e.pooled.float() for e in embeddings]), torch.tensor(labels)


def synthetic_features(
    ways: int, per_class: int, dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes (centres 1 apart on average, unit noise), all positive-ish."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, dim, generator=generator) * (1.0 / dim**0.5) * 1.5 + 2.0
    labels = torch.arange(ways).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator) * 0.6
    return features, labels


def wrap(vectors: torch.Tensor) -> list[ImageFeatures]:
    none = torch.zeros(1, 1)
    return [ImageFeatures(str(i), none, (1, 1), torch.zeros(1), v) for i, v in enumerate(vectors)]


def episode(
    labels: torch.Tensor, shots: int, queries: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices and episode labels of a support and a query set over every class."""
    support, support_y, query, query_y = [], [], [], []
    for way, label in enumerate(labels.unique().tolist()):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        take = min(queries, len(members) - shots)
        support += members[:shots].tolist()
        query += members[shots : shots + take].tolist()
        support_y += [way] * shots
        query_y += [way] * take
    return (
        torch.tensor(support),
        torch.tensor(support_y),
        torch.tensor(query),
        torch.tensor(query_y),
    )


def compare(
    name: str, features: torch.Tensor, labels: torch.Tensor, episodes: int, queries: int, seed: int
) -> None:
    dim = features.shape[1]
    easy_matching = PlainMatching(
        nn.Identity(),
        feature_dimension=dim,
        support_encoder=nn.Identity(),
        query_encoder=nn.Identity(),
        feature_normalization=2,
    )
    for shots in (1, 3, 5):
        generator = torch.Generator().manual_seed(seed + shots)
        agree = {"protonet": 0, "simpleshot": 0, "matching": 0}
        correct = {"protonet": 0, "simpleshot": 0, "matching": 0}
        total = 0
        started = time.perf_counter()
        for _ in range(episodes):
            s_idx, s_y, q_idx, q_y = episode(labels, shots, queries, generator)
            support, query = features[s_idx], features[q_idx]
            easy = {
                "protonet": EasyProto(nn.Identity()),
                "simpleshot": EasySimpleShot(
                    nn.Identity(), feature_centering=support.mean(dim=0), feature_normalization=2
                ),
                "matching": easy_matching,
            }
            for method, reference in easy.items():
                ours = make_method(method).fit(wrap(support), s_y.tolist()).predict(wrap(query))
                with torch.no_grad():
                    reference.process_support_set(support, s_y)
                    theirs = reference(query).argmax(dim=1)
                agree[method] += int((ours.labels == theirs).sum())
                correct[method] += int((ours.labels == q_y).sum())
            total += len(q_idx)
        seconds = time.perf_counter() - started
        print(f"{name} {shots}-shot: {episodes} episodes, {total} queries ({seconds:.1f} s)")
        for method in agree:
            print(
                f"  {method:<10} agreement {100 * agree[method] / total:6.2f}%"
                f"  (our accuracy {100 * correct[method] / total:5.1f}%)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--queries", type=int, default=10, help="queries per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-real", action="store_true", help="synthetic features only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    features, labels = synthetic_features(ways=5, per_class=40, dim=64, seed=args.seed)
    compare("synthetic", features, labels, args.episodes, args.queries, args.seed)
    if not args.skip_real:
        features, labels = real_features(args.category, args.backbone)
        compare(args.category, features, labels, args.episodes, args.queries, args.seed)


if __name__ == "__main__":
    main()
