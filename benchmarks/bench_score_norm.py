"""Held-out check of the patch-score normalisation, on episodes no setting was chosen on.

The position normalisation (``--score-norm position``) was found on the seed-0 episodes of
``magnetic_tile``, while looking for why PatchProto barely beat Prototypical networks there.
This script asks whether it holds on other episodes: it draws a fresh set of episodes (seed 1
by default), runs PatchProto with PatchCore's scores as they are (``none``, the paper) and with
position-normalised scores on exactly those episodes, with Prototypical networks as the
reference, and prints the episode-paired differences with their 95% intervals.

Run (features come from the shared cache, so a warm cache makes it take minutes)::

    PATCHPROTO_CACHE=/tmp/ppcache python benchmarks/bench_score_norm.py --seed 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from patchproto.cache import default_cache_dir
from patchproto.datasets import default_data_root
from patchproto.evaluation import (
    BASELINE,
    OURS,
    CategoryResult,
    EvaluationConfig,
    ci95,
    make_cache,
    run_evaluation,
)


def _by_key(results: list[CategoryResult]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    table = {}
    for category in results:
        for shot in category.shots:
            table[(category.prepared.name, shot.shots)] = {
                name: result.accuracies for name, result in shot.methods.items()
            }
    return table


def _pp(values: np.ndarray) -> str:
    half = ci95(values)
    return f"{100 * values.mean():+.1f} ± {100 * half:.1f}" if half is not None else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--shots", default="1,3,5")
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--category", action="append", default=None)
    args = parser.parse_args()

    runs = {}
    started = time.perf_counter()
    cache = None
    for norm in ("none", "position"):
        config = EvaluationConfig(
            data_root=args.root or default_data_root(),
            backbone=args.backbone,
            methods=[OURS, BASELINE],
            categories=args.category,
            shots=[int(k) for k in args.shots.split(",")],
            episodes=args.episodes,
            seed=args.seed,
            score_norm=norm,
            cache_dir=default_cache_dir(),
        )
        cache = cache or make_cache(config)
        _, results = run_evaluation(config, cache)
        runs[norm] = _by_key(results)

    print(
        f"seed {args.seed}, {args.episodes} episodes, {args.backbone}; accuracy in %, "
        "differences in points ± 95% interval, paired over the same episodes"
    )
    header = (
        "| category | K | PatchProto, scores as is | PatchProto, position-normalised | "
        "ProtoNet | position − as is | position − ProtoNet | as is − ProtoNet |"
    )
    print(header)
    print("|---" * 8 + "|")
    for key, raw in runs["none"].items():
        if OURS not in raw:
            continue
        pos = runs["position"][key]
        proto = raw[BASELINE]
        if not np.array_equal(proto, pos[BASELINE]):
            msg = f"{key}: the two runs did not draw the same episodes"
            raise RuntimeError(msg)
        cells = [
            f"{100 * raw[OURS].mean():.1f}",
            f"{100 * pos[OURS].mean():.1f}",
            f"{100 * proto.mean():.1f}",
            _pp(pos[OURS] - raw[OURS]),
            _pp(pos[OURS] - proto),
            _pp(raw[OURS] - proto),
        ]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
