"""PatchCore building blocks against anomalib 2.7: correctness and speed in one run.

On the same real patch embeddings (normal images of one category) this measures:

- the greedy k-center coreset: our ``greedy_coreset`` against anomalib's ``KCenterGreedy``,
  wall and CPU time, and the coverage radius of each selection in the full embedding space;
- nearest-neighbour patch scores: our ``MemoryBank.patch_scores`` against anomalib's
  ``PatchcoreModel.nearest_neighbors`` on the same memory bank and the same test patches;
- patch scoring time per image, embedding time per image for each backbone, and memory.

Run it in the benchmark environment, which has anomalib (see ``benchmarks/README.md``)::

    .venv-bench/bin/python benchmarks/bench_patchcore.py --out runs/bench.json

It prints Markdown tables and exits with status 1 when a check fails: coreset speed-up at
least 5x, coverage radius at most 1.10 times anomalib's, patch scores within 1e-4 (relative).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# anomalib's coreset loop draws a tqdm bar per step; keep the tables readable.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from patchproto.backbones import BACKBONES, WeightsError, load_backbone  # noqa: E402
from patchproto.cache import FeatureCache, default_cache_dir  # noqa: E402
from patchproto.coreset import coverage_radius, greedy_coreset  # noqa: E402
from patchproto.datasets import Category, default_data_root, load_category  # noqa: E402
from patchproto.embedding import PatchEmbedder  # noqa: E402
from patchproto.images import load_image  # noqa: E402
from patchproto.patchcore import MemoryBank  # noqa: E402

logger = logging.getLogger("bench_patchcore")

CORESET_RATIO = 0.1
MIN_SPEEDUP = 5.0
MAX_COVERAGE_RATIO = 1.10
MAX_RELATIVE_DIFF = 1e-4
DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "resnet18", "wide_resnet50_2")


# ----------------------------------------------------------------------------- measuring


class RssSampler:
    """Samples the resident set size in a thread, to give the peak RSS of each stage.

    ``getrusage`` only gives the process-wide peak so far, which hides what a later stage
    needs; the sampler reads ``/proc/self/statm`` every ``interval`` seconds instead (torch
    and faiss release the GIL, so the thread keeps running during their work).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.available = Path("/proc/self/statm").is_file()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """Current resident set size in bytes (0 where /proc is absent)."""
        if not self.available:
            return 0
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> int:
        """Start a new stage; returns the RSS at its start."""
        now = self.rss()
        self.peak = now
        return now


@dataclass
class Stage:
    """Wall time, CPU time (all threads of the process) and memory of one timed block."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    maxrss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _maxrss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def measure(sampler: RssSampler) -> Iterator[Stage]:
    """Time a block and record its peak RSS."""
    stage = Stage(rss_start_mb=sampler.reset() / 2**20)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield stage
    finally:
        stage.wall_s = time.perf_counter() - wall
        stage.cpu_s = time.process_time() - cpu
        stage.rss_peak_mb = max(sampler.peak, sampler.rss()) / 2**20
        stage.maxrss_mb = _maxrss_mb()


# ----------------------------------------------------------------------------- anomalib


def _anomalib() -> tuple[Any, Any, str]:
    """anomalib's coreset sampler and PatchCore torch model, with its version."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import anomalib
            from anomalib.models.components.sampling import KCenterGreedy
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError as error:
        msg = (
            f"anomalib is not installed in this environment ({error}). Run the benchmark with "
            "the benchmark environment: see benchmarks/README.md (.venv-bench)"
        )
        raise SystemExit(msg) from error
    return KCenterGreedy, PatchcoreModel, anomalib.__version__


