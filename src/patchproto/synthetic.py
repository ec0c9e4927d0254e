"""A seeded synthetic defect data set: textured surfaces with drawn-in defects of a few types.

It exists so that the demo and the tests run on a fresh machine with no data: every picture is
made from numpy noise, so the set is the same on every machine for a given seed. A surface is
one of three textures (brushed metal, woven cloth, granular coating), varied per image in
brightness, tint, and the phase and grain of its texture. Four defect types are drawn on it:

- ``scratch``: a thin bright straight line,
- ``spot``: a soft blob of a brown contamination colour,
- ``crack``: a dark branching polyline,
- ``hole``: a dark disc with a light rim.

The set is written as::

    OUT/normal/normal_000.png                      good surfaces
    OUT/defects/<type>/<type>_s00.png              a few support examples per type
    OUT/queries/<type>/<type>_q00.png              images to classify, by true type
    OUT/ground_truth/<type>/<stem>_mask.png        the drawn defect, for display

Example:
    >>> import tempfile
    >>> demo = write_synthetic_set(tempfile.mkdtemp(), normal=2, support=1, queries=1, size=64)
    >>> sorted(demo.support), len(demo.normal)
    (['crack', 'hole', 'scratch', 'spot'], 2)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, uniform_filter1d

logger = logging.getLogger(__name__)

TEXTURES = ("brushed", "woven", "granular")
DEFECT_TYPES = ("scratch", "spot", "crack", "hole")


@dataclass
class SyntheticSet:
    """Paths of a written synthetic set.

    Attributes:
        root: The folder it was written to.
        normal: Good surfaces.
        support: Per defect type, its support examples.
        queries: Per defect type, its query images.
        masks: Per defect image path, its mask path.
    """

    root: Path
    normal: list[Path] = field(default_factory=list)
    support: dict[str, list[Path]] = field(default_factory=dict)
    queries: dict[str, list[Path]] = field(default_factory=dict)
    masks: dict[Path, Path] = field(default_factory=dict)

    @property
    def normal_dir(self) -> Path:
        """The folder of good surfaces."""
        return self.root / "normal"

    @property
    def defects_dir(self) -> Path:
        """The folder of support examples, one sub-folder per type."""
        return self.root / "defects"

    @property
    def queries_dir(self) -> Path:
        """The folder of query images, one sub-folder per true type."""
        return self.root / "queries"


def surface(rng: np.random.Generator, size: int = 256, texture: str = "brushed") -> np.ndarray:
    """A good surface as a ``(size, size, 3)`` float array in ``[0, 1]``.

    Args:
        rng: Source of randomness (the image varies with it).
        size: Side in pixels.
        texture: One of :data:`TEXTURES`.
    """
    if texture not in TEXTURES:
        msg = f"unknown texture {texture!r}. Choose one of: {', '.join(TEXTURES)}"
        raise ValueError(msg)
    noise = rng.standard_normal((size, size))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if texture == "brushed":
        # Long horizontal streaks: noise averaged along rows, plus fine grain.
        streaks = uniform_filter1d(noise, size=int(rng.integers(30, 60)), axis=1, mode="wrap")
        grey = 0.55 + 0.9 * streaks + 0.02 * rng.standard_normal((size, size))
    elif texture == "woven":
        period = rng.uniform(10.0, 12.0)
        phase = rng.uniform(0, 2 * math.pi, size=2)
        warp = np.sin(2 * math.pi * x / period + phase[0])
        weft = np.sin(2 * math.pi * y / period + phase[1])
        grey = 0.5 + 0.1 * warp * weft + 0.04 * gaussian_filter(noise, 1.0)
    else:
        grey = 0.5 + 0.5 * gaussian_filter(noise, rng.uniform(1.2, 1.8))
    grey = grey + rng.uniform(-0.05, 0.05)
    tint = 1.0 + rng.uniform(-0.03, 0.03, size=3)
    return np.clip(grey[..., None] * tint[None, None, :], 0.0, 1.0)


def _mask_canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (size, size), 0)
    return canvas, ImageDraw.Draw(canvas)


def _blend(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    return image * (1.0 - alpha) + colour * alpha


def _centre(rng: np.random.Generator, size: int, margin: float) -> tuple[float, float]:
    low, high = margin * size, (1 - margin) * size
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect on a surface.

    Args:
        image: ``(size, size, 3)`` surface in ``[0, 1]`` (not modified).
        kind: One of :data:`DEFECT_TYPES`.
        rng: Source of randomness (position, size, shape).

    Returns:
        The defective image and its boolean mask.
    """
    size = image.shape[0]
    scale = size / 256.0
    canvas, draw = _mask_canvas(size)
    cx, cy = _centre(rng, size, 0.25)

    if kind == "scratch":
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(45, 80) * scale
        dx, dy = half * math.cos(angle), half * math.sin(angle)
        draw.line(
            [(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(1, round(2 * scale))
        )
        alpha = np.asarray(canvas, dtype=np.float64) / 255.0
        out = _blend(image, 0.9 * alpha, np.array([0.95, 0.95, 0.97]))
    elif kind == "spot":
        rx, ry = rng.uniform(9, 16, size=2) * scale
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        alpha = gaussian_filter(np.asarray(canvas, dtype=np.float64) / 255.0, 2.0 * scale)
        colour = np.array([0.55, 0.33, 0.12]) + rng.uniform(-0.04, 0.04, size=3)
        out = _blend(image, 0.9 * alpha, colour)
    elif kind == "crack":
        width = max(1, round(3 * scale))

        def walk(x: float, y: float, heading: float, steps: int) -> list[tuple[float, float]]:
            points = [(x, y)]
            for _ in range(steps):
                heading += rng.uniform(-0.6, 0.6)
                length = rng.uniform(7, 12) * scale
                x, y = x + length * math.cos(heading), y + length * math.sin(heading)
                points.append((x, y))
            return points

        trunk = walk(cx, cy, rng.uniform(0, 2 * math.pi), int(rng.integers(8, 12)))
        draw.line(trunk, fill=255, width=width, joint="curve")
        for _ in range(int(rng.integers(1, 3))):
            start = trunk[int(rng.integers(2, len(trunk) - 2))]
            branch = walk(*start, rng.uniform(0, 2 * math.pi), int(rng.integers(3, 6)))
            draw.line(branch, fill=255, width=max(1, width - 1), joint="curve")
        alpha = np.asarray(canvas, dtype=np.float64) / 255.0
        out = _blend(image, 0.9 * alpha, np.array([0.06, 0.05, 0.05]))
    elif kind == "hole":
        radius = rng.uniform(8, 13) * scale
        rim = radius + 3 * scale
        draw.ellipse([cx - rim, cy - rim, cx + rim, cy + rim], fill=128)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        levels = np.asarray(canvas, dtype=np.float64)
        out = _blend(image, (levels == 128) * 0.7, np.array([0.85, 0.85, 0.85]))
        out = _blend(out, (levels == 255) * 0.95, np.array([0.02, 0.02, 0.03]))
    else:
        msg = f"unknown defect type {kind!r}. Choose one of: {', '.join(DEFECT_TYPES)}"
        raise ValueError(msg)
    return np.clip(out, 0.0, 1.0), np.asarray(canvas) > 0


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        Image.fromarray((array * 255).astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray((array * 255).round().astype(np.uint8), mode="RGB").save(path)
    return path


def write_synthetic_set(
    root: str | Path,
    seed: int = 0,
    normal: int = 36,
    support: int = 5,
    queries: int = 10,
    size: int = 256,
    texture: str = "brushed",
    types: tuple[str, ...] = DEFECT_TYPES,
) -> SyntheticSet:
    """Write a synthetic defect set (layout in the module docstring).

    Args:
        root: Output folder (created; existing files of the same names are overwritten).
        seed: The set is a function of the seed and the other arguments.
        normal: Good surfaces.
        support: Support examples per defect type.
        queries: Query images per defect type.
        size: Side of every image in pixels.
        texture: One of :data:`TEXTURES`.
        types: Defect types to draw, from :data:`DEFECT_TYPES`.

    Returns:
        The paths written.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = SyntheticSet(root)
    for i in range(normal):
        written.normal.append(
            _save(surface(rng, size, texture), root / "normal" / f"normal_{i:03d}.png")
        )
    for kind in types:
        for split, count, tag in (("defects", support, "s"), ("queries", queries, "q")):
            paths = written.support if split == "defects" else written.queries
            paths[kind] = []
            for i in range(count):
                image, mask = add_defect(surface(rng, size, texture), kind, rng)
                stem = f"{kind}_{tag}{i:02d}"
                path = _save(image, root / split / kind / f"{stem}.png")
                written.masks[path] = _save(mask, root / "ground_truth" / kind / f"{stem}_mask.png")
                paths[kind].append(path)
    logger.info("Synthetic set written to %s", root)
    return written
