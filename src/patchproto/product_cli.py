"""The ``fit``, ``classify``, ``add-example``, ``remove-example`` and ``demo`` commands.

They drive :class:`patchproto.model.DefectModel`: ``fit`` writes a model folder, ``classify``
reads it, and the example commands edit it and save it back atomically. Every expected failure
(an unreadable image, a damaged model folder, an unknown type) ends with a one-paragraph message
that names the file or value and the fix, and exit code 2.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import typer

from patchproto import options as opt
from patchproto.backbones import WeightsError
from patchproto.cache import default_cache_dir
from patchproto.datasets import MASK_SUFFIX, DatasetError
from patchproto.embedding import DEFAULT_IMAGE_SIZE
from patchproto.images import ImageError, is_image_file, load_image
from patchproto.methods.patchproto import DEFAULT_GAMMA, DEFAULT_M
from patchproto.model import (
    DEFAULT_BACKBONE,
    DEFAULT_HOLDOUT,
    Classification,
    DefectModel,
    ModelError,
    check_save_target,
    editing,
)
from patchproto.patchcore import DEFAULT_CORESET_RATIO, DEFAULT_SCORE_NORM
from patchproto.selection import DEFAULT_TEMPERATURE

logger = logging.getLogger(__name__)

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
OVERLAYS_DIR = "overlays"
# Images embedded per forward pass while classifying.
CLASSIFY_BATCH = 8
# Errors that are the user's to fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (ModelError, ImageError, DatasetError, WeightsError)

F = TypeVar("F", bound=Callable[..., Any])


class OnError(StrEnum):
    """What ``classify`` does with an image it cannot read."""

    stop = "stop"
    skip = "skip"


def user_errors(command: F) -> F:
    """Turn the errors a user can fix into a message and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from patchproto.cli import fail

        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            raise fail(str(error)) from None
        except ValueError as error:
            raise fail(str(error)) from None
        except PermissionError as error:
            msg = f"{error.filename}: permission denied. Check the folder's permissions"
            raise fail(msg) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def _stages() -> Iterator[tuple[Callable[[str, int], None], Callable[[int], None]]]:
    """Progress bars for a job made of stages: yields ``(on_stage, advance)``."""
    from patchproto.cli import progress_bar

    labels = {
        "normal": "Embedding normal images",
        "coreset": "Selecting the coreset",
        "examples": "Embedding held-back normal images and examples",
    }
    with ExitStack() as stack:
        current: list[Callable[[int], None]] = [lambda n=1: None]

        def on_stage(stage: str, total: int) -> None:
            stack.close()
            current[0] = stack.enter_context(progress_bar(labels.get(stage, stage), total))

        yield on_stage, lambda n=1: current[0](n)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch and faiss (0 keeps their defaults).

    On a CPU shared with other busy processes, one thread can be several times faster than a
    pool whose threads wait for each other (measured: 0.39 s against 4.7 s per image).
    """
    if threads < 0:
        raise ModelError(f"--threads {threads} must be 0 (the default) or more")
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def _size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------
# fit


@user_errors
def fit_command(
    normal: Path = typer.Option(..., "--normal", help="Folder of images of good parts."),
    defects: Path = typer.Option(
        ..., "--defects", help="Folder with one sub-folder of example images per defect type."
    ),
    out: Path = typer.Option(..., "--out", help="Model folder to write (replaced atomically)."),
    backbone: opt.Backbone = DEFAULT_BACKBONE,
    weights: opt.Weights = None,
    image_size: opt.ImageSize = DEFAULT_IMAGE_SIZE,
    dim: opt.Dim = None,
    coreset_ratio: opt.CoresetRatio = DEFAULT_CORESET_RATIO,
    gamma: float = typer.Option(
        DEFAULT_GAMMA, "--gamma", help="Share of anomaly mass the selected patches cover."
    ),
    m: int = typer.Option(DEFAULT_M, "--m", help="Most patches selected per image."),
    temperature: float = typer.Option(
        DEFAULT_TEMPERATURE, "--temperature", help="Softmax temperature of the patch scores."
    ),
    holdout: float = typer.Option(
        DEFAULT_HOLDOUT,
        "--holdout",
        help="Normal images held back to set the threshold: a fraction (<1) or a count.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the held-back split and the coreset."),
    score_norm: opt.ScoreNorm = DEFAULT_SCORE_NORM,
    cache: opt.CacheDir = None,
    no_cache: opt.NoCache = False,
    threads: opt.Threads = 0,
) -> None:
    """Fit a model from normal images and a few examples of each defect type."""
    from patchproto.cli import console

    opt.check_embedding_options(backbone, coreset_ratio, image_size, dim, threads)
    set_threads(threads)

    check_save_target(out)
    started = time.perf_counter()
    with _stages() as (on_stage, advance):
        model = DefectModel.fit(
            normal,
            defects,
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            dim=dim,
            coreset_ratio=coreset_ratio,
            gamma=gamma,
            m=m,
            temperature=temperature,
            holdout=holdout,
            seed=seed,
            score_norm=score_norm,
            cache_dir=None if no_cache else (cache or default_cache_dir()),
            on_image=advance,
            on_step=advance,
            on_stage=on_stage,
        )
    fitted = time.perf_counter() - started
    with editing(out):
        folder = model.save(out)
    types = model.types()
    console.print(
        f"Fitted in {fitted:.1f} s: memory bank of {len(model.memory_bank)} patches from "
        f"{model.settings.normal_images - model.settings.holdout_images} normal images, "
        f"threshold {model.threshold:.3f} (max of {model.settings.holdout_images} held back); "
        f"{len(types)} defect types: "
        + ", ".join(f"{t} ({len(names)})" for t, names in types.items()),
        highlight=False,
    )
    console.print(f"Model written to {folder} ({_megabytes(_size_on_disk(folder))})")


# ----------------------------------------------------------------------------------------------
# classify


def _expand(inputs: list[Path]) -> list[tuple[Path, str | None]]:
    """Each input file, and every image under each input folder; ``(path, problem)``."""
    found: list[tuple[Path, str | None]] = []
    for item in inputs:
        if item.is_dir():
            images = sorted(
                p for p in item.rglob("*") if is_image_file(p) and not p.stem.endswith(MASK_SUFFIX)
            )
            if not images:
                found.append((item, "this folder holds no images (PNG, JPEG, BMP, TIFF, WebP)"))
            found.extend((p, None) for p in images)
        elif item.exists():
            found.append((item, None))
        else:
            found.append((item, "no such file or folder. Check the path"))
    return found


def _csv_header(types: list[str]) -> list[str]:
    return [
        "image",
        "predicted_type",
        "confidence",
        "anomaly_score",
        "threshold",
        "is_anomalous",
        "latency_ms",
        *(f"distance:{t}" for t in types),
        *(f"confidence:{t}" for t in types),
    ]


def _csv_row(result: Classification, types: list[str]) -> list[Any]:
    by_type = {entry.type: entry for entry in result.ranking}
    return [
        result.name,
        result.predicted_type,
        f"{result.confidence:.4f}",
        f"{result.anomaly_score:.4f}",
        f"{result.threshold:.4f}",
        int(result.is_anomalous),
        f"{1000 * result.timing.get('total', 0.0):.1f}",
        *(f"{by_type[t].distance:.5f}" for t in types),
        *(f"{by_type[t].confidence:.4f}" for t in types),
    ]


def _overlay_name(path: Path, used: set[str]) -> str:
    name, n = f"{path.stem}.png", 2
    while name in used:
        name, n = f"{path.stem}_{n}.png", n + 1
    used.add(name)
    return name


def write_overlay(result: Classification, image: Any, path: Path) -> None:
    """Save the heatmap over the image with the deciding patches outlined."""
    from patchproto.visualize import overlay_heatmap

    boxes = [patch.box for patch in result.deciding_patches]
    overlay_heatmap(image, result.heatmap, boxes=boxes).save(path)


@user_errors
def classify_command(
    model: Path = typer.Argument(..., help="Model folder written by `patchproto fit`."),
    inputs: list[Path] = typer.Argument(
        ..., help="Images, or folders searched recursively (files named *_mask.* are skipped)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help=f"Write {RESULTS_JSONL}, {RESULTS_CSV} and {OVERLAYS_DIR}/ here "
        "(default: JSON lines on stdout).",
    ),
    on_error: OnError = typer.Option(
        OnError.stop, "--on-error", help="stop: exit at the first bad image; skip: list it."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="Backbone weights file, if not where it was at fit time."
    ),
    batch_size: int = typer.Option(
        CLASSIFY_BATCH, "--batch-size", min=1, help="Images per forward pass (1: per-image timing)."
    ),
    threads: opt.Threads = 0,
) -> None:
    """Name the defect type of each image, with its anomaly score and deciding patches."""
    from patchproto.cli import console, fail, progress_bar

    set_threads(threads)

    defect_model = DefectModel.load(model, weights=weights)
    defect_model.embedder()
    types = defect_model.type_names
    items = _expand(inputs)
    skipped: list[tuple[str, str]] = []

    def bad(name: str, message: str) -> None:
        if on_error is OnError.stop:
            raise fail(f"{message} (or pass --on-error skip to go on without it)")
        logger.debug("Skipping %s", message)
        skipped.append((name, message))

    with ExitStack() as stack:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / OVERLAYS_DIR).mkdir(exist_ok=True)
            jsonl = stack.enter_context((out / RESULTS_JSONL).open("w", encoding="utf-8"))
            table = stack.enter_context((out / RESULTS_CSV).open("w", newline="", encoding="utf-8"))
            writer = csv.writer(table)
            writer.writerow(_csv_header(types))
        else:
            jsonl, writer = sys.stdout, None
        advance = stack.enter_context(progress_bar("Classifying", len(items)))

        results: list[Classification] = []
        used: set[str] = set()
        for start in range(0, len(items), batch_size):
            batch: list[tuple[Path, Any]] = []
            tick = time.perf_counter()
            for path, problem in items[start : start + batch_size]:
                if problem is not None:
                    bad(str(path), f"{path}: {problem}")
                    advance(1)
                    continue
                try:
                    batch.append((path, load_image(path, name=str(path))))
                except ImageError as error:
                    bad(str(path), str(error))
                    advance(1)
            if not batch:
                continue
            decoding = (time.perf_counter() - tick) / len(batch)
            answers = defect_model.classify_many(
                [image for _, image in batch], [str(path) for path, _ in batch]
            )
            for (path, image), result in zip(batch, answers, strict=True):
                # Reading and decoding the file is part of the latency a user sees.
                result.timing["load"] += decoding
                result.timing["total"] += decoding
                jsonl.write(json.dumps(result.to_dict()) + "\n")
                jsonl.flush()
                if writer is not None and out is not None:
                    writer.writerow(_csv_row(result, types))
                    write_overlay(result, image, out / OVERLAYS_DIR / _overlay_name(path, used))
                results.append(result)
            advance(len(batch))

    if results:
        counts: dict[str, int] = {}
        for result in results:
            counts[result.predicted_type] = counts.get(result.predicted_type, 0) + 1
        latency = np.mean([r.timing["total"] for r in results]) * 1000
        anomalous = sum(r.is_anomalous for r in results)
        console.print(
            f"Classified {len(results)} images ({latency:.0f} ms each on average; "
            f"{anomalous} above the normal threshold): "
            + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())),
            highlight=False,
        )
        if out is not None:
            console.print(
                f"Results in {out / RESULTS_JSONL}, {out / RESULTS_CSV}, {out / OVERLAYS_DIR}/"
            )
    if skipped:
        console.print(f"[yellow]Skipped {len(skipped)}:[/]", highlight=False)
        for _, message in skipped:
            console.print(f"  {message}", highlight=False, soft_wrap=True)
    if not results:
        raise fail("no image could be classified (see the skipped files above)")


# ----------------------------------------------------------------------------------------------
# add-example, remove-example


def _image_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path, problem in _expand(inputs):
        if problem is not None:
            raise ImageError(path, problem, "Give image files or folders of images")
        files.append(path)
    return files


def _check_model_folder(model: Path) -> None:
    """Fail on a missing model folder before its edit lock file is made beside it."""
    if not Path(model).is_dir():
        DefectModel.load(model)  # raises the ModelError that names the folder and the fix


@user_errors
def add_example_command(
    model: Path = typer.Argument(..., help="Model folder to edit."),
    images: list[Path] = typer.Argument(..., help="Example images (or folders of them)."),
    type_name: str = typer.Option(..., "--type", help="Defect type; a new name creates it."),
) -> None:
    """Add example images to a defect type (no refit of the memory bank)."""
    from patchproto.cli import console, progress_bar

    files = _image_files(images)
    _check_model_folder(model)
    with editing(model):
        defect_model = DefectModel.load(model)
        new = type_name not in defect_model.examples
        with progress_bar(f"Adding to {type_name}", len(files)) as advance:
            added = defect_model.add_examples(type_name, files, on_image=advance)
        defect_model.save(model)
    count = len(defect_model.types()[type_name])
    console.print(
        f"Added {len(added)} example(s) to {'new type ' if new else ''}{type_name!r} "
        f"(now {count}): {', '.join(added)}",
        highlight=False,
    )


@user_errors
def remove_example_command(
    model: Path = typer.Argument(..., help="Model folder to edit."),
    names: list[str] = typer.Argument(..., help="Example names (file names) to remove."),
    type_name: str = typer.Option(..., "--type", help="The defect type they belong to."),
) -> None:
    """Remove examples from a defect type; a type left with none is removed."""
    from patchproto.cli import console

    _check_model_folder(model)
    with editing(model):
        defect_model = DefectModel.load(model)
        for name in names:
            defect_model.example(type_name, name)  # every name is checked before any change
        if len(set(names)) != len(names):
            raise ModelError(f"an example name is given twice: {', '.join(names)}")
        for name in names:
            defect_model.remove_example(type_name, name)
        defect_model.save(model)
    left = defect_model.types().get(type_name)
    state = f"{len(left)} left" if left else "the type is removed"
    console.print(f"Removed {', '.join(names)} from {type_name!r} ({state})", highlight=False)


# ----------------------------------------------------------------------------------------------
# demo


def _demo_evaluation(
    data: Any, seed: int, backbone: str, cache_dir: Path, episodes: int
) -> dict[str, Any] | None:
    """Episodic accuracy of PatchProto and Prototypical networks on the synthetic set."""
    try:
        from patchproto.datasets import Category, Sample
        from patchproto.evaluation import (
            EvaluationConfig,
            evaluate_category,
            make_cache,
            prepare_category,
        )
    except ImportError:
        logger.info("No evaluation module; the demo reports classification accuracy only")
        return None

    defects = {
        t: [Sample(p, t, data.masks.get(p)) for p in data.support[t] + data.queries[t]]
        for t in sorted(data.support)
    }
    # A few normal images are held back, as test/good in MVTec AD, for the position statistics.
    normal = list(data.normal)
    category = Category("synthetic", data.root, normal[:-4], normal[-4:], defects)
    config = EvaluationConfig(data.root, backbone, ["patchproto", "protonet"], cache_dir=cache_dir)
    cache = make_cache(config)
    methods = ["patchproto", "protonet"]
    prepared = prepare_category(category, cache, methods, seed=seed)
    shots = evaluate_category(prepared, methods, [1, 5], episodes, seed)
    table = {}
    for result in shots:
        table[result.shots] = {
            name: (value.mean, value.ci95) for name, value in result.methods.items()
        }
    return {"episodes": episodes, "table": table}


def _markdown_report(facts: dict[str, Any]) -> str:
    lines = [
        "# PatchProto demo",
        "",
        "A seeded synthetic set of brushed-metal surfaces with four drawn-in defect types "
        f"(seed {facts['seed']}): {facts['normal']} normal images, {facts['support']} support "
        f"examples and {facts['queries']} query images per type, {facts['size']} px. Model: "
        f"`{facts['backbone']}` (ImageNet weights), {facts['settings']}.",
        "",
        "| | |",
        "|---|---|",
        f"| Accuracy on the queries | **{facts['accuracy']:.1%}** "
        f"({facts['correct']} of {facts['total']}) |",
        f"| Latency per image (one at a time) | mean {facts['latency_mean']:.0f} ms, "
        f"p95 {facts['latency_p95']:.0f} ms |",
        f"| Fit time | {facts['fit_s']:.1f} s |",
        f"| Model size on disk | {facts['size_mb']:.1f} MB |",
        f"| Queries above the normal threshold | {facts['anomalous']} of {facts['total']} |",
        f"| CPU | {facts['cpus']} cores, {facts['threads']} thread(s), load average "
        f"{facts['load']:.1f} at the start |",
        "",
        "## Per type",
        "",
        "| type | accuracy | confused with |",
        "|---|---|---|",
    ]
    for t, row in facts["per_type"].items():
        confused = ", ".join(f"{k} ({v})" for k, v in row["confused"].items()) or "-"
        lines.append(
            f"| {t} | {row['accuracy']:.0%} ({row['correct']}/{row['total']}) | {confused} |"
        )
    evaluation = facts.get("evaluation")
    if evaluation:
        lines += [
            "",
            f"## Episodic evaluation ({evaluation['episodes']} episodes per K, all 15 images "
            "per type as the pool)",
            "",
            "| K | PatchProto | Prototypical networks |",
            "|---|---|---|",
        ]
        for k, row in evaluation["table"].items():
            cells = []
            for name in ("patchproto", "protonet"):
                mean, ci = row.get(name, (None, None))
                cells.append(
                    "-" if mean is None else f"{mean:.1%}" + (f" ± {ci:.1%}" if ci else "")
                )
            lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    else:
        lines += ["", "(The episodic evaluation module is not installed; accuracy only.)"]
    lines += [
        "",
        "## Examples",
        "",
        "Anomaly heatmap over each query; white boxes are the patches that decided the type.",
        "",
    ]
    for t, (name, predicted, picture) in facts["overlays"].items():
        lines += [f"**{t}** ({name}, predicted {predicted})", "", f"![{t}]({picture})", ""]
    lines += [
        "Reproduce: `patchproto demo --out DIR --seed "
        f"{facts['seed']}`; the data is in `DIR/data`, the model in `DIR/model`.",
        "",
    ]
    return "\n".join(lines)


@user_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for data, model, report."),
    seed: int = typer.Option(0, "--seed", help="Seeds the synthetic set and the model."),
    episodes: int = typer.Option(20, "--episodes", help="Episodes per K in the evaluation."),
    threads: opt.Threads = 1,
) -> None:
    """Generate a synthetic defect set, fit, classify, evaluate and write OUT/report.md."""
    from patchproto.cli import console, progress_bar
    from patchproto.synthetic import write_synthetic_set

    set_threads(threads)

    backbone = "efficientnet_lite0"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"Writing a synthetic defect set to {out / 'data'}", highlight=False)
    data = write_synthetic_set(out / "data", seed=seed)

    cache_dir = default_cache_dir()
    started = time.perf_counter()
    with _stages() as (on_stage, advance):
        model = DefectModel.fit(
            data.normal_dir,
            data.defects_dir,
            backbone=backbone,
            seed=seed,
            cache_dir=cache_dir,
            on_image=advance,
            on_step=advance,
            on_stage=on_stage,
        )
    fit_s = time.perf_counter() - started
    folder = model.save(out / "model")

    model = DefectModel.load(folder)
    model.embedder()
    queries = [(t, p) for t in sorted(data.queries) for p in data.queries[t]]
    latencies, per_type, overlays, anomalous = [], {}, {}, 0
    (out / OVERLAYS_DIR).mkdir(parents=True, exist_ok=True)
    with progress_bar("Classifying the queries", len(queries)) as step:
        for true_type, path in queries:
            tick = time.perf_counter()
            result = model.classify(path)
            latencies.append(time.perf_counter() - tick)
            anomalous += result.is_anomalous
            row = per_type.setdefault(true_type, {"correct": 0, "total": 0, "confused": {}})
            row["total"] += 1
            if result.predicted_type == true_type:
                row["correct"] += 1
            else:
                confused = row["confused"]
                confused[result.predicted_type] = confused.get(result.predicted_type, 0) + 1
            if true_type not in overlays:
                picture = f"{OVERLAYS_DIR}/{path.stem}.png"
                write_overlay(result, load_image(path), out / picture)
                overlays[true_type] = (path.name, result.predicted_type, picture)
            step(1)
    for row in per_type.values():
        row["accuracy"] = row["correct"] / row["total"]

    console.print("Running a small episodic evaluation", highlight=False)
    evaluation = _demo_evaluation(data, seed, backbone, cache_dir, episodes)
    correct = sum(row["correct"] for row in per_type.values())
    s = model.settings
    facts = {
        "seed": seed,
        "normal": len(data.normal),
        "support": len(next(iter(data.support.values()))),
        "queries": len(next(iter(data.queries.values()))),
        "size": 256,
        "backbone": backbone,
        "settings": f"gamma {s.gamma}, m {s.m}, patch scores normalised: {s.score_norm}, "
        f"coreset ratio {s.coreset_ratio}, {s.image_size} px input",
        "accuracy": correct / len(queries),
        "correct": correct,
        "total": len(queries),
        "latency_mean": 1000 * float(np.mean(latencies)),
        "latency_p95": 1000 * float(np.percentile(latencies, 95)),
        "fit_s": fit_s,
        "size_mb": _size_on_disk(folder) / 1e6,
        "anomalous": anomalous,
        "per_type": per_type,
        "evaluation": evaluation,
        "overlays": overlays,
        "cpus": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "load": load,
    }
    report = out / "report.md"
    report.write_text(_markdown_report(facts), encoding="utf-8")
    console.print(
        f"Accuracy {facts['accuracy']:.1%} on {len(queries)} queries, "
        f"{facts['latency_mean']:.0f} ms per image, fit {fit_s:.1f} s, "
        f"model {facts['size_mb']:.1f} MB. Report: {report}",
        highlight=False,
    )
