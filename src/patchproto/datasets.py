"""Image data sets: the MVTec AD folder layout and a plain layout for a user's own images.

MVTec AD layout (the root is one category, or holds many)::

    <category>/train/good/*                          normal images (memory bank)
    <category>/test/good/*                           normal images held back for testing
    <category>/test/<defect_type>/*                  defective images, one folder per type
    <category>/ground_truth/<defect_type>/<stem>_mask.png

Plain layout::

    <normal>/*                                       normal images
    <defects>/<defect_type>/*                        a few examples of each type
    <defects>/<defect_type>/<stem>_mask.png          optional masks beside them
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from patchproto.images import is_image_file, list_images

logger = logging.getLogger(__name__)

DATA_ENV = "PATCHPROTO_DATA"
GOOD = "good"
MASK_SUFFIX = "_mask"


class DatasetError(ValueError):
    """A folder that does not have the expected layout; the message names it and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image with its label (``"good"`` or a defect type) and its mask, if any."""

    path: Path
    label: str
    mask: Path | None = None


@dataclass
class Category:
    """One product category: normal images for the memory bank and labelled test images."""

    name: str
    root: Path
    train_good: list[Path]
    test_good: list[Path] = field(default_factory=list)
    defects: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def defect_types(self) -> list[str]:
        """Defect type names, sorted."""
        return sorted(self.defects)

    def test_samples(self) -> list[Sample]:
        """Held-back normal images followed by every defective image."""
        good = [Sample(path, GOOD) for path in self.test_good]
        return good + [s for t in self.defect_types for s in self.defects[t]]


def default_data_root() -> Path:
    """The real data: ``$PATCHPROTO_DATA`` if set, else ``../shared/data`` from the working dir."""
    return Path(os.environ.get(DATA_ENV, Path.cwd().parent / "shared" / "data"))


def _images_or_fail(folder: Path, what: str) -> list[Path]:
    images = [p for p in list_images(folder) if not p.stem.endswith(MASK_SUFFIX)]
    if not images:
        msg = f"{folder}: no images in this {what} folder. Add images, or remove the empty folder"
        raise DatasetError(msg)
    return images


def _mask_for(image: Path, mask_folder: Path | None) -> Path | None:
    if mask_folder is None:
        return None
    mask = mask_folder / f"{image.stem}{MASK_SUFFIX}.png"
    return mask if mask.is_file() else None


def is_category(folder: Path) -> bool:
    """Whether ``folder`` looks like one MVTec AD category (it has ``train/good``)."""
    return (folder / "train" / GOOD).is_dir()


def load_category(folder: Path) -> Category:
    """Read one category in the MVTec AD layout.

    Raises:
        DatasetError: ``train/good`` is missing or empty, or a defect folder is empty.
    """
    folder = Path(folder)
    if not is_category(folder):
        msg = (
            f"{folder}: not an MVTec AD category (no train/good folder). "
            "Expected <category>/train/good, <category>/test/<type> and optionally "
            "<category>/ground_truth/<type>/<stem>_mask.png"
        )
        raise DatasetError(msg)
    train_good = _images_or_fail(folder / "train" / GOOD, "normal training")
    test_root = folder / "test"
    test_good: list[Path] = []
    defects: dict[str, list[Sample]] = {}
    if test_root.is_dir():
        for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            if type_dir.name == GOOD:
                test_good = _images_or_fail(type_dir, "normal test")
                continue
            mask_dir = folder / "ground_truth" / type_dir.name
            masks = mask_dir if mask_dir.is_dir() else None
            defects[type_dir.name] = [
                Sample(p, type_dir.name, _mask_for(p, masks))
                for p in _images_or_fail(type_dir, "defect type")
            ]
    return Category(folder.name, folder, train_good, test_good, defects)


def load_mvtec(root: Path, categories: list[str] | None = None) -> list[Category]:
    """Read every category under ``root`` (or ``root`` itself if it is one category).

    Args:
        root: A category folder, or a folder of category folders.
        categories: Names to keep; all when ``None``.

    Raises:
        DatasetError: ``root`` is missing, holds no category, or a named category is absent.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"{root}: no such folder. Give the data root (or set ${DATA_ENV})"
        raise DatasetError(msg)
    if is_category(root):
        found = {root.name: root}
    else:
        found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_category(p)}
    if not found:
        msg = (
            f"{root}: no MVTec AD category here. Each category needs a train/good folder of "
            "normal images and test/<defect_type> folders"
        )
        raise DatasetError(msg)
    wanted = categories or list(found)
    missing = [name for name in wanted if name not in found]
    if missing:
        msg = f"{root}: no category named {', '.join(missing)}. Available: {', '.join(found)}"
        raise DatasetError(msg)
    return [load_category(found[name]) for name in wanted]


def load_plain(normal: Path, defects: Path | None = None, name: str | None = None) -> Category:
    """Read a user's own images: a folder of normal images and one folder per defect type.

    Masks are optional: ``<stem>_mask.png`` beside a defect image is taken as its mask.

    Raises:
        DatasetError: A folder is missing, holds no images, or ``defects`` holds no type folder.
    """
    normal, defect_root = Path(normal), Path(defects) if defects else None
    if not normal.is_dir():
        raise DatasetError(f"{normal}: no such folder of normal images. Check the path")
    train_good = _images_or_fail(normal, "normal")
    types: dict[str, list[Sample]] = {}
    if defect_root is not None:
        if not defect_root.is_dir():
            raise DatasetError(f"{defect_root}: no such folder of defect types. Check the path")
        stray = [p.name for p in defect_root.iterdir() if is_image_file(p)]
        if stray:
            msg = (
                f"{defect_root}: holds images directly ({', '.join(stray[:3])}). Put each "
                "defect type's examples in a folder named after the type"
            )
            raise DatasetError(msg)
        for type_dir in sorted(p for p in defect_root.iterdir() if p.is_dir()):
            types[type_dir.name] = [
                Sample(p, type_dir.name, _mask_for(p, type_dir))
                for p in _images_or_fail(type_dir, "defect type")
            ]
        if not types:
            msg = f"{defect_root}: no defect type folders. Make one folder per defect type"
            raise DatasetError(msg)
    return Category(name or normal.name, normal, train_good, [], types)