def _anomalib_nearest(patchcore_model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """anomalib's own nearest-neighbour distance (k = 1) against its memory bank."""

    def nearest(patches: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            scores, _ = patchcore_model.nearest_neighbors(patches, n_neighbors=1)
        return scores

    return nearest


# ----------------------------------------------------------------------------- stages


def embed_bank(
    category: Category, count: int, backbone: str, cache_dir: Path | None
) -> tuple[torch.Tensor, Stage, FeatureCache]:
    """Patch embeddings of the first ``count`` normal training images, through the cache."""
    paths = category.train_good[:count]
    if len(paths) < count:
        logger.warning("only %d normal images in %s", len(paths), category.root)
    cache = FeatureCache(PatchEmbedder(load_backbone(backbone)), cache_dir)
    sampler = RssSampler().start()
    try:
        with measure(sampler) as stage:
            embeddings = cache.embed_files(paths)
            patches = torch.cat([e.patches for e in embeddings]).float().contiguous()
    finally:
        sampler.stop()
    stage.extra = {"images": len(paths), "cache_hits": cache.hits, "cache_misses": cache.misses}
    return patches, stage, cache


def compare_coresets(patches: torch.Tensor, seed: int, sampler: RssSampler) -> dict[str, Any]:
    """Our greedy coreset against anomalib's KCenterGreedy on the same tensor."""
    k_center_greedy, _, _ = _anomalib()

    reference = k_center_greedy(embedding=patches, sampling_ratio=CORESET_RATIO)
    count = reference.coreset_size

    logger.info("our coreset: %d of %d", count, patches.shape[0])
    with measure(sampler) as ours_stage:
        ours = greedy_coreset(patches, count, seed=seed)

    logger.info("anomalib coreset: %d of %d (slow)", count, patches.shape[0])
    torch.manual_seed(seed)
    np.random.seed(seed)  # its sparse projection draws columns from NumPy's global generator
    with measure(sampler) as theirs_stage:
        theirs = torch.tensor(reference.select_coreset_idxs(), dtype=torch.int64)
    projected_dim = int(reference.features.shape[1])
    del reference

    logger.info("coverage radii")
    ours_radius = coverage_radius(patches, ours)
    theirs_radius = coverage_radius(patches, theirs)
    return {
        "count": count,
        "ours": ours,
        "theirs": theirs,
        "ours_stage": ours_stage,
        "theirs_stage": theirs_stage,
        "ours_unique": int(ours.unique().numel()),
        "theirs_unique": int(theirs.unique().numel()),
        "ours_radius": ours_radius,
        "theirs_radius": theirs_radius,
        "theirs_projected_dim": projected_dim,
        "speedup_wall": theirs_stage.wall_s / ours_stage.wall_s,
        "speedup_cpu": theirs_stage.cpu_s / ours_stage.cpu_s,
        "coverage_ratio": ours_radius / theirs_radius,
    }


def pick_test_images(category: Category, count: int) -> list[tuple[Path, str]]:
    """Half held-back normal images, half defective ones taken in turn from each defect type."""
    good = [(p, "good") for p in category.test_good[: count - count // 2]]
    defects: list[tuple[Path, str]] = []
    rank = 0
    while len(defects) < count // 2:
        added = False
        for kind in category.defect_types:
            samples = category.defects[kind]
            if rank < len(samples) and len(defects) < count // 2:
                defects.append((samples[rank].path, kind))
                added = True
        if not added:
            break
        rank += 1
    return good + defects


def compare_scores(
    bank: torch.Tensor,
    queries: list[torch.Tensor],
    sampler: RssSampler,
    repeats: int,
) -> dict[str, Any]:
    """Our patch scores against anomalib's nearest neighbours on one bank and one query set."""
    _, patchcore_model, _ = _anomalib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The backbone is never run: only the memory bank and the distance code are used.
        model = patchcore_model(
            layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=1
        ).eval()
    model.memory_bank = bank
    theirs_nearest = _anomalib_nearest(model)
    memory_bank = MemoryBank(coreset_ratio=1.0).load(bank)

    ours_scores = [memory_bank.patch_scores(q) for q in queries]
    theirs_scores = [theirs_nearest(q) for q in queries]
    ours_all, theirs_all = torch.cat(ours_scores).double(), torch.cat(theirs_scores).double()

    # Exact distances in float64, to tell which side a difference comes from.
    bank64 = bank.double()
    exact = torch.cat([torch.cdist(q.double(), bank64).amin(dim=1) for q in queries])
    relative = (ours_all - theirs_all).abs() / theirs_all.abs().clamp_min(1e-12)

    def per_image(score: Callable[[torch.Tensor], torch.Tensor]) -> Stage:
        with measure(sampler) as stage:
            for _ in range(repeats):
                for query in queries:
                    score(query)
        stage.wall_s /= repeats * len(queries)
        stage.cpu_s /= repeats * len(queries)
        return stage

    return {
        "patches": int(ours_all.numel()),
        "bank": int(bank.shape[0]),
        "max_relative_diff": float(relative.max()),
        "max_abs_diff": float((ours_all - theirs_all).abs().max()),
        "ours_vs_exact": float(((ours_all - exact).abs() / exact.clamp_min(1e-12)).max()),
        "theirs_vs_exact": float(((theirs_all - exact).abs() / exact.clamp_min(1e-12)).max()),
        "score_range": (float(theirs_all.min()), float(theirs_all.max())),
        "ours_stage": per_image(memory_bank.patch_scores),
        "theirs_stage": per_image(theirs_nearest),
    }


def time_backbones(
    names: list[str], paths: list[Path], batch_size: int, sampler: RssSampler
) -> list[dict[str, Any]]:
    """Embedding time per image for each backbone (images decoded beforehand)."""
    images = [load_image(p) for p in paths]
    rows = []
    for name in names:
        try:
            backbone = load_backbone(name)
            weights = "ImageNet"
        except WeightsError:
            backbone = load_backbone(name, pretrained=False)
            weights = "random (ImageNet weights absent here)"
        embedder = PatchEmbedder(backbone, batch_size=batch_size)
        embedder.embed(images[:1])  # warm-up: first-call allocations are not per-image costs

        logger.info("embedding %d images with %s", len(images), name)
        with measure(sampler) as stage:
            out = embedder.embed(images)
        rows.append(
            {
                "backbone": name,
                "weights": weights,
                "dim": int(out[0].patches.shape[1]),
                "grid": list(out[0].grid),
                "stage": stage,
                "ms_per_image": 1000 * stage.wall_s / len(images),
                "cpu_ms_per_image": 1000 * stage.cpu_s / len(images),
            }
        )
        del backbone, embedder, out
    return rows


# ----------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict[str, Any]) -> tuple[str, bool]:
    """Markdown tables of the results, and whether every check passed."""
    setup = results["setup"]
    out = [
        "## Setup",
        "",
        _table(
            ["item", "value"],
            [[key, value] for key, value in setup.items()],
        ),
    ]
    checks: list[bool] = []

    coreset = results.get("coreset")
    if coreset:
        ours, theirs = coreset["ours_stage"], coreset["theirs_stage"]
        speed_ok = coreset["speedup_wall"] >= MIN_SPEEDUP
        cover_ok = coreset["coverage_ratio"] <= MAX_COVERAGE_RATIO
        checks += [speed_ok, cover_ok]
        out += [
            "",
            f"## Coreset: {coreset['count']} of {setup['bank patches']} patches "
            f"(ratio {CORESET_RATIO}, seed {setup['seed']})",
            "",
            _table(
                [
                    "method",
                    "projection",
                    "wall s",
                    "CPU s",
                    "coverage radius",
                    "unique",
                    "peak RSS MB (start)",
                ],
                [
                    [
                        "patchproto greedy_coreset",
                        "Gaussian, 128 d",
                        f"{ours.wall_s:.1f}",
                        f"{ours.cpu_s:.1f}",
                        f"{coreset['ours_radius']:.4f}",
                        coreset["ours_unique"],
                        f"{ours.rss_peak_mb:.0f} ({ours.rss_start_mb:.0f})",
                    ],
                    [
                        "anomalib KCenterGreedy",
                        f"sparse, {coreset['theirs_projected_dim']} d",
                        f"{theirs.wall_s:.1f}",
                        f"{theirs.cpu_s:.1f}",
                        f"{coreset['theirs_radius']:.4f}",
                        coreset["theirs_unique"],
                        f"{theirs.rss_peak_mb:.0f} ({theirs.rss_start_mb:.0f})",
                    ],
                ],
            ),
            "",
            _table(
                ["check", "measured", "required", "result"],
                [
                    [
                        "speed-up (wall)",
                        f"{coreset['speedup_wall']:.1f}x (CPU time {coreset['speedup_cpu']:.1f}x)",
                        f">= {MIN_SPEEDUP:.0f}x",
                        _verdict(speed_ok),
                    ],
                    [
                        "coverage radius ours / anomalib",
                        f"{coreset['coverage_ratio']:.3f}",
                        f"<= {MAX_COVERAGE_RATIO:.2f}",
                        _verdict(cover_ok),
                    ],
                ],
            ),
        ]

    scores = results.get("scores")
    if scores:
        ok = scores["max_relative_diff"] < MAX_RELATIVE_DIFF
        checks.append(ok)
        ours, theirs = scores["ours_stage"], scores["theirs_stage"]
        low, high = scores["score_range"]
        out += [
            "",
            f"## Patch scores: {scores['patches']} patches of {setup['test images']} test "
            f"images against a bank of {scores['bank']}",
            "",
            _table(
                ["check", "measured", "required", "result"],
                [
                    [
                        "max relative diff ours vs anomalib",
                        f"{scores['max_relative_diff']:.2e}",
                        f"< {MAX_RELATIVE_DIFF:.0e}",
                        _verdict(ok),
                    ],
                ],
            ),
            "",
            _table(
                ["", "value"],
                [
                    ["max abs diff ours vs anomalib", f"{scores['max_abs_diff']:.2e}"],
                    ["max relative diff ours vs float64 exact", f"{scores['ours_vs_exact']:.2e}"],
                    [
                        "max relative diff anomalib vs float64 exact",
                        f"{scores['theirs_vs_exact']:.2e}",
                    ],
                    ["patch score range", f"{low:.3f} .. {high:.3f}"],
                ],
            ),
            "",
            _table(
                ["scoring (one image)", "ms / image", "CPU ms / image", "peak RSS MB (start)"],
                [
                    [
                        "patchproto MemoryBank.patch_scores (faiss flat L2)",
                        f"{1000 * ours.wall_s:.1f}",
                        f"{1000 * ours.cpu_s:.1f}",
                        f"{ours.rss_peak_mb:.0f} ({ours.rss_start_mb:.0f})",
                    ],
                    [
                        "anomalib PatchcoreModel.nearest_neighbors",
                        f"{1000 * theirs.wall_s:.1f}",
                        f"{1000 * theirs.cpu_s:.1f}",
                        f"{theirs.rss_peak_mb:.0f} ({theirs.rss_start_mb:.0f})",
                    ],
                ],
            ),
        ]

    backbones = results.get("backbones")
    if backbones:
        out += [
            "",
            f"## Embedding: {setup['embedding images']} images, 224 px, "
            f"batch {setup['batch size']} (decoding excluded)",
            "",
            _table(
                [
                    "backbone",
                    "weights",
                    "patch dim",
                    "grid",
                    "ms / image",
                    "CPU ms / image",
                    "peak RSS MB (start)",
                ],
                [
                    [
                        row["backbone"],
                        row["weights"],
                        row["dim"],
                        "x".join(map(str, row["grid"])),
                        f"{row['ms_per_image']:.0f}",
                        f"{row['cpu_ms_per_image']:.0f}",
                        f"{row['stage'].rss_peak_mb:.0f} ({row['stage'].rss_start_mb:.0f})",
                    ]
                    for row in backbones
                ],
            ),
        ]

    bank = results["bank_stage"]
    out += [
        "",
        "## Memory",
        "",
        f"Bank embeddings: {bank.wall_s:.1f} s ({bank.extra['cache_hits']} cache hits, "
        f"{bank.extra['cache_misses']} misses), peak RSS {bank.rss_peak_mb:.0f} MB.",
        "Peak RSS per stage: resident set sampled every 10 ms from /proc/self/statm during the "
        "stage, in MB, with the RSS at the stage's start in brackets (everything the process "
        "holds, so earlier stages' tensors are included). "
        f"Process peak (getrusage ru_maxrss): {results['maxrss_mb']:.0f} MB.",
        "Wall and CPU times share this machine with other work: load average "
        f"{setup['load average (start)']} at the start, {results['load_end']} at the end.",
    ]
    return "\n".join(out), all(checks)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stage):
        return {k: _jsonable(v) for k, v in value.__dict__.items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data root (PATCHPROTO_DATA)")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--images", type=int, default=None, help="normal images (default 200)")
    parser.add_argument("--backbone", default="efficientnet_lite2", help="for the memory bank")
    parser.add_argument(
        "--backbones",
        default=",".join(DEFAULT_BACKBONES),
        help="comma-separated backbones to time; empty to skip",
    )
    parser.add_argument("--test-images", type=int, default=None, help="default 20")
    parser.add_argument("--embed-images", type=int, default=None, help="default 16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the scoring timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and faiss threads (default 1: on a shared machine, several threads "
        "measure the other processes as much as the code)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="feature cache (PATCHPROTO_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="embed without a feature cache")
    parser.add_argument("--skip-coreset", action="store_true", help="skip the coreset stage")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20 normal images, 6 test images, 4 embedding images: a few minutes",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    quick = {"images": 20, "test_images": 6, "embed_images": 4}
    full = {"images": 200, "test_images": 20, "embed_images": 16}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    _, _, anomalib_version = _anomalib()

    root = args.data or default_data_root()
    category = load_category(root / args.category)
    cache_dir = None if args.no_cache else (args.cache or default_cache_dir())

    logger.info("bank embeddings: %d images of %s", args.images, category.name)
    patches, bank_stage, cache = embed_bank(category, args.images, args.backbone, cache_dir)
    results: dict[str, Any] = {
        "setup": {
            "data": str(root / args.category),
            "bank backbone": f"{args.backbone} ({cache.embedder.key})",
            "bank images": bank_stage.extra["images"],
            "bank patches": patches.shape[0],
            "patch dim": patches.shape[1],
            "test images": args.test_images,
            "embedding images": args.embed_images,
            "batch size": args.batch_size,
            "seed": args.seed,
            "threads (torch, faiss)": args.threads,
            "torch": torch.__version__,
            "anomalib": anomalib_version,
            "faiss": faiss.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load average (start)": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            "feature cache": str(cache_dir) if cache_dir else "none",
        },
        "bank_stage": bank_stage,
    }

    sampler = RssSampler().start()
    try:
        if not args.skip_coreset:
            results["coreset"] = compare_coresets(patches, args.seed, sampler)
            bank = patches[results["coreset"]["ours"]]
        else:
            bank = patches[greedy_coreset(patches, int(patches.shape[0] * CORESET_RATIO))]

        logger.info("patch scores")
        tests = pick_test_images(category, args.test_images)
        queries = [e.patches.float() for e in cache.embed_files([p for p, _ in tests])]
        results["scores"] = compare_scores(bank, queries, sampler, args.repeats)

        names = [n for n in args.backbones.split(",") if n]
        unknown = [n for n in names if n not in BACKBONES]
        if unknown:
            raise SystemExit(f"unknown backbones {unknown}; choose from {list(BACKBONES)}")
        results["backbones"] = time_backbones(
            names, category.train_good[: args.embed_images], args.batch_size, sampler
        )
    finally:
        sampler.stop()
    results["maxrss_mb"] = _maxrss_mb()
    results["load_end"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    text, passed = report(results)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = _jsonable(results) | {"passed": passed}
        args.out.write_text(json.dumps(payload, indent=2))
        logger.info("wrote %s", args.out)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
