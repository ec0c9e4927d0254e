"""PatchProto's accuracy against its selection threshold, with and without the patch cap.

Wang and Zhuo, "PatchProto Networks for Few-shot Visual Anomaly Classification", Section 4.4
and Figure 3: the 1-shot accuracy of PatchProto for a range of thresholds ``gamma`` (Algorithm
2), once with no upper bound on the patches kept per image and once with the bound ``m``.
Every point is scored on the same seeded episodes, with Prototypical networks on the same
episodes as a reference. The mean number of patches kept per image is reported beside each
point, since it is what ``gamma``, ``m`` and the softmax temperature jointly decide.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer

from patchproto import options as opt
from patchproto.cache import FeatureCache, atomic_write_bytes
from patchproto.embedding import DEFAULT_IMAGE_SIZE
from patchproto.episodes import sample_episodes
from patchproto.evaluation import (
    BASELINE,
    OURS,
    EvaluationConfig,
    ProgressFactory,
    config_record,
    make_cache,
    no_progress,
    run_method,
    single_thread,
)
from patchproto.patchcore import DEFAULT_CORESET_RATIO, DEFAULT_SCORE_NORM
from patchproto.selection import DEFAULT_TEMPERATURE, check_selection_params, selection_order

logger = logging.getLogger(__name__)

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"
# Figure 3 spans gamma from 0 (one patch) to 1 (every patch) in steps of 0.1.
DEFAULT_GAMMAS = tuple(round(0.1 * i, 1) for i in range(11))


def mean_selected(scores: Sequence[Any], gamma: float, m: int | None, temperature: float) -> float:
    """Mean number of patches Algorithm 2 keeps per image."""
    return float(np.mean([len(selection_order(s, gamma, m, temperature)[0]) for s in scores]))


def run_sweep(
    config: EvaluationConfig,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    m: int = 32,
    shots: int = 1,
    cache: FeatureCache | None = None,
    progress: ProgressFactory = no_progress,
    uncapped_gammas: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Score PatchProto for every ``gamma``, uncapped and capped at ``m``, per category.

    Args:
        config: Data, backbone, episodes, seed and temperature (``config.methods`` is ignored).
        gammas: Thresholds to try, each in ``[0, 1]``.
        m: The patch cap of the capped curve.
        shots: K (the paper's Figure 3 is 1-shot).
        cache: A ready feature cache; built from ``config`` when ``None``.
        progress: Progress factory.
        uncapped_gammas: The thresholds of the uncapped curve; all of ``gammas`` when ``None``.
            An uncapped high ``gamma`` can keep hundreds of patches per image, and Equation 1
            compares every query patch with every support patch, so those points cost minutes.

    Returns:
        ``{"config", "categories": {name: {"ways", "left_out", "baseline", "points"}}}`` where
        each point has ``gamma``, ``m`` (``None`` uncapped), ``accuracy``, ``ci95`` and
        ``patches`` (mean kept per image).

    Raises:
        ValueError: A ``gamma``, ``m`` or the temperature is out of range.
    """
    from patchproto.datasets import load_mvtec

    started = time.perf_counter()
    temperature = config.temperature if config.temperature is not None else DEFAULT_TEMPERATURE
    uncapped = list(gammas if uncapped_gammas is None else uncapped_gammas)
    for gamma in [*gammas, *uncapped]:
        check_selection_params(gamma, m, temperature)
    categories = load_mvtec(Path(config.data_root), config.categories or None)
    cache = cache or make_cache(config)
    config.methods = [OURS, BASELINE]

    found: dict[str, Any] = {}
    for category in categories:
        prepared = config.prepare(category, cache, progress=progress)
        drawn = sample_episodes(prepared.labels, shots, config.episodes, config.seed, category.name)
        entry: dict[str, Any] = {
            "ways": list(drawn.ways),
            "left_out": drawn.left_out,
            "skipped": drawn.skipped,
            "points": [],
        }
        found[category.name] = entry
        if drawn.skipped:
            continue
        scores = [f.patch_scores for f in prepared.features]
        total = len(drawn.episodes) * (len(gammas) + len(uncapped) + 1)
        with progress(f"{category.name}: gamma sweep", total) as advance, single_thread():
            baseline = run_method(prepared, drawn, BASELINE, on_episode=advance)
            entry["baseline"] = {"accuracy": baseline.mean, "ci95": baseline.ci95}
            for cap, values in ((None, uncapped), (m, gammas)):
                for gamma in values:
                    params = {"gamma": gamma, "m": cap, "temperature": temperature}
                    result = run_method(prepared, drawn, OURS, params, advance)
                    entry["points"].append(
                        {
                            "gamma": gamma,
                            "m": cap,
                            "accuracy": result.mean,
                            "ci95": result.ci95,
                            "patches": mean_selected(scores, gamma, cap, temperature),
                        }
                    )
    extra = {
        "gammas": list(gammas),
        "uncapped_gammas": uncapped,
        "m": m,
        "sweep_shots": shots,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    config.temperature = temperature
    return {"config": config_record(config, cache.embedder, extra), "categories": found}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def sweep_markdown(document: dict[str, Any]) -> str:
    """The sweep as a markdown table per category."""
    config = document["config"]
    lines = [
        f"# PatchProto accuracy against gamma ({config['sweep_shots']}-shot)",
        "",
        f"Backbone `{config['backbone']}`, {config['episodes']} episodes, seed {config['seed']}, "
        f"temperature {config['temperature']}, patch scores normalised: "
        f"{config.get('score_norm', 'none')}, cap m = {config['m']}. Accuracy in % ± 95% "
        "interval; `patches` is the mean number kept per image.",
        "",
    ]
    for name, entry in document["categories"].items():
        lines += [f"## {name}", ""]
        if entry.get("skipped"):
            lines += [f"No episodes: {entry['skipped']}", ""]
            continue
        base = entry["baseline"]
        lines += [
            f"Prototype networks on the same episodes: {_percent(base['accuracy'])} ± "
            f"{_percent(base['ci95'])}.",
            "",
            "| gamma | no cap | patches | m = " + str(config["m"]) + " | patches |",
            "|---|---|---|---|---|",
        ]
        uncapped = {p["gamma"]: p for p in entry["points"] if p["m"] is None}
        capped = {p["gamma"]: p for p in entry["points"] if p["m"] is not None}
        for gamma in sorted({*uncapped, *capped}):
            cells = []
            for point in (uncapped.get(gamma), capped.get(gamma)):
                if point is None:
                    cells += ["not run", ""]
                    continue
                cells += [
                    f"{_percent(point['accuracy'])} ± {_percent(point['ci95'])}",
                    f"{point['patches']:.1f}",
                ]
            lines.append(f"| {gamma:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def sweep_figure(document: dict[str, Any]) -> bytes:
    """A PNG line plot per category: accuracy against gamma, uncapped and capped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = document["config"]
    entries = {k: v for k, v in document["categories"].items() if v["points"]}
    count = max(1, len(entries))
    figure, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], entries.items(), strict=False):
        for cap, style in ((None, "o-"), (config["m"], "s-")):
            points = [p for p in entry["points"] if p["m"] == cap]
            if not points:
                continue
            x = np.array([p["gamma"] for p in points])
            y = np.array([100 * p["accuracy"] for p in points])
            ci = np.array([100 * (p["ci95"] or 0.0) for p in points])
            label = "no cap" if cap is None else f"m = {cap}"
            ax.plot(x, y, style, markersize=3, label=label)
            ax.fill_between(x, y - ci, y + ci, alpha=0.2)
        ax.axhline(100 * entry["baseline"]["accuracy"], color="grey", ls="--", label="Proto")
        ax.set_xlabel("gamma")
        ax.set_ylabel(f"{config['sweep_shots']}-shot accuracy (%)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_sweep(out: Path, document: dict[str, Any]) -> None:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` to ``out``."""
    out = Path(out)
    atomic_write_bytes(out / SWEEP_JSON, json.dumps(document, indent=1).encode("utf-8"))
    atomic_write_bytes(out / SWEEP_MD, sweep_markdown(document).encode("utf-8"))
    atomic_write_bytes(out / SWEEP_PNG, sweep_figure(document))


def sweep_command(
    root: opt.Root,
    backbone: opt.Backbone,
    out: opt.Out,
    category: opt.Categories = None,
    weights: opt.Weights = None,
    gammas: str = typer.Option(
        ",".join(f"{g:g}" for g in DEFAULT_GAMMAS), "--gammas", help="Thresholds, comma-separated."
    ),
    m: int = typer.Option(32, "--m", help="The patch cap of the capped curve."),
    uncapped_gammas: str | None = typer.Option(
        None,
        "--uncapped-gammas",
        help="Thresholds of the uncapped curve (default: --gammas; 'none' for no curve). "
        "High uncapped values can keep hundreds of patches and take minutes per point.",
    ),
    shots: int = typer.Option(1, "--shots", help="K (Figure 3 of the paper is 1-shot)."),
    episodes: int = typer.Option(100, "--episodes", "-e", help="Episodes per category."),
    seed: int = typer.Option(0, "--seed", help="Seeds the episodes."),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Softmax temperature of the patch scores."
    ),
    coreset_ratio: opt.CoresetRatio = DEFAULT_CORESET_RATIO,
    image_size: opt.ImageSize = DEFAULT_IMAGE_SIZE,
    dim: opt.Dim = None,
    cache_dir: opt.CacheDir = None,
    no_cache: opt.NoCache = False,
    score_norm: opt.ScoreNorm = DEFAULT_SCORE_NORM,
) -> None:
    """PatchProto accuracy against gamma, with and without the cap m (Figure 3)."""
    from patchproto.cli import console, fail, progress_bar
    from patchproto.evaluate_cli import DATA_ERRORS, check_score_norm, common_config, parse_list

    started = time.perf_counter()
    try:
        values = parse_list(gammas, float, "--gammas")
        if uncapped_gammas is None:
            unbounded = values
        elif uncapped_gammas.strip().lower() == "none":
            unbounded = []
        else:
            unbounded = parse_list(uncapped_gammas, float, "--uncapped-gammas")
        if not values:
            raise ValueError(f"--gammas {gammas!r}: give at least one value in [0, 1]")
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
            [OURS, BASELINE],
            [shots],
            episodes,
            seed,
        )
        config.temperature = temperature
        config.score_norm = check_score_norm(score_norm)
        for gamma in [*values, *unbounded]:
            check_selection_params(
                gamma, m, DEFAULT_TEMPERATURE if temperature is None else temperature
            )
    except ValueError as error:
        raise fail(str(error)) from error
    try:
        document = run_sweep(
            config, values, m, shots, progress=progress_bar, uncapped_gammas=unbounded
        )
    except DATA_ERRORS as error:
        raise fail(str(error)) from error
    write_sweep(out, document)
    console.print(
        f"Wrote {out / SWEEP_MD} and {out / SWEEP_PNG} in {time.perf_counter() - started:.0f} s",
        highlight=False,
    )
