"""The saved defect model: a memory bank of normal patches plus a few examples of each defect type.

A :class:`DefectModel` is what ``patchproto fit`` writes and what ``classify``, the example
commands and the web service read. It holds

- the settings it was fitted with (backbone, weights, image size, PatchCore and Algorithm 2
  parameters),
- the PatchCore memory bank of normal patch embeddings (Roth et al., CVPR 2022, Section 3),
- the normal-score threshold: the highest image anomaly score among normal images that were held
  back from the memory bank, so that every held-back normal image is at or below it,
- the held-back images' mean and spread of the patch score at each grid position, by which the
  patch scores are standardised before Algorithm 2 selects (``score_norm="position"``; see
  :class:`patchproto.patchcore.PositionNorm`),
- per defect type, its support examples: each one's full patch embeddings and patch scores, so
  that Algorithm 2 of Wang and Zhuo (PatchProto networks) can re-select its anomaly patches under
  any ``gamma`` and ``m``, and a copy of the example image for display.

On disk a model is a folder, read without running any code (JSON and safetensors only)::

    MODEL/model.json              settings, threshold, types and examples, format version
    MODEL/tensors.safetensors     memory bank, held-back scores, position statistics, example
                                  patches and scores
    MODEL/examples/<sha256>.png   the example images as given (PNG or JPEG; others as PNG)

Saving is atomic: the complete new folder is written beside the target under a temporary name
and swapped in with two renames, so an interrupted save leaves the previous model readable.

Example:
    >>> model = DefectModel.fit("normal/", "defects/")  # doctest: +SKIP
    >>> model.save("model/")  # doctest: +SKIP
    >>> DefectModel.load("model/").classify("part.png").predicted_type  # doctest: +SKIP
    'scratch'
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from patchproto import __version__
from patchproto.backbones import Backbone, load_backbone
from patchproto.cache import FeatureCache, content_key
from patchproto.coreset import coreset_size
from patchproto.datasets import load_plain
from patchproto.embedding import DEFAULT_IMAGE_SIZE, Embedding, PatchEmbedder
from patchproto.images import ImageError, load_image
from patchproto.methods.base import ImageFeatures, Prediction
from patchproto.methods.patchproto import DEFAULT_GAMMA, DEFAULT_M, PatchProtoNetworks
from patchproto.patchcore import (
    DEFAULT_CORESET_RATIO,
    DEFAULT_SCORE_NORM,
    SCORE_NORMS,
    MemoryBank,
    PositionNorm,
    anomaly_map,
    image_score,
)
from patchproto.selection import DEFAULT_TEMPERATURE, check_selection_params

logger = logging.getLogger(__name__)

# Bump when the folder layout or the meaning of a stored value changes. Version 2 added the
# position statistics of the patch scores; a version 1 folder reads as score_norm "none".
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_FILE = "model.json"
TENSORS_FILE = "tensors.safetensors"
EXAMPLES_DIR = "examples"
DEFAULT_BACKBONE = "efficientnet_lite2"
# Normal images held back from the memory bank to set the threshold (a fraction, or a count).
DEFAULT_HOLDOUT = 0.1
# Query patches shown as the reasons for a classification.
MAX_DECIDING_PATCHES = 8
# Confidences are a softmax of -distance / this. Equation 1 distances are mean cosine distances,
# and types typically differ by 0.02-0.2, which a plain softmax would flatten to near-uniform.
DEFAULT_CONFIDENCE_TEMPERATURE = 0.05

# The weights id of a backbone built with random weights (see patchproto.backbones).
RANDOM_WEIGHTS = "random-init"
REFIT_FIX = "Refit it with `patchproto fit --normal DIR --defects DIR --out MODEL`"
_TYPE_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,100}$")

ImageSource = Image.Image | str | Path | bytes
Progress = Callable[[int], None]


class ModelError(ValueError):
    """A model folder or an edit that cannot be used; the message names the file and the fix."""


@dataclass
class ModelSettings:
    """Everything that fixed the model's numbers when it was fitted.

    Attributes:
        backbone: Backbone name (see :data:`patchproto.backbones.BACKBONES`).
        weights_id: Content id of the backbone weights; classification refuses other weights.
        weights_path: The weights file given at fit time, if any (``None``: the default weights).
        image_size: Side of the square network input (224 in the paper, Section 4.1).
        dim: Patch embedding dimension after channel pooling (``None``: full).
        coreset_ratio: Share of normal patches kept in the memory bank.
        gamma: Share of anomaly mass the selected patches cover (Algorithm 2).
        m: Upper bound on selected patches per image (Algorithm 2).
        temperature: Softmax temperature of the patch scores (Algorithm 2; 1 in the paper).
        seed: Seeds the held-back split and the coreset.
        normal_images: Normal images given at fit time.
        holdout_images: Of those, how many were held back to set the threshold.
        threshold_rule: How the threshold was set, in words.
        score_norm: ``"position"``: Algorithm 2 reads patch scores standardised per grid
            position by the held-back normal images; ``"none"``: PatchCore's scores as they are
            (the paper, and every model of format version 1). The anomaly score, threshold and
            heatmap always use PatchCore's scores as they are.
        confidence_temperature: Confidences are ``softmax(-distance / confidence_temperature)``;
            a display scale for ranking, not a calibrated probability.
        created: When the model was fitted (ISO 8601, UTC).
        patchproto_version: The library version that fitted it.
    """

    backbone: str
    weights_id: str
    weights_path: str | None
    image_size: int
    dim: int | None
    coreset_ratio: float
    gamma: float
    m: int | None
    temperature: float
    seed: int
    normal_images: int
    holdout_images: int
    threshold_rule: str
    created: str
    score_norm: str = "none"
    confidence_temperature: float = DEFAULT_CONFIDENCE_TEMPERATURE
    patchproto_version: str = __version__


@dataclass
class Example:
    """One support image of a defect type.

    Attributes:
        name: File name, unique within its type.
        sha256: Hash of the image bytes as given (its identity and feature-cache key).
        image_bytes: The stored copy (the original bytes if PNG or JPEG, else a PNG).
        image_suffix: ``".png"`` or ``".jpg"``.
        size: The image's ``(width, height)``.
        grid: The ``(h, w)`` patch grid.
        patches: ``(h * w, D)`` patch embeddings.
        patch_scores: ``(h * w,)`` PatchCore anomaly scores against the memory bank.
        pooled: ``(C,)`` pooled last-stage features (kept for image-level methods).
    """

    name: str
    sha256: str
    image_bytes: bytes
    image_suffix: str
    size: tuple[int, int]
    grid: tuple[int, int]
    patches: torch.Tensor
    patch_scores: torch.Tensor
    pooled: torch.Tensor

    @property
    def image_file(self) -> str:
        """Path of the stored image inside the model folder."""
        return f"{EXAMPLES_DIR}/{self.sha256}{self.image_suffix}"

    @property
    def media_type(self) -> str:
        """MIME type of :attr:`image_bytes`."""
        return "image/png" if self.image_suffix == ".png" else "image/jpeg"


@dataclass
class TypeScore:
    """One defect type's place in a classification ranking."""

    type: str
    distance: float
    confidence: float


