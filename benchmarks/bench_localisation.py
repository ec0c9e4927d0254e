"""How well do the selected patches find the defect, and how does Equation 1 pool a class?

Two measurements on every category of the data root, with the evaluation's own features:

- Localisation: per patch-score normalisation (PatchCore's scores as they are, and
  position-normalised), the share of each defective image's top 1, 5 and 32 patches that touch
  its ground-truth mask (resized to the patch grid), with the mask's median size in patches.
  Images without a mask or with an empty one are left out.
- Pooling over a class's support images: Equation 1 averages a query's distances to the support
  images of a class; the alternative takes the nearest support image. Both are scored on the
  same seeded episodes at K = 3 and 5 (at K = 1 they are the same), with the paired difference,
  and the share of predictions per type, against the share of queries, for the mean.

Run with the package's environment::

    PATCHPROTO_CACHE=/tmp/ppcache .venv/bin/python benchmarks/bench_localisation.py --seeds 0,1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from patchproto.cache import default_cache_dir
from patchproto.datasets import default_data_root, load_mvtec
from patchproto.episodes import sample_episodes
from patchproto.evaluation import (
    EvaluationConfig,
    PreparedCategory,
    ci95,
    episode_features,
    make_cache,
)
from patchproto.images import load_mask
from patchproto.methods import make_method

TOP = (1, 5, 32)


def localisation(prepared: PreparedCategory) -> tuple[dict[int, float], float, int]:
    """Mean share of the top patches touching the mask, the median mask size, images used."""
    shares: dict[int, list[float]] = {k: [] for k in TOP}
    sizes = []
    for sample, features in zip(prepared.samples, prepared.features, strict=True):
        if sample.mask is None:
            continue
        mask = load_mask(sample.mask)
        if not mask.any():
            continue
        grid_mask = F.interpolate(
            torch.from_numpy(mask.astype(np.float32))[None, None], size=features.grid, mode="area"
        )[0, 0].flatten()
        inside = grid_mask > 0
        order = torch.argsort(features.patch_scores, descending=True, stable=True)
        for k in TOP:
            shares[k].append(float(inside[order[:k]].float().mean()))
        sizes.append(int(inside.sum()))
    return {k: float(np.mean(v)) for k, v in shares.items()}, float(np.median(sizes)), len(sizes)


def pooling(prepared: PreparedCategory, shots: int, episodes: int, seed: int) -> dict:
    """Accuracy per episode with the class mean (Equation 1) and the nearest support image."""
    drawn = sample_episodes(prepared.labels, shots, episodes, seed, stream=prepared.name)
    ways = len(drawn.ways)
    mean_acc, nearest_acc = [], []
    predicted = np.zeros(ways)
    truth_count = np.zeros(ways)
    for episode in drawn.episodes:
        support, ways_of_support, queries, ways_of_queries = episode_features(prepared, episode)
        labels, truth = torch.tensor(ways_of_support), torch.tensor(ways_of_queries)
        method = make_method("patchproto").fit(support, ways_of_support)
        per_image = method.support_distances(queries)
        by_mean = torch.stack([per_image[:, labels == c].mean(dim=1) for c in range(ways)], 1)
        by_nearest = torch.stack([per_image[:, labels == c].amin(dim=1) for c in range(ways)], 1)
        mean_acc.append(float((by_mean.argmin(dim=1) == truth).float().mean()))
        nearest_acc.append(float((by_nearest.argmin(dim=1) == truth).float().mean()))
        predicted += np.bincount(by_mean.argmin(dim=1).numpy(), minlength=ways)
        truth_count += np.bincount(truth.numpy(), minlength=ways)
    difference = np.array(nearest_acc) - np.array(mean_acc)
    return {
        "ways": drawn.ways,
        "mean": float(np.mean(mean_acc)),
        "nearest": float(np.mean(nearest_acc)),
        "difference": float(difference.mean()),
        "ci95": ci95(difference),
        "predicted_share": predicted / predicted.sum(),
        "query_share": truth_count / truth_count.sum(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seeds", default="0,1", help="episode seeds, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]

    print("| category | scores | top 1 in mask | top 5 | top 32 | mask size (patches) | images |")
    print("|---|---|---|---|---|---|---|")
    prepared_position = {}
    cache = None
    for norm in ("none", "position"):
        config = EvaluationConfig(
            args.data, args.backbone, ["patchproto"], cache_dir=default_cache_dir(), score_norm=norm
        )
        cache = cache or make_cache(config)
        for category in load_mvtec(args.data):
            prepared = config.prepare(category, cache)
            shares, size, count = localisation(prepared)
            cells = " | ".join(f"{100 * shares[k]:.1f}%" for k in TOP)
            print(f"| {category.name} | {norm} | {cells} | {size:g} | {count} |")
            if norm == "position":
                prepared_position[category.name] = prepared

    print("\nPatchProto (position-normalised, gamma 1, m 32): class mean (Equation 1) against the")
    print("nearest support image, accuracy in %, difference in points ± 95% interval, paired")
    print(
        "| category | K | seed | class mean | nearest image | nearest − mean "
        "| predicted / true share |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, prepared in prepared_position.items():
        for shots in (3, 5):
            for seed in seeds:
                found = pooling(prepared, shots, args.episodes, seed)
                shares = ", ".join(
                    f"{way} {100 * p:.0f}/{100 * q:.0f}"
                    for way, p, q in zip(
                        found["ways"], found["predicted_share"], found["query_share"], strict=True
                    )
                )
                print(
                    f"| {name} | {shots} | {seed} | {100 * found['mean']:.1f} | "
                    f"{100 * found['nearest']:.1f} | {100 * found['difference']:+.1f} ± "
                    f"{100 * found['ci95']:.1f} | {shares} |"
                )
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
