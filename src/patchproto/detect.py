"""The ``detect`` job: PatchCore anomaly detection on every category of an MVTec AD layout root.

For each category, the patch embeddings of ``train/good`` form the memory bank (after a greedy
coreset), every ``test/`` image is scored, and the job reports the image AUROC (an image's score
is its highest patch score, good against defective) and the pixel AUROC (anomaly maps against
the ground-truth masks), as in Roth et al., "Towards Total Recall in Industrial Anomaly
Detection" (CVPR 2022), Section 4.1.

Pixel AUROC is computed at the network input size (224 x 224 by default) on the images as the
network sees them: the anomaly map of the resized image against its mask resized with nearest
neighbour. ``test/good`` images count as all-zero masks. A defective image without a mask file,
or whose mask has no defect pixel at that size (an empty mask: the defect was not localised; or
a mask of a pixel or two that the resizing drops), is left out of the pixel AUROC and listed in
``pixel_auroc_excluded``: counting it as all-zero would mark its defect pixels as normal and
punish a map that finds them. It still counts for the image AUROC.

Unreadable images are logged, skipped and listed in ``detection.json``; they never stop the run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from sklearn.metrics import roc_auc_score

from patchproto import options as opt
from patchproto.backbones import Backbone, WeightsError, load_backbone
from patchproto.cache import (
    FeatureCache,
    atomic_write_bytes,
    bank_key,
    content_key,
    default_cache_dir,
)
from patchproto.coreset import DEFAULT_PROJECTION_DIM, coreset_size
from patchproto.datasets import GOOD, Category, DatasetError, Sample, load_mvtec
from patchproto.embedding import DEFAULT_IMAGE_SIZE, Embedding, PatchEmbedder
from patchproto.images import ImageError, load_image, load_mask
from patchproto.patchcore import DEFAULT_CORESET_RATIO, MemoryBank, anomaly_map, image_score
from patchproto.visualize import overlay_heatmap, side_by_side

logger = logging.getLogger(__name__)

RESULTS_FILE = "detection.json"
OVERLAYS_PER_TYPE = 2

Advance = Callable[[int], None]
# ``progress(description, total)`` is a context manager yielding ``advance(n)``, like
# :func:`patchproto.cli.progress_bar`; the library itself never prints.
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:
    """A progress factory that shows nothing."""
    yield lambda n=1: None


@dataclass
class _Scored:
    """One test image after scoring."""

    sample: Sample
    score: float
    heatmap: np.ndarray


def _embed_paths(
    cache: FeatureCache, paths: Sequence[Path], advance: Advance
) -> tuple[list[tuple[int, Embedding]], list[dict[str, str]], list[str]]:
    """Embed files in batches, skipping (and reporting) those that cannot be read.

    Returns:
        ``(index into paths, embedding)`` for every readable file, ``{path, error}`` for
        every skipped one, and the content key of every readable file.
    """
    embedded: list[tuple[int, Embedding]] = []
    found_keys: list[str] = []
    skipped: list[dict[str, str]] = []
    step = cache.embedder.batch_size
    for start in range(0, len(paths), step):
        indices, images, keys = [], [], []
        for index in range(start, min(start + step, len(paths))):
            path = paths[index]
            try:
                data = Path(path).read_bytes()
                # Decoding here (even on a cache hit) is what finds a corrupt file early.
                images.append(load_image(data, name=str(path)))
            except (ImageError, OSError) as error:
                logger.warning("Skipping %s: %s", path, error)
                skipped.append({"path": str(path), "error": str(error)})
                advance(1)
                continue
            indices.append(index)
            keys.append(content_key(data))
        if indices:
            embeddings = cache.embed_images(images, keys, on_image=advance)
            embedded.extend(zip(indices, embeddings, strict=True))
            found_keys.extend(keys)
    return embedded, skipped, found_keys


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or ``None`` when only one class is present."""
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def _ground_truth(sample: Sample, size: int) -> np.ndarray | None:
    """The mask on the network input grid; ``None`` when it cannot serve for pixel AUROC."""
    if sample.label == GOOD:
        return np.zeros((size, size), dtype=bool)
    if sample.mask is None:
        return None
    try:
        mask = load_mask(sample.mask, (size, size))
    except ImageError as error:
        logger.warning("Ignoring mask %s: %s", sample.mask, error)
        return None
    return mask if mask.any() else None