@dataclass
class DecidingPatch:
    """A selected query patch and the support patch of the predicted type it matched best.

    Boxes are ``(x0, y0, x1, y1)`` in the original image's pixels: the patch's cell of the
    stride-8 grid mapped back from the square network input (its receptive field is larger).
    """

    box: tuple[float, float, float, float]
    weight: float
    score: float
    distance: float
    support_type: str
    support_example: str
    support_box: tuple[float, float, float, float]


@dataclass
class Classification:
    """The answer for one image.

    Attributes:
        name: The image's name (file name or the name given).
        predicted_type: The nearest defect type (Equation 1).
        ranking: Every type, nearest first, with its distance and confidence.
        anomaly_score: The image's PatchCore score (its highest patch score).
        threshold: The model's normal-score threshold.
        is_anomalous: ``anomaly_score > threshold``.
        heatmap: ``(height, width)`` float32 anomaly map at the image's own size.
        deciding_patches: The selected query patches that decided the type, most anomalous first.
        image_size: The image's ``(width, height)``.
        timing: Seconds spent per stage (``embed``, ``score``, ``classify``, ``total``).
    """

    name: str
    predicted_type: str
    ranking: list[TypeScore]
    anomaly_score: float
    threshold: float
    is_anomalous: bool
    heatmap: np.ndarray
    deciding_patches: list[DecidingPatch]
    image_size: tuple[int, int]
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def confidence(self) -> float:
        """Confidence of the predicted type."""
        return self.ranking[0].confidence

    def to_dict(self, heatmap: bool = False) -> dict[str, Any]:
        """JSON-safe dict; the heatmap (a large array) only if asked, as nested lists."""
        out: dict[str, Any] = {
            "name": self.name,
            "predicted_type": self.predicted_type,
            "confidence": self.confidence,
            "ranking": [asdict(entry) for entry in self.ranking],
            "anomaly_score": self.anomaly_score,
            "threshold": self.threshold,
            "is_anomalous": self.is_anomalous,
            "image_size": list(self.image_size),
            "deciding_patches": [
                {**asdict(p), "box": list(p.box), "support_box": list(p.support_box)}
                for p in self.deciding_patches
            ],
            "timing": dict(self.timing),
        }
        if heatmap:
            out["heatmap"] = np.round(self.heatmap.astype(np.float64), 5).tolist()
        return out


# ----------------------------------------------------------------------------------------------
# Helpers


def _check_type_name(name: str) -> str:
    if not isinstance(name, str) or not _TYPE_NAME.match(name) or name.strip() in ("", ".", ".."):
        msg = (
            f"defect type name {name!r} cannot be used. Give 1-100 characters without slashes "
            "or control characters (for example 'scratch')"
        )
        raise ModelError(msg)
    return name


