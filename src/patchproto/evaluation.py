"""Episodic few-shot evaluation: the paper's Tables 1 and 2 and its white-image ablation.

Wang and Zhuo, "PatchProto Networks for Few-shot Visual Anomaly Classification", Section 4.
For every category of a data set in the MVTec AD layout, the features of all its defective
images are prepared once (:func:`prepare_category`): patch embeddings, their PatchCore patch
scores against a memory bank of the category's normal images, and the pooled features of the
whole image, of the image masked by its PatchCore segmentation and of the image masked by its
ground-truth mask. Then every method classifies the queries of the same seeded episodes
(:mod:`patchproto.episodes`), and the accuracy per episode is summarised as a mean with a 95%
interval (:func:`evaluate_category`).

Decisions the paper leaves open:

- Segmentation masks are cut on the anomaly map at the network's input size (224 x 224 by
  default), with the threshold of :func:`patchproto.methods.masked.segmentation_threshold` over
  the maps of the category's held-back normal images (``test/good``), and resized to the image
  with nearest-neighbour sampling before masking.
- A defective image without a ground-truth mask, or with an empty one (a defect that was not
  localised), keeps its whole image for the ground-truth-masked baseline: masking it would give
  the all-white image, which carries nothing about its type.
- The 95% interval of a mean over E episodes is ``1.96 * s / sqrt(E)`` with ``s`` the sample
  standard deviation (``ddof=1``); it is undefined (``None``) for a single episode.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from patchproto.cache import FeatureCache, atomic_write_bytes, bank_key, content_key
from patchproto.coreset import DEFAULT_PROJECTION_DIM, coreset_size
from patchproto.datasets import Category, DatasetError, Sample
from patchproto.embedding import DEFAULT_IMAGE_SIZE, Embedding, PatchEmbedder
from patchproto.episodes import Episode, EpisodeSet, sample_episodes
from patchproto.images import ImageError, load_image, load_mask
from patchproto.methods import METHODS, ImageFeatures, make_method
from patchproto.methods.masked import (
    mask_image,
    segmentation_mask,
    segmentation_threshold,
    white_image,
)
from patchproto.patchcore import (
    DEFAULT_CORESET_RATIO,
    DEFAULT_SCORE_NORM,
    SCORE_NORMS,
    MemoryBank,
    PositionNorm,
    anomaly_map,
)

logger = logging.getLogger(__name__)

Advance = Callable[[int], None]
# ``progress(description, total)`` is a context manager yielding ``advance(n)``, like
# :func:`patchproto.cli.progress_bar`; the library itself never prints.
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]

# The paper reports 1-, 3- and 5-shot accuracy over 14 MVTec AD categories (Tables 1 and 2).
DEFAULT_SHOTS = (1, 3, 5)
DEFAULT_EPISODES = 100
# 1.96 standard errors: the two-sided 95% interval of a normal mean.
Z95 = 1.96
# The methods compared in Section 4.3 (PatchProto against Prototypical networks).
OURS, BASELINE = "patchproto", "protonet"
# Methods that read the patch scores, the segmentation-masked or the ground-truth-masked images.
_NEEDS_SCORES = frozenset({"patchproto", "seg_proto"})
_NEEDS_SEGMENTATION = frozenset({"seg_proto"})
_NEEDS_GROUND_TRUTH = frozenset({"gt_proto"})
# Parameters of Algorithm 2, passed only to PatchProto.
PATCHPROTO_PARAMS = ("gamma", "m", "temperature")
# Images embedded per call to the feature cache while building the memory bank.
_BANK_CHUNK = 64
# Images whose patches are scored in one nearest-neighbour search.
_SCORE_CHUNK = 32


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:
    """A progress factory that shows nothing."""
    yield lambda n=1: None


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    Episodes are thousands of tiny tensor operations; on a busy machine, waking a thread pool
    for each costs far more than the work (a fine-tuned classifier fit took 1 s on two threads
    and 0.03 s on one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validate method names, keeping their order and dropping repeats.

    Raises:
        ValueError: No method, or a name not in :data:`patchproto.methods.METHODS`.
    """
    names = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not names:
        msg = f"no method given; choose from: {', '.join(METHODS)}"
        raise ValueError(msg)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        msg = f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}"
        raise ValueError(msg)
    return names