def _write_overlays(
    folder: Path, scored: Sequence[_Scored], value_range: tuple[float, float]
) -> list[str]:
    """Save image | heatmap overlay pairs for a few images of each test type."""
    written: list[str] = []
    by_type: dict[str, list[_Scored]] = {}
    for item in scored:
        by_type.setdefault(item.sample.label, []).append(item)
    for label in sorted(by_type):
        for item in by_type[label][:OVERLAYS_PER_TYPE]:
            try:
                image = load_image(item.sample.path)
                mask = load_mask(item.sample.mask, image.size) if item.sample.mask else None
            except ImageError as error:
                logger.warning("No overlay for %s: %s", item.sample.path, error)
                continue
            picture = side_by_side(
                [image, overlay_heatmap(image, item.heatmap, mask, value_range=value_range)]
            )
            target = folder / f"{label}_{item.sample.path.stem}.png"
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            atomic_write_bytes(target, buffer.getvalue())
            written.append(str(target))
    return written


def _write_scores(path: Path, scored: Sequence[_Scored]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "image_score"])
    for item in scored:
        writer.writerow([str(item.sample.path), item.sample.label, f"{item.score:.6f}"])
    atomic_write_bytes(path, buffer.getvalue().encode())


def detect_category(
    category: Category,
    cache: FeatureCache,
    out: Path,
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    approximate: bool = False,
    seed: int = 0,
    progress: ProgressFactory = no_progress,
) -> dict:
    """Fit a memory bank on one category's normal images and evaluate it on its test images.

    Returns:
        The category's entry of ``detection.json`` (see :func:`run_detection`).
    """
    started = time.perf_counter()
    embedder = cache.embedder
    size = embedder.image_size
    hits, misses = cache.hits, cache.misses

    with progress(f"{category.name}: embedding train/good", len(category.train_good)) as advance:
        train, skipped, train_keys = _embed_paths(cache, category.train_good, advance)
    if not train:
        msg = (
            f"{category.root / 'train' / GOOD}: none of the {len(category.train_good)} normal "
            "images could be read. Replace them with readable images"
        )
        raise DatasetError(msg)
    patch_count = sum(embedding.patches.shape[0] for _, embedding in train)
    embedded_at = time.perf_counter()

    # The bank is shared through the cache with `evaluate` (same images, ratio and seed).
    bank = MemoryBank(coreset_ratio, approximate, DEFAULT_PROJECTION_DIM, seed)
    key = bank_key(embedder.key, train_keys, coreset_ratio, seed, DEFAULT_PROJECTION_DIM)
    stored = cache.read_bank(key)
    if stored is not None:
        bank.load(stored)
    else:
        normal = torch.cat([embedding.patches for _, embedding in train])
        count = coreset_size(patch_count, coreset_ratio)
        steps = count if count < patch_count else 0
        with progress(f"{category.name}: coreset of {patch_count:,} patches", steps) as advance:
            bank.fit(normal, on_step=advance)
        del normal
        cache.write_bank(key, bank.embeddings)
    bank_size, bank_dim = bank.embeddings.shape
    fitted_at = time.perf_counter()

    samples = category.test_samples()
    scored: list[_Scored] = []
    with progress(f"{category.name}: scoring test", len(samples)) as advance:
        step = embedder.batch_size
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            embedded, bad, _ = _embed_paths(cache, [s.path for s in chunk], advance)
            skipped.extend(bad)
            if not embedded:
                continue
            # One search per batch: each search call pays a thread start-up in faiss.
            patches = torch.cat([embedding.patches for _, embedding in embedded])
            sizes = [embedding.patches.shape[0] for _, embedding in embedded]
            batch_scores = bank.patch_scores(patches).split(sizes)
            for (index, embedding), scores in zip(embedded, batch_scores, strict=True):
                heatmap = anomaly_map(scores, embedding.grid, (size, size)).astype(np.float32)
                scored.append(_Scored(chunk[index], image_score(scores), heatmap))
    scored_at = time.perf_counter()

    labels = np.array([item.sample.label != GOOD for item in scored], dtype=np.int8)
    image_scores = np.array([item.score for item in scored])
    image_auroc = _auroc(labels, image_scores)
    per_type = {
        label: _auroc(
            labels[[i for i, s in enumerate(scored) if s.sample.label in (GOOD, label)]],
            image_scores[[i for i, s in enumerate(scored) if s.sample.label in (GOOD, label)]],
        )
        for label in category.defect_types
    }

    truths, maps, excluded = [], [], []
    for item in scored:
        truth = _ground_truth(item.sample, size)
        if truth is None:
            excluded.append(str(item.sample.path))
            continue
        truths.append(truth.ravel())
        maps.append(item.heatmap.ravel())
    pixel_auroc = (
        _auroc(np.concatenate(truths).astype(np.int8), np.concatenate(maps)) if maps else None
    )
    del truths, maps
    if excluded:
        logger.info(
            "%s: %d defective images without a usable mask left out of the pixel AUROC",
            category.name,
            len(excluded),
        )

    folder = out / category.name
    _write_scores(folder / "scores.csv", scored)
    if scored:
        low = float(min(item.heatmap.min() for item in scored))
        high = float(max(item.heatmap.max() for item in scored))
        overlays = _write_overlays(folder / "overlays", scored, (low, high))
    else:
        overlays = []
    finished = time.perf_counter()

    test_counts = {label: 0 for label in [GOOD, *category.defect_types]}
    for item in scored:
        test_counts[item.sample.label] += 1
    return {
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "image_auroc_per_type": per_type,
        "counts": {
            "train_good": len(train),
            "train_patches": patch_count,
            "test": test_counts,
            "pixel_auroc_images": len(scored) - len(excluded),
            "skipped": len(skipped),
            "cache_hits": cache.hits - hits,
            "cache_misses": cache.misses - misses,
        },
        "config": {
            "backbone": embedder.backbone.name,
            "weights_id": embedder.backbone.weights_id,
            "image_size": size,
            "dim": int(bank_dim),
            "dim_requested": embedder.dim,
            "coreset_ratio": coreset_ratio,
            "projection_dim": DEFAULT_PROJECTION_DIM,
            "bank_cached": stored is not None,
            "approximate": approximate,
            "seed": seed,
            "bank_size": int(bank_size),
        },
        "timings_s": {
            "embed_train": round(embedded_at - started, 2),
            "coreset": round(fitted_at - embedded_at, 2),
            "score_test": round(scored_at - fitted_at, 2),
            "total": round(finished - started, 2),
        },
        "skipped": skipped,
        "pixel_auroc_excluded": excluded,
        "overlays": overlays,
    }


