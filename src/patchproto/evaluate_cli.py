"""The ``evaluate`` command: episodic few-shot evaluation of every method, written as a report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from patchproto.backbones import BACKBONES, WeightsError
from patchproto.cache import default_cache_dir
from patchproto.datasets import DatasetError
from patchproto.embedding import DEFAULT_IMAGE_SIZE
from patchproto.evaluation import (
    DEFAULT_EPISODES,
    DEFAULT_SHOTS,
    SCORE_NORMS,
    EvaluationConfig,
    check_methods,
    check_shots,
    effective_params,
    run_evaluation,
)
from patchproto.images import ImageError
from patchproto.methods import METHODS
from patchproto.patchcore import DEFAULT_CORESET_RATIO

logger = logging.getLogger(__name__)


def parse_list(text: str, kind: type, option: str) -> list:
    """Split ``"1,3,5"`` into typed values; a bad item names the option and the expected form.

    Raises:
        ValueError: An item is not a ``kind``.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [kind(item) for item in items]
    except ValueError as error:
        expected = "whole numbers" if kind is int else "numbers"
        msg = f"{option} {text!r}: expected comma-separated {expected}, such as 1,3,5"
        raise ValueError(msg) from error


def common_config(
    root: Path,
    category: list[str] | None,
    backbone: str,
    weights: Path | None,
    image_size: int,
    dim: int | None,
    coreset_ratio: float,
    cache_dir: Path | None,
    no_cache: bool,
    methods: list[str],
    shots: list[int],
    episodes: int,
    seed: int,
) -> EvaluationConfig:
    """Validate the options shared by ``evaluate`` and ``sweep`` into a configuration.

    Raises:
        ValueError: An option is out of range (the message names it).
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
    if episodes < 1:
        raise ValueError(f"--episodes {episodes} must be at least 1")
    if seed < 0:
        raise ValueError(f"--seed {seed} must be a non-negative integer")
    return EvaluationConfig(
        data_root=root,
        backbone=backbone,
        methods=check_methods(methods),
        categories=list(category) if category else None,
        weights=weights,
        image_size=image_size,
        dim=dim,
        coreset_ratio=coreset_ratio,
        shots=check_shots(shots),
        episodes=episodes,
        seed=seed,
        cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
    )


def check_score_norm(value: str) -> str:
    """Validate ``--score-norm``.

    Raises:
        ValueError: Not one of :data:`patchproto.evaluation.SCORE_NORMS`.
    """
    if value not in SCORE_NORMS:
        msg = f"--score-norm {value!r}: choose one of {', '.join(SCORE_NORMS)}"
        raise ValueError(msg)
    return value


# Errors about the data or the weights, reported as one line rather than a traceback.
DATA_ERRORS = (DatasetError, WeightsError, ImageError)


def evaluate_command(
    root: Path = typer.Argument(..., help="MVTec AD layout root, or one category folder."),
    category: list[str] | None = typer.Option(
        None, "--category", "-c", help="Category to run (repeat for several); default all."
    ),
    backbone: str = typer.Option(..., "--backbone", "-b", help=f"One of {', '.join(BACKBONES)}."),
    weights: Path | None = typer.Option(None, "--weights", help="Weights file for the backbone."),
    shots: str = typer.Option(
        ",".join(map(str, DEFAULT_SHOTS)), "--shots", help="Values of K, comma-separated."
    ),
    episodes: int = typer.Option(DEFAULT_EPISODES, "--episodes", "-e", help="Episodes per K."),
    methods: str = typer.Option(
        ",".join(METHODS), "--methods", help="Methods to compare, comma-separated."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the episodes and the coreset."),
    gamma: float | None = typer.Option(
        None, "--gamma", help="PatchProto: share of anomaly score to cover (Algorithm 2)."
    ),
    m: int | None = typer.Option(
        None, "--m", help="PatchProto: most patches kept per image (Algorithm 2)."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="PatchProto: softmax temperature of the patch scores."
    ),
    coreset_ratio: float = typer.Option(
        DEFAULT_CORESET_RATIO, "--coreset-ratio", help="Fraction of normal patches kept."
    ),
    image_size: int = typer.Option(DEFAULT_IMAGE_SIZE, "--image-size", help="Input side, px."),
    dim: int | None = typer.Option(None, "--dim", help="Pool patch embeddings to N channels."),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Feature cache folder (default: $PATCHPROTO_CACHE or ~/.cache/patchproto).",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the cache."),
    score_norm: str = typer.Option(
        "none",
        "--score-norm",
        help="Patch scores for PatchProto: none (the paper) or position (standardised per grid "
        "position by the test/good images, removing PatchCore's border bias).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
) -> None:
    """Compare few-shot methods on seeded episodes; write results.json, report.md, PNGs."""
    from patchproto.cli import console, fail, progress_bar
    from patchproto.report import REPORT_FILE, write_report

    started = time.perf_counter()
    try:
        config = common_config(
            root,
            category,
            backbone,
            weights,
            image_size,
            dim,
            coreset_ratio,
            cache_dir,
            no_cache,
            parse_list(methods, str, "--methods"),
            parse_list(shots, int, "--shots"),
            episodes,
            seed,
        )
        config.gamma, config.m, config.temperature = gamma, m, temperature
        config.score_norm = check_score_norm(score_norm)
        effective_params(config)
    except ValueError as error:
        raise fail(str(error)) from error
    try:
        record, results = run_evaluation(config, progress=progress_bar)
    except DATA_ERRORS as error:
        raise fail(str(error)) from error

    write_report(out, record, results)
    console.print(
        f"Wrote {out / REPORT_FILE} in {time.perf_counter() - started:.0f} s", highlight=False
    )
