"""The ``evaluate`` command: episodic few-shot evaluation of every method, written as a report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from patchproto import options as opt
from patchproto.backbones import WeightsError
from patchproto.cache import default_cache_dir
from patchproto.datasets import DatasetError
from patchproto.embedding import DEFAULT_IMAGE_SIZE
from patchproto.evaluation import (
    DEFAULT_EPISODES,
    DEFAULT_SHOTS,
    EvaluationConfig,
    check_methods,
    check_shots,
    effective_params,
    run_evaluation,
)
from patchproto.images import ImageError
from patchproto.methods import METHODS
from patchproto.patchcore import DEFAULT_CORESET_RATIO, DEFAULT_SCORE_NORM, SCORE_NORMS

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
    opt.check_embedding_options(backbone, coreset_ratio, image_size, dim)
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
        ValueError: Not one of :data:`patchproto.patchcore.SCORE_NORMS`.
    """
    if value not in SCORE_NORMS:
        msg = f"--score-norm {value!r}: choose one of {', '.join(SCORE_NORMS)}"
        raise ValueError(msg)
    return value


# Errors about the data or the weights, reported as one line rather than a traceback.
DATA_ERRORS = (DatasetError, WeightsError, ImageError)


def evaluate_command(
    root: opt.Root,
    backbone: opt.Backbone,
    out: opt.Out,
    category: opt.Categories = None,
    weights: opt.Weights = None,
    shots: str = typer.Option(
        ",".join(map(str, DEFAULT_SHOTS)), "--shots", help="Values of K, comma-separated."
    ),
    episodes: int = typer.Option(DEFAULT_EPISODES, "--episodes", "-e", help="Episodes per K."),
    methods: str = typer.Option(
        ",".join(METHODS), "--methods", help="Methods to compare, comma-separated."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seeds the episodes (the coreset always uses seed 0, as in detect)."
    ),
    gamma: float | None = typer.Option(
        None, "--gamma", help="PatchProto: share of anomaly score to cover (Algorithm 2)."
    ),
    m: int | None = typer.Option(
        None, "--m", help="PatchProto: most patches kept per image (Algorithm 2)."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="PatchProto: softmax temperature of the patch scores."
    ),
    coreset_ratio: opt.CoresetRatio = DEFAULT_CORESET_RATIO,
    image_size: opt.ImageSize = DEFAULT_IMAGE_SIZE,
    dim: opt.Dim = None,
    cache_dir: opt.CacheDir = None,
    no_cache: opt.NoCache = False,
    score_norm: opt.ScoreNorm = DEFAULT_SCORE_NORM,
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