def run_detection(
    root: Path,
    out: Path,
    backbone: str | Backbone,
    categories: Sequence[str] | None = None,
    weights: Path | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    dim: int | None = None,
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    approximate: bool = False,
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: ProgressFactory = no_progress,
) -> dict:
    """Run PatchCore detection on every category under ``root`` and write ``out/detection.json``.

    Args:
        root: An MVTec AD layout root, or one category folder.
        out: Output folder: ``detection.json``, and per category ``scores.csv`` and
            ``overlays/*.png``.
        backbone: A backbone name (see :data:`patchproto.backbones.BACKBONES`) or a loaded one.
        categories: Category names to run; all when ``None``.
        weights: A weights file for a backbone given by name.
        image_size: Side of the square network input (224 in the paper).
        dim: Optional patch embedding dimension (channel pooling).
        coreset_ratio: Fraction of normal patches kept in the memory bank.
        approximate: Search the bank with HNSW instead of exactly.
        cache_dir: Feature cache folder; ``None`` caches nothing.
        seed: Seeds the coreset.
        progress: Progress bar factory (see :data:`ProgressFactory`).

    Returns:
        What ``detection.json`` holds: ``{"root", "categories": {name: entry}, "mean"}`` where
        each entry has ``image_auroc``, ``pixel_auroc`` (``None`` when undefined),
        ``image_auroc_per_type``, ``counts``, ``config``, ``timings_s``, ``skipped`` (files that
        could not be read, with the reason), ``pixel_auroc_excluded`` and ``overlays``.

    Raises:
        DatasetError: The root or a category is not in the MVTec AD layout.
        WeightsError: The backbone's weights are missing or do not fit.
        ValueError: An option is out of range.
    """
    coreset_size(1, coreset_ratio)
    found = load_mvtec(Path(root), list(categories) if categories else None)
    model = load_backbone(backbone, weights) if isinstance(backbone, str) else backbone
    cache = FeatureCache(PatchEmbedder(model, image_size, dim), cache_dir)
    out = Path(out)

    results: dict[str, dict] = {}
    for category in found:
        logger.info("%s: %s", category.name, _describe(category))
        results[category.name] = detect_category(
            category, cache, out, coreset_ratio, approximate, seed, progress
        )

    report = {
        "root": str(Path(root).resolve()),
        "categories": results,
        "mean": {
            key: _mean([entry[key] for entry in results.values()])
            for key in ("image_auroc", "pixel_auroc")
        },
    }
    atomic_write_bytes(out / RESULTS_FILE, json.dumps(report, indent=2).encode())
    return report