def _stored_copy(data: bytes, name: str) -> tuple[bytes, str]:
    """The bytes to keep for display: the original if PNG or JPEG, else a PNG re-encoding."""
    with Image.open(io.BytesIO(data)) as image:
        kind = image.format
    if kind == "PNG":
        return data, ".png"
    if kind == "JPEG":
        return data, ".jpg"
    buffer = io.BytesIO()
    load_image(data, name=name).save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def _cell_box(
    index: int, grid: tuple[int, int], size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """The pixel box ``(x0, y0, x1, y1)`` of patch ``index`` of ``grid`` in an image of ``size``."""
    rows, cols = grid
    width, height = size
    row, col = divmod(int(index), cols)
    sx, sy = width / cols, height / rows
    return (
        round(col * sx, 2),
        round(row * sy, 2),
        round((col + 1) * sx, 2),
        round((row + 1) * sy, 2),
    )


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height)."""
    if (values.shape[1], values.shape[0]) == size:
        return values.astype(np.float32)
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _holdout_count(holdout: float | int, normal: int, least: int = 1) -> int:
    """Held-back normal images: a fraction below 1, else a whole count; keeps one for the bank.

    A fraction holds back at least ``least`` images (two for the position statistics).
    """
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or math.isnan(holdout):
        raise ModelError(f"holdout={holdout!r} must be a fraction in (0, 1) or a count >= 1")
    if holdout <= 0:
        msg = (
            f"holdout={holdout!r}: at least one normal image must be held back to set the "
            "normal-score threshold. Give a fraction such as 0.1 or a count such as 10"
        )
        raise ModelError(msg)
    if holdout < 1:
        count = max(least, round(normal * holdout))
    elif float(holdout).is_integer():
        count = int(holdout)
    else:
        raise ModelError(f"holdout={holdout!r}: a count of images must be a whole number")
    if count < least:
        msg = (
            f"holdout={holdout!r} holds back {count} normal image(s), but the position "
            f"statistics of the patch scores need {least}. Hold back more, or fit with "
            "--score-norm none"
        )
        raise ModelError(msg)
    if count >= normal:
        msg = (
            f"holdout={holdout!r} holds back {count} of {normal} normal images, leaving none for "
            f"the memory bank. Give more normal images (at least {least + 1}) or a smaller holdout"
        )
        raise ModelError(msg)
    return count


def _load_backbone(name: str, weights: str | Path | None, pretrained: bool) -> Backbone:
    """Load a backbone; random weights (tests only) are seeded so that a saved model reloads."""
    if pretrained:
        return load_backbone(name, weights)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return load_backbone(name, pretrained=False)


def _fsync_dir(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def check_save_target(folder: str | Path) -> Path:
    """Check that a model may be saved to ``folder``; returns it as an absolute path.

    A missing folder, an empty one or an existing model folder may be written; anything else is
    refused, so that a mistyped ``--out`` never replaces a folder of images.

    Raises:
        ModelError: ``folder`` is a file, or a non-empty folder without a ``model.json``.
    """
    target = Path(folder).absolute()
    if target.exists():
        if not target.is_dir():
            msg = f"{target}: exists and is a file, not a model folder. Choose another path"
            raise ModelError(msg)
        if not (target / MODEL_FILE).is_file() and any(target.iterdir()):
            msg = (
                f"{target}: this folder is not empty and holds no {MODEL_FILE}, so it is not "
                "a PatchProto model; refusing to replace it. Choose a new or empty folder"
            )
            raise ModelError(msg)
    return target


def backup_path(folder: str | Path) -> Path:
    """Where a save parks the previous model folder during the swap."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.backup"


