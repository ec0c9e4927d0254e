"""Command-line options that several commands share, declared once.

``detect``, ``evaluate``, ``sweep`` and ``fit`` all embed images and build a memory bank, so they
take the same backbone, size, cache and coreset options; each is an ``Annotated`` type here, used
as ``backbone: Backbone`` (required) or ``dim: Dim = None`` in a command's signature.
:func:`check_embedding_options` validates them the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchproto.backbones import BACKBONES

Root = Annotated[Path, typer.Argument(help="MVTec AD layout root, or one category folder.")]
Categories = Annotated[
    list[str] | None,
    typer.Option("--category", "-c", help="Category to run (repeat for several); default all."),
]
Backbone = Annotated[str, typer.Option("--backbone", "-b", help=f"One of {', '.join(BACKBONES)}.")]
Weights = Annotated[Path | None, typer.Option("--weights", help="Weights file for the backbone.")]
ImageSize = Annotated[int, typer.Option("--image-size", help="Network input side, px.")]
Dim = Annotated[int | None, typer.Option("--dim", help="Pool patch embeddings to N channels.")]
CoresetRatio = Annotated[
    float, typer.Option("--coreset-ratio", help="Share of normal patches kept in the memory bank.")
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Feature cache folder (default: $PATCHPROTO_CACHE, else ~/.cache/patchproto).",
    ),
]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the cache.")]
Threads = Annotated[
    int,
    typer.Option(
        "--threads",
        help="CPU threads for torch and faiss (0: their default; 1 is fastest on a busy CPU).",
    ),
]
ScoreNorm = Annotated[
    str,
    typer.Option(
        "--score-norm",
        help="Patch scores Algorithm 2 reads: position (standardised per grid position by "
        "held-back normal images, which removes PatchCore's higher scores at the image border) "
        "or none (PatchCore's scores as they are, as in the paper).",
    ),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def check_embedding_options(
    backbone: str, coreset_ratio: float, image_size: int, dim: int | None, threads: int = 0
) -> None:
    """Validate the options every embedding command shares.

    Raises:
        ValueError: An option is out of range; the message names it and the allowed values.
    """
    if backbone not in BACKBONES:
        msg = f"unknown backbone {backbone!r}. Choose one of: {', '.join(BACKBONES)}"
        raise ValueError(msg)
    if not 0 < coreset_ratio <= 1:
        raise ValueError(f"--coreset-ratio {coreset_ratio} must be in (0, 1]")
    if image_size < 32 or image_size % 16:
        raise ValueError(f"--image-size {image_size} must be a multiple of 16 and at least 32")
    if dim is not None and dim < 1:
        raise ValueError(f"--dim {dim} must be a positive number of channels")
    if threads < 0:
        raise ValueError(f"--threads {threads} must be 0 (the default) or more")