def method_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that go to method ``name`` (Algorithm 2's only go to PatchProto)."""
    if name != OURS:
        return {}
    return {k: v for k, v in params.items() if k in PATCHPROTO_PARAMS and v is not None}


# ---------------------------------------------------------------------------------------------
# Feature preparation


@dataclass
class PreparedCategory:
    """Everything the methods need about one category, computed once.

    Attributes:
        name: The category's name.
        samples: Its defective images, grouped by type (sorted) in file order.
        features: One :class:`ImageFeatures` per sample.
        white: The all-white image's features (for the ablation), or ``None``.
        notes: Decisions taken for particular images (missing masks, unreadable images).
        info: Sizes and timings for the report (bank size, threshold, cache hits, seconds).
    """

    name: str
    samples: list[Sample]
    features: list[ImageFeatures]
    white: ImageFeatures | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """The defect type of each sample."""
        return [sample.label for sample in self.samples]


def _file_keys(paths: Sequence[Path]) -> list[str]:
    keys = []
    for path in paths:
        try:
            keys.append(content_key(Path(path).read_bytes()))
        except OSError as error:
            raise ImageError(path, f"cannot read the file ({error})", "Check the path") from error
    return keys


def _derived_key(*parts: str) -> str:
    """A cache key for something computed from other keys (a masked image, a bank)."""
    return content_key("\x1f".join(parts).encode("utf-8"))


@dataclass
class CachedBank:
    """A memory bank with its cache key; patch scores against it are cached too.

    Attributes:
        bank: The bank.
        key: Identifies the embedder, the normal images, the coreset ratio and the seed.
        cached: Whether the bank was read from the cache.
        cache: The feature cache it lives in.
    """

    bank: MemoryBank
    key: str
    cached: bool
    cache: FeatureCache

    def _entry(self, keys: Sequence[str]) -> Path | None:
        folder = self.cache.folder
        name = _derived_key("scores", self.key, *keys)
        return None if folder is None else folder / "scores" / f"{name}.safetensors"

    def scores(
        self, keys: Sequence[str], embedded: Sequence[Embedding], advance: Advance
    ) -> list[torch.Tensor]:
        """Patch scores of each image (``keys[i]`` identifies ``embedded[i]``), a few per search."""
        counts = [e.patches.shape[0] for e in embedded]
        entry = self._entry(keys)
        if entry is not None and entry.is_file():
            try:
                found = load_file(str(entry))["scores"]
                if found.shape[0] == sum(counts):
                    advance(len(embedded))
                    return list(found.split(counts))
            except (SafetensorError, KeyError, OSError, ValueError) as error:
                logger.warning("Ignoring unreadable patch scores %s (%s)", entry, error)

        parts: list[torch.Tensor] = []
        for start in range(0, len(embedded), _SCORE_CHUNK):
            chunk = embedded[start : start + _SCORE_CHUNK]
            parts.append(self.bank.patch_scores(torch.cat([e.patches for e in chunk])).float())
            advance(len(chunk))
        found = torch.cat(parts) if parts else torch.zeros(0)
        if entry is not None:
            atomic_write_bytes(entry, save({"scores": found.contiguous()}))
        return list(found.split(counts))


def memory_bank(
    category: Category,
    cache: FeatureCache,
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    seed: int = 0,
    progress: ProgressFactory = no_progress,
) -> CachedBank:
    """The PatchCore memory bank of a category's ``train/good`` images, kept in the cache.

    The bank is keyed by the embedder, the contents of the normal images, the coreset ratio and
    the seed; a second run over the same images loads it instead of embedding them again.
    """
    keys = _file_keys(category.train_good)
    key = bank_key(cache.embedder.key, keys, coreset_ratio, seed, DEFAULT_PROJECTION_DIM)
    bank = MemoryBank(coreset_ratio, projection_dim=DEFAULT_PROJECTION_DIM, seed=seed)
    stored = cache.read_bank(key)
    if stored is not None:
        return CachedBank(bank.load(stored), key, True, cache)

    # Fill one preallocated matrix so that the normal patches are held in memory only once.
    paths = category.train_good
    normal: torch.Tensor | None = None
    with progress(f"{category.name}: embedding train/good", len(paths)) as advance:
        for start in range(0, len(paths), _BANK_CHUNK):
            chunk = cache.embed_files(paths[start : start + _BANK_CHUNK], on_image=advance)
            if normal is None:
                count, dim = chunk[0].patches.shape
                normal = torch.empty(len(paths) * count, dim)
            rows = chunk[0].patches.shape[0]
            for offset, embedding in enumerate(chunk):
                at = (start + offset) * rows
                normal[at : at + rows] = embedding.patches
    assert normal is not None  # load_category guarantees normal images
    steps = coreset_size(len(normal), coreset_ratio)
    steps = steps if steps < len(normal) else 0
    with progress(f"{category.name}: coreset of {len(normal):,} patches", steps) as advance:
        bank.fit(normal, on_step=advance)
    del normal
    cache.write_bank(key, bank.embeddings)
    return CachedBank(bank, key, False, cache)


def _needs(methods: Sequence[str]) -> tuple[bool, bool, bool]:
    names = set(methods)
    segmentation = bool(names & _NEEDS_SEGMENTATION)
    ground_truth = bool(names & _NEEDS_GROUND_TRUTH)
    return bool(names & _NEEDS_SCORES) or segmentation, segmentation, ground_truth


def _masked_features(
    cache: FeatureCache,
    samples: Sequence[Sample],
    file_keys: Sequence[str],
    masks: Sequence[np.ndarray | None],
    kind: str,
    description: str,
    progress: ProgressFactory,
) -> list[torch.Tensor | None]:
    """Pooled features of each image masked by its mask (``None`` where there is no mask)."""
    todo = [i for i, mask in enumerate(masks) if mask is not None]
    keys, loaders = [], []
    for i in todo:
        mask = np.asarray(masks[i], dtype=bool)
        digest = content_key(np.packbits(mask).tobytes() + str(mask.shape).encode())
        keys.append(_derived_key(kind, file_keys[i], digest))
        loaders.append(_masked_loader(samples[i].path, mask))
    with progress(description, len(todo)) as advance:
        embedded = cache.embed_images(loaders, keys, on_image=advance)
    pooled: list[torch.Tensor | None] = [None] * len(samples)
    for i, embedding in zip(todo, embedded, strict=True):
        pooled[i] = embedding.pooled
    return pooled


def _masked_loader(path: Path, mask: np.ndarray) -> Callable[[], Any]:
    return lambda: mask_image(load_image(path), mask)


def _normal_scores(
    category: Category, cache: FeatureCache, bank: CachedBank, progress: ProgressFactory
) -> tuple[list[Embedding], list[torch.Tensor]]:
    """Embeddings and patch scores of the held-back normal images (``test/good``)."""
    with progress(f"{category.name}: embedding test/good", len(category.test_good)) as advance:
        normal = cache.embed_files(category.test_good, on_image=advance)
    with progress(f"{category.name}: test/good patch scores", len(normal)) as advance:
        scores = bank.scores(_file_keys(category.test_good), normal, advance)
    return normal, scores


def _normal_threshold(
    normal: Sequence[Embedding], scores: Sequence[torch.Tensor], image_size: int
) -> float | None:
    """The segmentation threshold from the held-back normal images, or ``None`` without any."""
    if not normal:
        return None
    size = (image_size, image_size)
    maps = [anomaly_map(s, e.grid, size) for s, e in zip(scores, normal, strict=True)]
    return segmentation_threshold(maps)


def prepare_category(
    category: Category,
    cache: FeatureCache,
    methods: Sequence[str],
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    seed: int = 0,
    white: bool = False,
    progress: ProgressFactory = no_progress,
    score_norm: str = DEFAULT_SCORE_NORM,
) -> PreparedCategory:
    """Compute once, for every defective image of a category, what ``methods`` need.

    Only what the methods read is computed: the memory bank and patch scores for
    ``patchproto`` and ``seg_proto``, segmentation-masked images for ``seg_proto``, and
    ground-truth-masked images for ``gt_proto``. Patch scores that no method reads are NaN.

    Args:
        category: From :func:`patchproto.datasets.load_category`.
        cache: The feature cache (and so the embedder) to use.
        methods: Method names (see :data:`patchproto.methods.METHODS`).
        coreset_ratio: Share of normal patches kept in the memory bank.
        seed: Seeds the coreset.
        white: Also embed the all-white image (the ablation of Section 4.3).
        progress: Progress factory (see :data:`ProgressFactory`).
        score_norm: ``"none"`` gives the methods PatchCore's patch scores as they are (the
            paper); ``"position"`` standardises each grid position by the scores of the
            held-back normal images (see :class:`patchproto.patchcore.PositionNorm`); with
            fewer than two images in ``test/good`` it falls back to ``"none"`` and says so in
            the notes. The segmentation baseline always cuts the unnormalised anomaly maps.

    Raises:
        DatasetError: The category has no defective image.
        ImageError: An image or mask cannot be read.
    """
    if score_norm not in SCORE_NORMS:
        msg = f"score normalisation {score_norm!r}; choose one of {', '.join(SCORE_NORMS)}"
        raise ValueError(msg)
    started = time.perf_counter()
    hits, misses = cache.hits, cache.misses
    samples = [s for t in category.defect_types for s in category.defects[t]]
    if not samples:
        msg = f"{category.root}: no defective images under test/<type>; nothing to classify"
        raise DatasetError(msg)
    needs_scores, needs_segmentation, needs_ground_truth = _needs(methods)
    prepared = PreparedCategory(category.name, samples, [])
    info = prepared.info
    info["images"] = len(samples)

    bank = None
    if needs_scores:
        bank = memory_bank(category, cache, coreset_ratio, seed, progress)
        info["bank_size"] = int(bank.bank.embeddings.shape[0])
        info["bank_cached"] = bank.cached
    info["bank_s"] = round(time.perf_counter() - started, 1)

    paths = [sample.path for sample in samples]
    file_keys = _file_keys(paths)
    with progress(f"{category.name}: embedding defects", len(samples)) as advance:
        embedded: list[Embedding] = cache.embed_files(paths, on_image=advance)

    if bank is None:
        scores = [torch.full((e.patches.shape[0],), float("nan")) for e in embedded]
    else:
        with progress(f"{category.name}: patch scores", len(embedded)) as advance:
            scores = bank.scores(file_keys, embedded, advance)

    seg_pooled: list[torch.Tensor | None] = [None] * len(samples)
    normal: list[Embedding] = []
    normal_scores: list[torch.Tensor] = []
    if bank is not None and (needs_segmentation or score_norm == "position"):
        normal, normal_scores = _normal_scores(category, cache, bank, progress)

    if needs_segmentation:
        threshold = _normal_threshold(normal, normal_scores, cache.embedder.image_size)
        info["seg_threshold"] = threshold
        size = (cache.embedder.image_size, cache.embedder.image_size)
        masks = [
            segmentation_mask(anomaly_map(s, e.grid, size), threshold)
            for s, e in zip(scores, embedded, strict=True)
        ]
        info["seg_mask_fraction"] = round(float(np.mean([m.mean() for m in masks])), 4)
        seg_pooled = _masked_features(
            cache,
            samples,
            file_keys,
            masks,
            "seg",
            f"{category.name}: segmentation-masked",
            progress,
        )

    gt_pooled: list[torch.Tensor | None] = [None] * len(samples)
    if needs_ground_truth:
        masks_gt: list[np.ndarray | None] = []
        whole = []
        for sample in samples:
            mask = load_mask(sample.mask) if sample.mask is not None else None
            if mask is None or not mask.any():
                whole.append(sample.path.name)
                mask = None
            masks_gt.append(mask)
        if whole:
            prepared.notes.append(
                f"{len(whole)} image(s) without a ground-truth mask or with an empty one keep "
                f"their whole image in gt_proto: {', '.join(whole[:8])}"
                + (" ..." if len(whole) > 8 else "")
            )
        info["gt_whole_images"] = len(whole)
        gt_pooled = _masked_features(
            cache,
            samples,
            file_keys,
            masks_gt,
            "gt",
            f"{category.name}: ground-truth-masked",
            progress,
        )
        gt_pooled = [
            g if g is not None else e.pooled for g, e in zip(gt_pooled, embedded, strict=True)
        ]

    # Segmentation above used the raw scores; the methods read the normalised ones.
    normalise: Callable[[torch.Tensor], torch.Tensor] = lambda s: s  # noqa: E731
    used = "none"
    if bank is not None and score_norm == "position":
        if len(normal_scores) >= 2:
            normalise, used = PositionNorm.from_scores(normal_scores), "position"
        else:
            note = (
                f"{category.root / 'test' / 'good'}: {len(normal_scores)} normal image(s), but "
                "position normalisation needs 2 or more, so PatchProto read PatchCore's scores "
                "as they are (score_norm none). Add normal images to test/good"
            )
            logger.warning("%s", note)
            prepared.notes.append(note)
    scores = [normalise(s) for s in scores]
    info["score_norm"] = used

    for i, embedding in enumerate(embedded):
        prepared.features.append(
            ImageFeatures(
                key=file_keys[i],
                patches=embedding.patches,
                grid=embedding.grid,
                patch_scores=scores[i],
                pooled=embedding.pooled,
                seg_pooled=seg_pooled[i],
                gt_pooled=gt_pooled[i],
            )
        )

    if white:
        size = cache.embedder.image_size
        key = _derived_key("white", f"{size}")
        (blank,) = cache.embed_images([white_image((size, size))], [key])
        blank_scores = (
            normalise(bank.bank.patch_scores(blank.patches).float())
            if bank is not None
            else torch.full((blank.patches.shape[0],), float("nan"))
        )
        prepared.white = ImageFeatures(
            key, blank.patches, blank.grid, blank_scores, blank.pooled, blank.pooled, blank.pooled
        )

    info["cache_hits"] = cache.hits - hits
    info["cache_misses"] = cache.misses - misses
    info["prepare_s"] = round(time.perf_counter() - started, 1)
    return prepared


# ---------------------------------------------------------------------------------------------
# Episodes


@dataclass
class MethodResult:
    """One method on the episodes of one category at one K.

    Attributes:
        accuracies: ``(E,)`` accuracy per episode, in ``[0, 1]``.
        confusion: ``(N, N)`` counts summed over episodes; rows are true ways.
    """

    accuracies: np.ndarray
    confusion: np.ndarray

    @property
    def mean(self) -> float:
        """Mean accuracy over episodes."""
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95% interval of the mean (``None`` for one episode)."""
        return ci95(self.accuracies)


def ci95(values: np.ndarray) -> float | None:
    """``1.96 * s / sqrt(n)`` with the sample standard deviation ``s``; ``None`` when n < 2.

    Example:
        >>> round(ci95(np.array([0.0, 1.0])), 3)
        0.98
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    return float(Z95 * values.std(ddof=1) / np.sqrt(len(values)))


def episode_features(
    prepared: PreparedCategory, episode: Episode
) -> tuple[list[ImageFeatures], list[int], list[ImageFeatures], list[int]]:
    """An episode's support features and ways, then its query features and true ways."""
    support = [prepared.features[i] for i, _ in episode.support]
    queries = [prepared.features[i] for i, _ in episode.queries]
    return support, [w for _, w in episode.support], queries, [w for _, w in episode.queries]


def run_method(
    prepared: PreparedCategory,
    episodes: EpisodeSet,
    name: str,
    params: dict[str, Any] | None = None,
    on_episode: Advance | None = None,
) -> MethodResult:
    """Score one method on every episode: fit on the support set, predict the queries."""
    ways = len(episodes.ways)
    accuracies = np.zeros(len(episodes.episodes))
    confusion = np.zeros((ways, ways), dtype=np.int64)
    for e, episode in enumerate(episodes.episodes):
        support, labels, queries, truth = episode_features(prepared, episode)
        method = make_method(name, **(params or {})).fit(support, labels)
        predicted = method.predict(queries).labels.numpy()
        truth_array = np.asarray(truth)
        accuracies[e] = float((predicted == truth_array).mean())
        np.add.at(confusion, (truth_array, predicted), 1)
        if on_episode is not None:
            on_episode(1)
    return MethodResult(accuracies, confusion)


def paired_comparison(ours: MethodResult, baseline: MethodResult) -> dict[str, Any]:
    """Episode-paired difference ``ours - baseline``: mean, 95% interval, wins and losses."""
    difference = ours.accuracies - baseline.accuracies
    return {
        "mean_difference": float(difference.mean()),
        "ci95": ci95(difference),
        "wins": int((difference > 0).sum()),
        "losses": int((difference < 0).sum()),
        "ties": int((difference == 0).sum()),
        "episodes": len(difference),
    }


def white_ablation(
    prepared: PreparedCategory, episodes: EpisodeSet, method: str = "gt_proto"
) -> dict[str, Any]:
    """Add the all-white image as an extra support class and count queries it attracts.

    Section 4.3 and Figure 2 of the paper: Prototypical networks on ground-truth-masked images
    predict nearly every query as the all-white class, because the pooled features describe
    the whole masked image, which is mostly white.

    Returns:
        ``white_fraction`` (mean share of queries predicted white, with its ``ci95``),
        ``accuracy`` over the real classes (a query predicted white counts as wrong) and the
        ``(N, N + 1)`` ``confusion`` summed over episodes (the last column is the white class).
    """
    if prepared.white is None:
        msg = f"{prepared.name}: the white image was not prepared; pass white=True"
        raise ValueError(msg)
    ways = len(episodes.ways)
    white_share, accuracy = [], []
    confusion = np.zeros((ways, ways + 1), dtype=np.int64)
    for episode in episodes.episodes:
        support, labels, queries, truth = episode_features(prepared, episode)
        fitted = make_method(method).fit([*support, prepared.white], [*labels, ways])
        predicted = fitted.predict(queries).labels.numpy()
        white_share.append(float((predicted == ways).mean()))
        accuracy.append(float((predicted == np.asarray(truth)).mean()))
        np.add.at(confusion, (np.asarray(truth), predicted), 1)
    return {
        "method": method,
        "white_fraction": float(np.mean(white_share)),
        "white_fraction_ci95": ci95(np.asarray(white_share)),
        "accuracy": float(np.mean(accuracy)),
        "accuracy_ci95": ci95(np.asarray(accuracy)),
        "episodes": len(white_share),
        "confusion": confusion.tolist(),
    }


@dataclass
class ShotResult:
    """All methods on one category at one K."""

    shots: int
    episodes: EpisodeSet
    methods: dict[str, MethodResult] = field(default_factory=dict)
    paired: dict[str, Any] | None = None
    white: dict[str, Any] | None = None


def evaluate_category(
    prepared: PreparedCategory,
    methods: Sequence[str],
    shots: Sequence[int] = DEFAULT_SHOTS,
    episodes: int = DEFAULT_EPISODES,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    white: bool = False,
    progress: ProgressFactory = no_progress,
) -> list[ShotResult]:
    """Every method on the same seeded episodes of one category, for each K.

    Args:
        prepared: From :func:`prepare_category`.
        methods: Method names.
        shots: The values of K.
        episodes: Episodes per K.
        seed: The run's seed (episodes also depend on K and the category's name).
        params: Algorithm 2's ``gamma``, ``m`` and ``temperature`` for PatchProto.
        white: Run the all-white ablation (needs ``prepared.white``).
        progress: Progress factory.
    """
    results = []
    for k in shots:
        drawn = sample_episodes(prepared.labels, k, episodes, seed, stream=prepared.name)
        result = ShotResult(k, drawn)
        results.append(result)
        if drawn.skipped:
            logger.warning("%s, %d-shot: no episodes (%s)", prepared.name, k, drawn.skipped)
            continue
        total = len(drawn.episodes) * (len(methods) + (1 if white else 0))
        with progress(f"{prepared.name}: {k}-shot episodes", total) as advance, single_thread():
            for name in methods:
                result.methods[name] = run_method(
                    prepared, drawn, name, method_params(name, params or {}), advance
                )
            if white:
                result.white = white_ablation(prepared, drawn)
                advance(len(drawn.episodes))
        if OURS in result.methods and BASELINE in result.methods:
            result.paired = paired_comparison(result.methods[OURS], result.methods[BASELINE])
    return results


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass
class EvaluationConfig:
    """Everything that determines a run's results (written at the top of ``results.json``)."""

    data_root: Path
    backbone: str
    methods: list[str]
    categories: list[str] | None = None
    weights: Path | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    dim: int | None = None
    coreset_ratio: float = DEFAULT_CORESET_RATIO
    shots: list[int] = field(default_factory=lambda: list(DEFAULT_SHOTS))
    episodes: int = DEFAULT_EPISODES
    seed: int = 0
    gamma: float | None = None
    m: int | None = None
    temperature: float | None = None
    cache_dir: Path | None = None
    score_norm: str = DEFAULT_SCORE_NORM
    # Seeds the coreset only. Kept apart from ``seed`` (the episodes) so that new episodes
    # reuse the memory bank, which ``detect`` builds with the same seed.
    coreset_seed: int = 0

    @property
    def params(self) -> dict[str, Any]:
        """PatchProto's parameters as given (``None`` means its default)."""
        return {"gamma": self.gamma, "m": self.m, "temperature": self.temperature}

    def prepare(
        self,
        category: Category,
        cache: FeatureCache,
        white: bool = False,
        progress: ProgressFactory = no_progress,
    ) -> PreparedCategory:
        """:func:`prepare_category` with this run's methods, coreset and score normalisation."""
        return prepare_category(
            category,
            cache,
            self.methods,
            self.coreset_ratio,
            self.coreset_seed,
            white,
            progress,
            self.score_norm,
        )


@dataclass
class CategoryResult:
    """One category: its prepared features' summary and the results per K."""

    prepared: PreparedCategory
    shots: list[ShotResult]


def effective_params(config: EvaluationConfig) -> dict[str, Any]:
    """The PatchProto parameters actually used, defaults filled in."""
    method = make_method(OURS, **method_params(OURS, config.params))
    return {name: getattr(method, name) for name in PATCHPROTO_PARAMS}


def versions() -> dict[str, str]:
    """Versions of the software that shapes the numbers."""
    import faiss
    import torchvision

    from patchproto import __version__ as ours

    return {
        "patchproto": ours,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
    }


def config_record(
    config: EvaluationConfig, embedder: PatchEmbedder, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration block of ``results.json``."""
    record = {
        "data_root": str(config.data_root),
        "categories": config.categories,
        "backbone": embedder.backbone.name,
        "weights": str(config.weights) if config.weights else None,
        "weights_id": embedder.backbone.weights_id,
        "image_size": embedder.image_size,
        "dim": embedder.dim,
        "coreset_ratio": config.coreset_ratio,
        "projection_dim": DEFAULT_PROJECTION_DIM,
        "methods": list(config.methods),
        "shots": list(config.shots),
        "episodes": config.episodes,
        "seed": config.seed,
        "coreset_seed": config.coreset_seed,
        **effective_params(config),
        "score_norm": config.score_norm,
        "cache_dir": str(config.cache_dir) if config.cache_dir else None,
        "embedder_key": embedder.key,
        "versions": versions(),
    }
    record.update(extra or {})
    return record


def make_cache(config: EvaluationConfig) -> FeatureCache:
    """Load the backbone and wrap its embedder in the feature cache of ``config``.

    Raises:
        ValueError: Unknown backbone or a bad image size.
        WeightsError: The backbone's weights are missing or do not fit.
    """
    from patchproto.backbones import load_backbone

    backbone = load_backbone(config.backbone, config.weights)
    return FeatureCache(PatchEmbedder(backbone, config.image_size, config.dim), config.cache_dir)


def check_shots(shots: Sequence[int]) -> list[int]:
    """Validate the values of K, sorted and without repeats.

    Raises:
        ValueError: No value, or a value below 1.
    """
    values = sorted(set(shots))
    if not values or values[0] < 1:
        msg = f"shots {list(shots)} must be one or more whole numbers >= 1, such as 1,3,5"
        raise ValueError(msg)
    return values


def run_evaluation(
    config: EvaluationConfig,
    cache: FeatureCache | None = None,
    progress: ProgressFactory = no_progress,
) -> tuple[dict[str, Any], list[CategoryResult]]:
    """Prepare every category and score every method on the same episodes.

    Args:
        config: What to run.
        cache: A ready feature cache (its embedder is used); built from ``config`` when ``None``.
        progress: Progress factory.

    Returns:
        The configuration record (for ``results.json``) and the results per category.

    Raises:
        DatasetError: The data root or a category is not in the MVTec AD layout.
        WeightsError: The backbone's weights are missing or do not fit.
        ImageError: An image or mask cannot be read.
        ValueError: A method, K, or PatchProto parameter is invalid.
    """
    from patchproto.datasets import load_mvtec

    started = time.perf_counter()
    config.methods = check_methods(config.methods)
    config.shots = check_shots(config.shots)
    coreset_size(1, config.coreset_ratio)
    if config.score_norm not in SCORE_NORMS:
        msg = f"score normalisation {config.score_norm!r}; choose one of {', '.join(SCORE_NORMS)}"
        raise ValueError(msg)
    if config.episodes < 1:
        msg = f"episodes {config.episodes} must be at least 1"
        raise ValueError(msg)
    effective_params(config)  # validates gamma, m and temperature before any work
    categories = load_mvtec(Path(config.data_root), config.categories or None)
    cache = cache or make_cache(config)
    white = "gt_proto" in config.methods

    results = []
    for category in categories:
        prepared = config.prepare(category, cache, white, progress)
        evaluated_at = time.perf_counter()
        shots = evaluate_category(
            prepared,
            config.methods,
            config.shots,
            config.episodes,
            config.seed,
            config.params,
            white,
            progress,
        )
        prepared.info["episodes_s"] = round(time.perf_counter() - evaluated_at, 1)
        results.append(CategoryResult(prepared, shots))
    record = config_record(
        config, cache.embedder, {"wall_s": round(time.perf_counter() - started, 1)}
    )
    return record, results
