"""Shared test fixtures: synthetic images and data sets, random-weight backbones, the real data.

Everything synthetic is drawn from seeded numpy generators, so every run sees the same pixels.

Fixtures:
    make_image: ``make_image(path, size=(64, 48), mode="RGB", seed=0, box=None, fmt=None)``
        writes a textured image (a smooth gradient plus seeded noise) and returns its path. ``box``
        ``(x0, y0, x1, y1)`` paints a bright defect there; ``fmt`` is a Pillow format name
        (default from the suffix).
    make_category: ``make_category(root, name="widget", n_train=6, n_good=3,
        defects={"scratch": 3, "stain": 2}, size=(64, 48), suffix=".png", masks=True, seed=0)``
        writes one category in the MVTec AD layout under ``root`` (defects get a bright box and,
        if ``masks``, a ``ground_truth/<type>/<stem>_mask.png`` of it) and returns the category
        folder. ``masks`` may also be a set of defect types that get masks.
    mvtec_root: A tmp folder holding two categories, ``widget`` (PNG, masks) and ``gizmo`` (JPEG,
        grayscale, masks), built with ``make_category``.
    plain_root: A tmp folder with ``normal/`` (5 images) and ``defects/{dent,spot}/`` (2 images
        each; ``dent`` with ``<stem>_mask.png`` beside its images).
    random_backbone: ``resnet18`` with random weights (session-wide, read-only).
    data_root: The real data root (``$PATCHPROTO_DATA`` or ``../shared/data``); skips the test
        when it is absent.
    hermetic_cache: Points ``$PATCHPROTO_CACHE`` at an empty tmp folder for the test.
    real_slice: ``real_slice(category, picks)`` links the first ``count`` images of each real
        folder in ``picks`` (``{"train/good": 40, ...}``) and the category's ``ground_truth``
        into a tmp copy of the category and returns it; skips the test when the category is
        absent.

Sizes are tiny (64 x 48 images, embedded at 64 px) so that the tests stay fast on a CPU. For the
same reason torch and faiss run on one thread during tests: on tensors this small, a second thread
only adds synchronisation, which on a busy shared machine costs up to a hundred times the work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchproto.backbones import Backbone, load_backbone
from patchproto.datasets import default_data_root


def pytest_configure(config: pytest.Config) -> None:
    """Run torch and faiss on one thread (see the module docstring)."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


Box = tuple[int, int, int, int]


def synthetic_array(size: tuple[int, int], seed: int, box: Box | None = None) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 texture: gradient plus seeded noise, optional bright box."""
    width, height = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = 90 + 40 * np.sin(xs / 7.0) + 30 * np.cos(ys / 5.0)
    pixels = base[..., None] + rng.normal(0, 8, (height, width, 3))
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 250 - rng.normal(0, 4, (y1 - y0, x1 - x0, 3)).clip(0)
    return pixels.clip(0, 255).astype(np.uint8)


def _write(
    path: Path,
    size: tuple[int, int] = (64, 48),
    mode: str = "RGB",
    seed: int = 0,
    box: Box | None = None,
    fmt: str | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(synthetic_array(size, seed, box)).convert(mode)
    image.save(path, format=fmt)
    return path


def _defect_box(size: tuple[int, int], seed: int) -> Box:
    width, height = size
    rng = np.random.default_rng(1000 + seed)
    w, h = max(4, width // 5), max(4, height // 5)
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    return (x0, y0, x0 + w, y0 + h)


def _category(
    root: Path,
    name: str = "widget",
    n_train: int = 6,
    n_good: int = 3,
    defects: dict[str, int] | None = None,
    size: tuple[int, int] = (64, 48),
    suffix: str = ".png",
    masks: bool | set[str] = True,
    seed: int = 0,
    mode: str = "RGB",
) -> Path:
    defects = {"scratch": 3, "stain": 2} if defects is None else defects
    folder = Path(root) / name
    counter = seed * 10_000
    for i in range(n_train):
        _write(folder / "train" / "good" / f"{i:03d}{suffix}", size, mode, counter)
        counter += 1
    for i in range(n_good):
        _write(folder / "test" / "good" / f"{i:03d}{suffix}", size, mode, counter)
        counter += 1
    for kind, count in defects.items():
        (folder / "test" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            box = _defect_box(size, counter)
            _write(folder / "test" / kind / f"{i:03d}{suffix}", size, mode, counter, box)
            counter += 1
            if masks is True or (isinstance(masks, set) and kind in masks):
                mask = np.zeros((size[1], size[0]), dtype=np.uint8)
                x0, y0, x1, y1 = box
                mask[y0:y1, x0:x1] = 255
                target = folder / "ground_truth" / kind / f"{i:03d}_mask.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(target)
    return folder


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """Factory writing one seeded synthetic image (see the module docstring)."""
    return _write


@pytest.fixture
def make_category() -> Callable[..., Path]:
    """Factory writing one MVTec AD layout category (see the module docstring)."""
    return _category


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Two synthetic categories: ``widget`` (RGB PNG) and ``gizmo`` (grayscale JPEG)."""
    root = tmp_path / "mvtec"
    _category(root, "widget", seed=1)
    _category(root, "gizmo", seed=2, suffix=".jpg", mode="L", defects={"crack": 2})
    return root


@pytest.fixture
def plain_root(tmp_path: Path) -> Path:
    """``normal/`` and ``defects/{dent,spot}/``; ``dent`` images have masks beside them."""
    root = tmp_path / "plain"
    for i in range(5):
        _write(root / "normal" / f"n{i}.png", seed=500 + i)
    for kind in ("dent", "spot"):
        for i in range(2):
            box = _defect_box((64, 48), 600 + i)
            _write(root / "defects" / kind / f"{kind}{i}.png", seed=600 + i, box=box)
            if kind == "dent":
                mask = np.zeros((48, 64), dtype=np.uint8)
                mask[box[1] : box[3], box[0] : box[2]] = 255
                Image.fromarray(mask).save(root / "defects" / kind / f"{kind}{i}_mask.png")
    return root


@pytest.fixture(scope="session")
def random_backbone() -> Backbone:
    """``resnet18`` with random weights; shared across tests, so never modify it."""
    import torch

    torch.manual_seed(0)
    return load_backbone("resnet18", pretrained=False)


@pytest.fixture
def data_root() -> Path:
    """The real data root, or skip the test naming ``PATCHPROTO_DATA``."""
    root = default_data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set PATCHPROTO_DATA to the data root")
    return root


@pytest.fixture
def hermetic_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty feature cache folder, also set as ``$PATCHPROTO_CACHE``."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PATCHPROTO_CACHE", str(folder))
    return folder


@pytest.fixture
def real_slice(tmp_path: Path, data_root: Path) -> Callable[[str, dict[str, int]], Path]:
    """Make a small copy of a real category out of links (see the module docstring)."""

    def make(category: str, picks: dict[str, int]) -> Path:
        source = data_root / category
        if not source.is_dir():
            pytest.skip(f"{source} not found; set PATCHPROTO_DATA to the data root")
        subset = tmp_path / "slice" / category
        for folder, count in picks.items():
            (subset / folder).mkdir(parents=True)
            for image in sorted((source / folder).iterdir())[:count]:
                (subset / folder / image.name).symlink_to(image)
        (subset / "ground_truth").symlink_to(source / "ground_truth")
        return subset

    return make