def _describe(category: Category) -> str:
    defects = ", ".join(f"{t} {len(category.defects[t])}" for t in category.defect_types)
    return (
        f"{len(category.train_good)} normal for the bank, {len(category.test_good)} normal and "
        f"{sum(len(v) for v in category.defects.values())} defective for testing ({defects})"
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def detect_command(
    root: opt.Root,
    backbone: opt.Backbone,
    out: opt.Out,
    category: opt.Categories = None,
    weights: opt.Weights = None,
    image_size: opt.ImageSize = DEFAULT_IMAGE_SIZE,
    dim: opt.Dim = None,
    coreset_ratio: opt.CoresetRatio = DEFAULT_CORESET_RATIO,
    approximate: bool = typer.Option(False, "--approximate", help="HNSW search, not exact."),
    cache_dir: opt.CacheDir = None,
    no_cache: opt.NoCache = False,
    threads: opt.Threads = 0,
) -> None:
    """Detect anomalies with PatchCore and report image and pixel AUROC per category."""
    from rich.table import Table

    from patchproto.cli import console, fail, progress_bar
    from patchproto.product_cli import set_threads

    try:
        opt.check_embedding_options(backbone, coreset_ratio, image_size, dim, threads)
    except ValueError as error:
        raise fail(str(error)) from error
    set_threads(threads)
    folder = None if no_cache else (cache_dir or default_cache_dir())

    started = time.perf_counter()
    try:
        report = run_detection(
            root,
            out,
            backbone,
            category,
            weights,
            image_size,
            dim,
            coreset_ratio,
            approximate,
            folder,
            progress=progress_bar,
        )
    except (DatasetError, WeightsError, ImageError) as error:
        raise fail(str(error)) from error

    table = Table(title=f"PatchCore detection ({backbone}, {image_size} px)")
    for column in ("category", "image AUROC", "pixel AUROC", "bank", "skipped", "time"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, entry in report["categories"].items():
        table.add_row(
            name,
            _format(entry["image_auroc"]),
            _format(entry["pixel_auroc"]),
            f"{entry['config']['bank_size']:,}",
            str(entry["counts"]["skipped"]),
            f"{entry['timings_s']['total']:.0f} s",
        )
    table.add_row(
        "mean", _format(report["mean"]["image_auroc"]), _format(report["mean"]["pixel_auroc"])
    )
    console.print(table)
    console.print(
        f"Wrote {Path(out) / RESULTS_FILE} in {time.perf_counter() - started:.0f} s",
        highlight=False,
    )


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