def lock_path(folder: str | Path) -> Path:
    """The lock file of a model folder; it lies beside the folder, which saves swap out."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def editing(folder: str | Path) -> Iterator[None]:
    """Hold a model folder's edit lock for the block, across processes.

    Every load-change-save of a model (``add-example``, ``remove-example``, the service's
    changes, ``fit``'s save) runs inside it, so two processes editing one model take turns and
    neither's change is lost. The lock is an ``flock`` on :func:`lock_path`, released by the
    operating system if the process dies. Where ``fcntl`` does not exist (Windows) it does
    nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX only
        yield
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the flock


# ----------------------------------------------------------------------------------------------
# The model


class DefectModel:
    """A fitted PatchProto defect classifier (see the module docstring).

    Build one with :meth:`fit` or :meth:`load`; the constructor is for those two.

    Args:
        settings: The fit-time settings.
        memory_bank: ``(M, D)`` normal patch embeddings (the coreset).
        threshold: Normal-score threshold on the image anomaly score.
        holdout_scores: Image scores of the held-back normal images.
        examples: Per defect type, its support examples.
        weights: A weights file to load the backbone from, overriding ``settings.weights_path``.
        position_norm: The position statistics of the held-back normal patch scores; required
            when ``settings.score_norm`` is ``"position"``.
    """

    def __init__(
        self,
        settings: ModelSettings,
        memory_bank: torch.Tensor,
        threshold: float,
        holdout_scores: torch.Tensor,
        examples: dict[str, list[Example]],
        weights: str | Path | None = None,
        position_norm: PositionNorm | None = None,
    ) -> None:
        if settings.score_norm not in SCORE_NORMS:
            msg = f"score_norm={settings.score_norm!r}; choose one of {', '.join(SCORE_NORMS)}"
            raise ModelError(msg)
        if settings.score_norm == "position" and position_norm is None:
            raise ModelError("score_norm='position' needs the position statistics")
        self.settings = settings
        self.position_norm = position_norm if settings.score_norm == "position" else None
        self.memory_bank = memory_bank.float().contiguous()
        self.threshold = float(threshold)
        self.holdout_scores = holdout_scores.float()
        self.examples = examples
        self._weights = weights
        self._bank: MemoryBank | None = None
        self._embedder: PatchEmbedder | None = None
        self._method: PatchProtoNetworks | None = None
        self._support_index: list[tuple[str, Example]] = []
        # Guards the lazily built parts, so concurrent classifications build each once.
        self._lazy_lock = threading.RLock()

    # -- fitting -------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        normal_dir: str | Path,
        defects_dir: str | Path,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | Path | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        dim: int | None = None,
        coreset_ratio: float = DEFAULT_CORESET_RATIO,
        gamma: float = DEFAULT_GAMMA,
        m: int | None = DEFAULT_M,
        temperature: float = DEFAULT_TEMPERATURE,
        holdout: float | int = DEFAULT_HOLDOUT,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        score_norm: str = DEFAULT_SCORE_NORM,
        on_image: Progress | None = None,
        on_step: Progress | None = None,
        on_stage: Callable[[str, int], None] | None = None,
        pretrained: bool = True,
    ) -> DefectModel:
        """Fit a model from a folder of normal images and one folder per defect type.

        A seeded subset of the normal images (``holdout``) is held back: the rest form the
        memory bank, the highest anomaly score among the held-back ones becomes the
        threshold, and (``score_norm="position"``) their patch scores give each grid position's
        normal mean and spread. Each defect type folder gives that type's support examples;
        masks beside them (``<stem>_mask.png``) are ignored, since PatchProto finds the
        anomalous patches itself.

        Args:
            normal_dir: Images of good parts.
            defects_dir: One sub-folder of example images per defect type (the type's name).
            backbone: Backbone name.
            weights: Weights file for the backbone (default: its standard weights).
            image_size: Side of the square network input.
            dim: Patch embedding dimension (``None``: full).
            coreset_ratio: Share of normal patches kept in the memory bank.
            gamma: Algorithm 2 threshold on the cumulative anomaly mass.
            m: Algorithm 2 upper bound on the patches per image.
            temperature: Algorithm 2 softmax temperature.
            holdout: Normal images held back for the threshold: a fraction in (0, 1) or a count.
            seed: Seeds the held-back split and the coreset.
            cache_dir: Feature cache folder (``None``: no cache).
            score_norm: ``"position"`` (default) or ``"none"`` (the paper's scores); see
                :class:`ModelSettings`.
            on_image: Called with the number of images embedded since the last call.
            on_step: Called with the number of coreset centers added since the last call.
            on_stage: Called with ``(stage, total)`` as each stage starts: ``"normal"`` (bank
                images), ``"coreset"`` (centers), ``"examples"`` (held-back normal images and
                defect examples).
            pretrained: ``False`` uses random backbone weights (tests only).

        Raises:
            DatasetError: A folder is missing or empty, or the layout is wrong.
            ImageError: An image cannot be read (named in the message).
            ModelError: A parameter is out of range.
            WeightsError: The backbone weights are missing or do not fit.
        """
        started = time.perf_counter()
        try:
            check_selection_params(gamma, m, temperature)
        except ValueError as error:
            raise ModelError(str(error)) from error
        if not 0 < coreset_ratio <= 1:
            raise ModelError(f"coreset_ratio={coreset_ratio!r} must be in (0, 1]")
        if score_norm not in SCORE_NORMS:
            raise ModelError(f"score_norm={score_norm!r}; choose one of {', '.join(SCORE_NORMS)}")
        least = 2 if score_norm == "position" else 1
        category = load_plain(Path(normal_dir), Path(defects_dir))
        normal = category.train_good
        if len(normal) < least + 1:
            msg = (
                f"{normal_dir}: only {len(normal)} normal image(s); at least {least + 1} are "
                f"needed (one for the memory bank, {least} held back for the threshold"
                + (" and the position statistics" if least > 1 else "")
                + "). Add more images of good parts"
            )
            raise ModelError(msg)
        count = _holdout_count(holdout, len(normal), least)
        held = set(random.Random(seed).sample(range(len(normal)), count))
        bank_paths = [p for i, p in enumerate(normal) if i not in held]
        held_paths = [p for i, p in enumerate(normal) if i in held]
        support = [(t, s.path) for t in category.defect_types for s in category.defects[t]]

        net = _load_backbone(backbone, weights, pretrained)
        embedder = PatchEmbedder(net, image_size=image_size, dim=dim)
        cache = FeatureCache(embedder, Path(cache_dir) if cache_dir is not None else None)
        if on_stage is not None:
            on_stage("normal", len(bank_paths))

        # The memory bank: every patch of the normal images not held back, reduced by a coreset.
        bank_embeddings = cache.embed_files(bank_paths, on_image)
        patches = torch.cat([e.patches for e in bank_embeddings])
        del bank_embeddings
        bank = MemoryBank(coreset_ratio=coreset_ratio, seed=seed)
        if on_stage is not None:
            on_stage("coreset", coreset_size(len(patches), coreset_ratio))
        bank.fit(patches, on_step)
        del patches
        logger.info("Memory bank: %d patch embeddings", len(bank.embeddings))

        # The threshold: no held-back normal image scores above it.
        if on_stage is not None:
            on_stage("examples", len(held_paths) + len(support))
        held_patch_scores = [
            bank.patch_scores(e.patches).float() for e in cache.embed_files(held_paths, on_image)
        ]
        held_scores = torch.tensor([image_score(s) for s in held_patch_scores])
        threshold = float(held_scores.max())
        position_norm = (
            PositionNorm.from_scores(held_patch_scores) if score_norm == "position" else None
        )

        settings = ModelSettings(
            backbone=backbone,
            weights_id=net.weights_id,
            weights_path=str(Path(weights).resolve()) if weights else None,
            image_size=image_size,
            dim=dim,
            coreset_ratio=coreset_ratio,
            gamma=gamma,
            m=m,
            temperature=temperature,
            seed=seed,
            normal_images=len(normal),
            holdout_images=len(held_paths),
            threshold_rule="max image score of the held-back normal images",
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            score_norm=score_norm,
        )
        model = cls(settings, bank.embeddings, threshold, held_scores, {}, weights, position_norm)
        model._bank, model._embedder = bank, embedder

        # The support set: every example is embedded and scored now, selected at classify time.
        contents = []
        for _, path in support:
            try:
                contents.append(path.read_bytes())
            except OSError as error:
                raise ImageError(
                    path, f"cannot read the file ({error})", "Check the path"
                ) from error
        embeddings = cache.embed_files([p for _, p in support], on_image)
        for (type_name, path), data, embedding in zip(support, contents, embeddings, strict=True):
            example = model._make_example(path.name, data, embedding, str(path))
            model.examples.setdefault(type_name, []).append(example)
        logger.info(
            "Fitted in %.1f s: %d normal images (%d held back), %d types, %d examples",
            time.perf_counter() - started,
            len(normal),
            len(held_paths),
            len(model.examples),
            len(support),
        )
        return model

    def _make_example(self, name: str, data: bytes, embedding: Embedding, label: str) -> Example:
        image = load_image(data, name=label)
        stored, suffix = _stored_copy(data, label)
        return Example(
            name=name,
            sha256=content_key(data),
            image_bytes=stored,
            image_suffix=suffix,
            size=image.size,
            grid=embedding.grid,
            patches=embedding.patches.float().contiguous(),
            patch_scores=self._memory_bank().patch_scores(embedding.patches).float(),
            pooled=embedding.pooled.float().contiguous(),
        )

    # -- lazily built parts --------------------------------------------------------------------

    def _memory_bank(self) -> MemoryBank:
        with self._lazy_lock:
            if self._bank is None:
                self._bank = MemoryBank(coreset_ratio=1.0).load(self.memory_bank)
            return self._bank

    def embedder(self) -> PatchEmbedder:
        """The patch embedder (the backbone is loaded on first use and kept).

        Raises:
            ModelError: The backbone's weights differ from those the model was fitted with.
            WeightsError: The weights cannot be found.
        """
        with self._lazy_lock:
            if self._embedder is None:
                s = self.settings
                pretrained = s.weights_id != RANDOM_WEIGHTS
                net = _load_backbone(s.backbone, self._weights or s.weights_path, pretrained)
                if net.weights_id != s.weights_id:
                    msg = (
                        f"the {s.backbone} weights found (id {net.weights_id}) are not those "
                        f"this model was fitted with (id {s.weights_id}). Pass the original "
                        f"weights file with --weights, or {REFIT_FIX[0].lower() + REFIT_FIX[1:]}"
                    )
                    raise ModelError(msg)
                self._embedder = PatchEmbedder(net, image_size=s.image_size, dim=s.dim)
            return self._embedder

    def _support(self) -> tuple[PatchProtoNetworks, list[tuple[str, Example]]]:
        with self._lazy_lock:
            if self._method is None:
                if not self.examples:
                    raise ModelError("the model has no defect types. Add examples with add-example")
                names = self.type_names
                index = [(t, e) for t in names for e in self.examples[t]]
                features = [
                    ImageFeatures(
                        f"{t}/{e.name}",
                        e.patches,
                        e.grid,
                        self._normalise(e.patch_scores),
                        e.pooled,
                    )
                    for t, e in index
                ]
                labels = [names.index(t) for t, _ in index]
                s = self.settings
                method = PatchProtoNetworks(gamma=s.gamma, m=s.m, temperature=s.temperature)
                self._support_index = index
                self._method = method.fit(features, labels)
            return self._method, self._support_index

    def _normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """The patch scores Algorithm 2 reads (see :attr:`ModelSettings.score_norm`)."""
        return self.position_norm(scores) if self.position_norm is not None else scores

    def _changed(self) -> None:
        with self._lazy_lock:
            self._method = None
            self._support_index = []

    # -- examples ------------------------------------------------------------------------------

    @property
    def type_names(self) -> list[str]:
        """Defect type names, sorted (the class order of distances)."""
        return sorted(self.examples)

    def types(self) -> dict[str, list[str]]:
        """Each defect type with its example names."""
        return {t: [e.name for e in self.examples[t]] for t in self.type_names}

    def _find(self, type_name: str, example_name: str | None = None) -> Example | None:
        if type_name not in self.examples:
            known = ", ".join(self.type_names) or "none"
            msg = f"no defect type named {type_name!r} in this model. Types: {known}"
            raise ModelError(msg)
        if example_name is None:
            return None
        for example in self.examples[type_name]:
            if example.name == example_name:
                return example
        known = ", ".join(e.name for e in self.examples[type_name])
        msg = f"defect type {type_name!r} has no example named {example_name!r}. Examples: {known}"
        raise ModelError(msg)

    def example(self, type_name: str, example_name: str) -> Example:
        """One example, by type and name.

        Raises:
            ModelError: Unknown type or example (the message lists those that exist).
        """
        found = self._find(type_name, example_name)
        assert found is not None
        return found

    def example_image(self, type_name: str, example_name: str) -> bytes:
        """The stored image of an example (PNG or JPEG bytes; see :attr:`Example.media_type`)."""
        return self.example(type_name, example_name).image_bytes

    def add_examples(
        self,
        type_name: str,
        images: Sequence[str | Path | tuple[str, bytes]],
        on_image: Progress | None = None,
    ) -> list[str]:
        """Add support examples to a type, creating the type if it is new.

        The memory bank is not refitted: the examples are embedded and scored against it. All
        images are read and checked before any is added, so a bad one changes nothing.

        Args:
            type_name: The defect type (a new name creates the type).
            images: Paths, or ``(file name, bytes)`` pairs (uploads).
            on_image: Called with the number of images embedded.

        Returns:
            The names of the added examples.

        Raises:
            ImageError: An image cannot be read.
            ModelError: Bad type name, no images, or a name or image already in the type.
        """
        _check_type_name(type_name)
        if not images:
            raise ModelError(f"no images given to add to {type_name!r}. Give at least one image")
        items: list[tuple[str, bytes]] = []
        for item in images:
            if isinstance(item, tuple):
                name, data = item
                label = name
            else:
                path = Path(item)
                if not path.is_file():
                    problem = "this is a folder, not an image" if path.is_dir() else "no such file"
                    raise ImageError(path, problem, "Give image files")
                name, label = path.name, str(path)
                try:
                    data = path.read_bytes()
                except OSError as error:
                    raise ImageError(path, f"cannot read the file ({error})", "Check it") from error
            name = Path(str(name).replace("\\", "/")).name
            if not name:
                raise ModelError(f"an example needs a file name, got {item[0]!r}")
            load_image(data, name=label)
            items.append((name, bytes(data)))

        existing = {e.name: e for e in self.examples.get(type_name, [])}
        hashes = {e.sha256: e.name for e in existing.values()}
        seen: set[str] = set()
        for name, data in items:
            if name in existing or name in seen:
                msg = (
                    f"defect type {type_name!r} already has an example named {name!r}. Remove it "
                    "first (remove-example) or rename the new file"
                )
                raise ModelError(msg)
            digest = content_key(data)
            if digest in hashes:
                msg = (
                    f"{name}: the same image is already an example of {type_name!r} "
                    f"(as {hashes[digest]!r})"
                )
                raise ModelError(msg)
            seen.add(name)
            hashes[digest] = name

        embedder = self.embedder()
        pictures = [load_image(data, name=name) for name, data in items]
        embeddings = embedder.embed(pictures, on_batch=on_image)
        added = [
            self._make_example(name, data, embedding, name)
            for (name, data), embedding in zip(items, embeddings, strict=True)
        ]
        self.examples.setdefault(type_name, []).extend(added)
        self._changed()
        return [e.name for e in added]

    def remove_example(self, type_name: str, example_name: str) -> None:
        """Remove one example; removing the last example of a type removes the type.

        Raises:
            ModelError: Unknown type or example, or it is the model's very last example.
        """
        example = self.example(type_name, example_name)
        if len(self.examples) == 1 and len(self.examples[type_name]) == 1:
            msg = (
                f"{example_name!r} is the last example of the last defect type {type_name!r}; a "
                "model needs at least one. Add examples of another type first"
            )
            raise ModelError(msg)
        self.examples[type_name] = [e for e in self.examples[type_name] if e is not example]
        if not self.examples[type_name]:
            del self.examples[type_name]
        self._changed()

    # -- classification ------------------------------------------------------------------------

    def classify(self, image: ImageSource, name: str | None = None) -> Classification:
        """Classify one image (see :meth:`classify_many`)."""
        return self.classify_many([image], [name] if name is not None else None)[0]

    def classify_many(
        self,
        images: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        on_image: Progress | None = None,
    ) -> list[Classification]:
        """Classify images in one batch.

        Args:
            images: PIL images, paths or raw file bytes.
            names: What to call each image in results and errors (default: the file name,
                or ``image-<i>``).
            on_image: Called with the number of images embedded.

        Raises:
            ImageError: An image cannot be read (a batch with one bad image fails whole;
                classify one at a time to skip bad ones).
            ModelError: The backbone weights differ from the fitted ones.
        """
        started = time.perf_counter()
        labels = list(names) if names is not None else [None] * len(images)
        if len(labels) != len(images):
            raise ModelError(f"{len(images)} images but {len(labels)} names")
        pictures: list[Image.Image] = []
        titles: list[str] = []
        for i, (source, label) in enumerate(zip(images, labels, strict=True)):
            if isinstance(source, Image.Image):
                pictures.append(source.convert("RGB"))
                titles.append(label or f"image-{i}")
            elif isinstance(source, bytes | bytearray):
                title = label or f"image-{i}"
                pictures.append(load_image(bytes(source), name=title))
                titles.append(title)
            else:
                pictures.append(load_image(source, name=label or str(source)))
                titles.append(label or Path(source).name)
        if not pictures:
            return []
        loaded = time.perf_counter()

        embeddings = self.embedder().embed(pictures, on_batch=on_image)
        embedded = time.perf_counter()
        bank = self._memory_bank()
        raw = [bank.patch_scores(e.patches) for e in embeddings]
        queries = [
            ImageFeatures(t, e.patches, e.grid, self._normalise(r), e.pooled)
            for t, e, r in zip(titles, embeddings, raw, strict=True)
        ]
        scored = time.perf_counter()

        method, index = self._support()
        prediction = method.predict(queries)
        results = [
            self._answer(query, raw[q], picture.size, prediction, q, method, index)
            for q, (query, picture) in enumerate(zip(queries, pictures, strict=True))
        ]
        finished = time.perf_counter()

        # A batch shares its stages; each image is charged an equal part.
        share = 1.0 / len(queries)
        for result in results:
            result.timing = {
                "load": (loaded - started) * share,
                "embed": (embedded - loaded) * share,
                "score": (scored - embedded) * share,
                "classify": (finished - scored) * share,
                "total": (finished - started) * share,
            }
        return results

    def _answer(
        self,
        query: ImageFeatures,
        raw_scores: torch.Tensor,
        size: tuple[int, int],
        prediction: Prediction,
        q: int,
        method: PatchProtoNetworks,
        index: list[tuple[str, Example]],
    ) -> Classification:
        names = self.type_names
        distances = prediction.distances[q].tolist()
        scale = self.settings.confidence_temperature
        confidences = torch.softmax(-prediction.distances[q].double() / scale, dim=0).tolist()
        ranking = sorted(
            (
                TypeScore(names[y], float(distances[y]), float(confidences[y]))
                for y in range(len(names))
            ),
            key=lambda entry: entry.distance,
        )
        predicted = names.index(ranking[0].type)

        explanation = method.explain(query)
        deciding = []
        for patch in explanation["patches"][:MAX_DECIDING_PATCHES]:
            match = patch["nearest"][predicted]
            support_type, support = index[match["support"]]
            deciding.append(
                DecidingPatch(
                    box=_cell_box(patch["index"], query.grid, size),
                    weight=float(patch["weight"]),
                    score=float(patch["score"]),
                    distance=float(match["distance"]),
                    support_type=support_type,
                    support_example=support.name,
                    support_box=_cell_box(match["patch"], support.grid, support.size),
                )
            )

        score = image_score(raw_scores)
        side = self.settings.image_size
        heatmap = _resize_map(anomaly_map(raw_scores, query.grid, (side, side)), size)
        return Classification(
            name=query.key,
            predicted_type=ranking[0].type,
            ranking=ranking,
            anomaly_score=score,
            threshold=self.threshold,
            is_anomalous=score > self.threshold,
            heatmap=heatmap,
            deciding_patches=deciding,
            image_size=size,
        )

    # -- saving and loading --------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "memory_bank": self.memory_bank.contiguous(),
            "holdout_scores": self.holdout_scores.contiguous(),
        }
        if self.position_norm is not None:
            tensors["position_mean"] = self.position_norm.mean
            tensors["position_std"] = self.position_norm.std
        for examples in self.examples.values():
            for e in examples:
                tensors[f"support/{e.sha256}/patches"] = e.patches.contiguous()
                tensors[f"support/{e.sha256}/patch_scores"] = e.patch_scores.contiguous()
                tensors[f"support/{e.sha256}/pooled"] = e.pooled.contiguous()
        return tensors

    def _index(self, tensors_sha256: str) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "patchproto-defect-model",
            "saved": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": asdict(self.settings),
            "threshold": self.threshold,
            "tensors": {"file": TENSORS_FILE, "sha256": tensors_sha256},
            "types": {
                t: [
                    {
                        "name": e.name,
                        "sha256": e.sha256,
                        "image": e.image_file,
                        "image_sha256": content_key(e.image_bytes),
                        "size": list(e.size),
                        "grid": list(e.grid),
                    }
                    for e in self.examples[t]
                ]
                for t in self.type_names
            },
        }

    def _write(self, folder: Path) -> None:
        """Write the complete model into the empty ``folder``."""
        (folder / EXAMPLES_DIR).mkdir()
        written: set[str] = set()
        for examples in self.examples.values():
            for e in examples:
                if e.image_file not in written:
                    _write_file(folder / e.image_file, e.image_bytes)
                    written.add(e.image_file)
        data = save(self._tensors())
        _write_file(folder / TENSORS_FILE, data)
        index = json.dumps(self._index(content_key(data)), indent=2, ensure_ascii=False)
        _write_file(folder / MODEL_FILE, index.encode("utf-8"))
        _fsync_dir(folder / EXAMPLES_DIR)
        _fsync_dir(folder)

    def save(self, folder: str | Path) -> Path:
        """Write the model to ``folder`` atomically, replacing the model there.

        The new model is written completely into a temporary folder beside ``folder``; then the
        old folder is renamed to a backup, the new one renamed into place and the backup deleted.
        If the process dies between the two renames, :meth:`load` names the backup to restore.

        Raises:
            ModelError: ``folder`` exists and is something other than a model or an empty folder.
        """
        # NOTE: there is no lock between processes: two saves to one folder at the same time
        # each leave a complete model, but the later rename wins and the other's edit is lost.
        # A process killed while writing leaves a hidden ``.<name>.saving-*`` folder beside the
        # model; it is never read and can be deleted.
        target = check_save_target(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.saving-"))
        try:
            staging.chmod(0o755)
            self._write(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

        backup = backup_path(target)
        if target.exists():
            if backup.exists():
                shutil.rmtree(backup)
            os.rename(target, backup)
        os.rename(staging, target)
        _fsync_dir(target.parent)
        if backup.exists():
            shutil.rmtree(backup, ignore_errors=True)
        logger.info("Saved the model to %s", target)
        return target

    @classmethod
    def load(cls, folder: str | Path, weights: str | Path | None = None) -> DefectModel:
        """Read a model folder; nothing in it is executed (JSON and safetensors only).

        Args:
            folder: The model folder.
            weights: Backbone weights file, if not where it was at fit time.

        Raises:
            ModelError: The folder is missing, from another format version, or has missing or
                damaged files (the message names the file and the fix).
        """
        folder = Path(folder)
        if not folder.exists():
            backup = backup_path(folder)
            if backup.is_dir():
                msg = (
                    f"{folder}: no model folder here, but {backup} holds the previous model "
                    "from a save that was interrupted. Restore it with "
                    f"`mv '{backup}' '{folder}'`, then try again"
                )
                raise ModelError(msg)
            msg = (
                f"{folder}: no such model folder. Check the path, or fit one with `patchproto fit`"
            )
            raise ModelError(msg)
        if not folder.is_dir():
            raise ModelError(f"{folder}: is a file, not a model folder. Give the model folder")

        index_path = folder / MODEL_FILE
        if not index_path.is_file():
            msg = (
                f"{index_path}: missing, so {folder} is not a (complete) model folder. {REFIT_FIX}"
            )
            raise ModelError(msg)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            msg = f"{index_path}: unreadable or corrupt ({error}). {REFIT_FIX}"
            raise ModelError(msg) from error
        if not isinstance(index, dict):
            raise ModelError(f"{index_path}: not a model index (a JSON object). {REFIT_FIX}")
        found = index.get("format_version")
        if found not in READABLE_VERSIONS:
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            msg = (
                f"{folder}: model format version {found!r}, but this patchproto "
                f"({__version__}) reads versions {readable}. {REFIT_FIX}"
            )
            raise ModelError(msg)

        try:
            settings = ModelSettings(**index["settings"])
            settings.m = None if settings.m is None else int(settings.m)
            threshold = float(index["threshold"])
            tensors_meta = index["tensors"]
            types = index["types"]
            entries = {t: list(v) for t, v in types.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            problem = f"{type(error).__name__}: {error}"
            msg = f"{index_path}: incomplete or malformed ({problem}). {REFIT_FIX}"
            raise ModelError(msg) from error

        tensors_path = folder / TENSORS_FILE
        if not tensors_path.is_file():
            raise ModelError(f"{tensors_path}: missing from the model folder. {REFIT_FIX}")
        data = tensors_path.read_bytes()
        if content_key(data) != tensors_meta.get("sha256"):
            msg = f"{tensors_path}: corrupt (its checksum does not match {MODEL_FILE}). {REFIT_FIX}"
            raise ModelError(msg)
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelError(f"{tensors_path}: corrupt ({error}). {REFIT_FIX}") from error

        def tensor(key: str) -> torch.Tensor:
            if key not in tensors:
                raise ModelError(f"{tensors_path}: has no tensor {key!r}. {REFIT_FIX}")
            return tensors[key]

        examples: dict[str, list[Example]] = {}
        try:
            for type_name, items in entries.items():
                for item in items:
                    image_path = folder / item["image"]
                    if not image_path.is_file():
                        raise ModelError(
                            f"{image_path}: example image missing from the model folder "
                            f"(example {item['name']!r} of {type_name!r}). {REFIT_FIX}, or "
                            f"remove the example with `patchproto remove-example`"
                        )
                    image_bytes = image_path.read_bytes()
                    if content_key(image_bytes) != item["image_sha256"]:
                        raise ModelError(
                            f"{image_path}: corrupt (its checksum does not match {MODEL_FILE}). "
                            f"{REFIT_FIX}"
                        )
                    key = f"support/{item['sha256']}"
                    examples.setdefault(type_name, []).append(
                        Example(
                            name=item["name"],
                            sha256=item["sha256"],
                            image_bytes=image_bytes,
                            image_suffix=Path(item["image"]).suffix,
                            size=(int(item["size"][0]), int(item["size"][1])),
                            grid=(int(item["grid"][0]), int(item["grid"][1])),
                            patches=tensor(f"{key}/patches"),
                            patch_scores=tensor(f"{key}/patch_scores"),
                            pooled=tensor(f"{key}/pooled"),
                        )
                    )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            if isinstance(error, ModelError):
                raise
            problem = f"{type(error).__name__}: {error}"
            msg = f"{index_path}: malformed example entry ({problem}). {REFIT_FIX}"
            raise ModelError(msg) from error

        position_norm = None
        if settings.score_norm == "position":
            try:
                position_norm = PositionNorm(tensor("position_mean"), tensor("position_std"))
            except ValueError as error:
                raise ModelError(f"{tensors_path}: {error}. {REFIT_FIX}") from error
        try:
            return cls(
                settings,
                tensor("memory_bank"),
                threshold,
                tensor("holdout_scores"),
                examples,
                weights,
                position_norm,
            )
        except ModelError as error:
            raise ModelError(f"{index_path}: {error}. {REFIT_FIX}") from error

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary: settings, threshold, bank size and the types with their examples."""
        return {
            "format_version": FORMAT_VERSION,
            "settings": asdict(self.settings),
            "threshold": self.threshold,
            "memory_bank": list(self.memory_bank.shape),
            "types": self.types(),
        }
