"""Writing an evaluation's results: ``results.json``, ``report.md`` and confusion matrices.

``results.json`` holds the full configuration and one record per (category, method, K);
``report.md`` lays the same numbers out like the paper's tables (Wang and Zhuo, "PatchProto
Networks for Few-shot Visual Anomaly Classification", Table 1: methods by K averaged over
categories; Table 2: PatchProto and the two masked baselines per category), followed by the
paired comparison with Prototypical networks and the all-white ablation of Section 4.3. One PNG
per category and K shows the confusion matrix of every method, summed over episodes.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchproto.cache import atomic_write_bytes
from patchproto.evaluation import BASELINE, OURS, CategoryResult

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
CONFUSION_FOLDER = "confusion"

# How each method is named in the paper's tables.
TITLES = {
    "patchproto": "PatchProto networks",
    "protonet": "Prototype networks",
    "simpleshot": "SimpleShot",
    "matching": "Matching networks",
    "finetune": "FineTune",
    "seg_proto": "Masked (segmentation) + Proto",
    "gt_proto": "Masked (ground truth) + Proto",
}
# Table 2's three column groups.
TABLE2_METHODS = ("patchproto", "seg_proto", "gt_proto")


def title(method: str) -> str:
    """The display name of a method."""
    return TITLES.get(method, method)


def records(results: Sequence[CategoryResult]) -> list[dict[str, Any]]:
    """One record per (category, method, K): accuracy in ``[0, 1]`` with its 95% interval."""
    out = []
    for category in results:
        for shot in category.shots:
            drawn = shot.episodes
            queries = len(drawn.episodes[0].queries) if drawn.episodes else 0
            for method, result in shot.methods.items():
                out.append(
                    {
                        "category": category.prepared.name,
                        "method": method,
                        "shots": shot.shots,
                        "accuracy": result.mean,
                        "ci95": result.ci95,
                        "std": float(result.accuracies.std(ddof=1))
                        if len(result.accuracies) > 1
                        else None,
                        "episodes": len(result.accuracies),
                        "queries": queries,
                        "ways": list(drawn.ways),
                        "left_out": drawn.left_out,
                        "confusion": result.confusion.tolist(),
                    }
                )
    return out


def summary(results: Sequence[CategoryResult]) -> dict[str, Any]:
    """Per category: its images, preparation notes, and per K the ways, left-out types, extras."""
    out: dict[str, Any] = {}
    for category in results:
        prepared = category.prepared
        out[prepared.name] = {
            "info": prepared.info,
            "notes": prepared.notes,
            "shots": {
                str(shot.shots): {
                    "ways": list(shot.episodes.ways),
                    "left_out": shot.episodes.left_out,
                    "skipped": shot.episodes.skipped,
                    "paired": shot.paired,
                    "white_ablation": shot.white,
                }
                for shot in category.shots
            },
        }
    return out


def results_document(config: dict[str, Any], results: Sequence[CategoryResult]) -> dict[str, Any]:
    """What ``results.json`` holds: ``config``, ``records`` and ``categories``."""
    return {"config": config, "records": records(results), "categories": summary(results)}


def _cell(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")


def _average(rows: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Mean over categories; its interval combines theirs as independent estimates."""
    if not rows:
        return None, None
    mean = float(np.mean([r["accuracy"] for r in rows]))
    cis = [r["ci95"] for r in rows]
    ci = None if any(c is None for c in cis) else float(np.sqrt(np.sum(np.square(cis)))) / len(cis)
    return mean, ci


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _index(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["category"], r["method"], r["shots"]): r for r in rows}


def table1(
    rows: Sequence[dict[str, Any]], methods: Sequence[str], shots: Sequence[int]
) -> list[str]:
    """Methods by K, accuracy averaged over categories (the paper's Table 1)."""
    body = []
    for method in methods:
        cells = []
        for k in shots:
            chosen = [r for r in rows if r["method"] == method and r["shots"] == k]
            cells.append(_cell(*_average(chosen)))
        body.append([title(method), *cells])
    return _table(["method", *(f"{k}-shot" for k in shots)], body)


def table2(
    rows: Sequence[dict[str, Any]],
    categories: Sequence[str],
    methods: Sequence[str],
    shots: Sequence[int],
) -> list[str]:
    """Per category, each method at each K (the paper's Table 2), with an average row."""
    index = _index(rows)
    header = ["category", *(f"{title(m)} {k}-shot" for m in methods for k in shots)]
    body = []
    for category in categories:
        cells = []
        for method in methods:
            for k in shots:
                row = index.get((category, method, k))
                cells.append(_cell(row["accuracy"], row["ci95"]) if row else "n/a")
        body.append([category, *cells])
    averages = []
    for method in methods:
        for k in shots:
            chosen = [r for r in rows if r["method"] == method and r["shots"] == k]
            averages.append(_cell(*_average(chosen)))
    body.append(["**average**", *averages])
    return _table(header, body)


def markdown(config: dict[str, Any], results: Sequence[CategoryResult]) -> str:
    """The text of ``report.md``."""
    rows = records(results)
    methods, shots = config["methods"], config["shots"]
    categories = [c.prepared.name for c in results]
    lines = [
        "# Few-shot defect classification",
        "",
        f"Backbone `{config['backbone']}` (weights `{config['weights_id']}`), "
        f"{config['image_size']} px, coreset ratio {config['coreset_ratio']}, "
        f"{config['episodes']} episodes per category and K, seed {config['seed']}. "
        f"PatchProto: gamma {config['gamma']}, m {config['m']}, "
        f"temperature {config['temperature']}, patch scores normalised: "
        f"{config.get('score_norm', 'none')}. Data: `{config['data_root']}`.",
        "",
        "Accuracy in %, mean over episodes ± the half-width of its 95% interval "
        "(1.96 · s / √E). Averages over categories combine the categories' intervals as "
        "independent estimates. Every method sees the same episodes; all defect types of a "
        "category are the ways, K support images per type, every other image of those types "
        "is a query.",
        "",
        "## Table 1: methods by K, averaged over categories",
        "",
        *table1(rows, methods, shots),
        "",
    ]

    chosen = [m for m in TABLE2_METHODS if m in methods]
    if chosen:
        lines += [
            "## Table 2: per category",
            "",
            *table2(rows, categories, chosen, shots),
            "",
        ]
    others = [m for m in methods if m not in chosen]
    if others:
        lines += [
            "## All other methods per category",
            "",
            *table2(rows, categories, others, shots),
            "",
        ]

    lines += ["## Ways and left-out types", ""]
    body = []
    for category in results:
        for shot in category.shots:
            drawn = shot.episodes
            left = ", ".join(f"{t} ({n} images)" for t, n in drawn.left_out.items()) or "none"
            queries = str(len(drawn.episodes[0].queries)) if drawn.episodes else "0"
            body.append(
                [
                    category.prepared.name,
                    str(shot.shots),
                    ", ".join(drawn.ways),
                    left + (f"; **no episodes**: {drawn.skipped}" if drawn.skipped else ""),
                    queries,
                ]
            )
    lines += [*_table(["category", "K", "ways", "left out", "queries/episode"], body), ""]

    paired = [(c.prepared.name, s) for c in results for s in c.shots if s.paired]
    if paired:
        lines += [
            f"## Paired comparison: {title(OURS)} − {title(BASELINE)}",
            "",
            "Difference of accuracy on the same episodes, in percentage points, with its 95% "
            "interval; wins / losses / ties count episodes.",
            "",
        ]
        body = [
            [
                name,
                str(shot.shots),
                _cell(shot.paired["mean_difference"], shot.paired["ci95"]),
                f"{shot.paired['wins']} / {shot.paired['losses']} / {shot.paired['ties']}",
            ]
            for name, shot in paired
        ]
        lines += [*_table(["category", "K", "difference (pp)", "wins / losses / ties"], body), ""]

    white = [(c.prepared.name, s) for c in results for s in c.shots if s.white]
    if white:
        lines += [
            "## All-white support class (Section 4.3, Figure 2)",
            "",
            f"{title('gt_proto')} with an all-white image added as an extra support class: the "
            "share of queries predicted as the white class, and the accuracy over the real "
            "classes (a query predicted white counts as wrong).",
            "",
        ]
        body = [
            [
                name,
                str(shot.shots),
                _cell(shot.white["white_fraction"], shot.white["white_fraction_ci95"]),
                _cell(shot.white["accuracy"], shot.white["accuracy_ci95"]),
            ]
            for name, shot in white
        ]
        lines += [*_table(["category", "K", "predicted white (%)", "accuracy (%)"], body), ""]

    lines += ["## Preparation", ""]
    for category in results:
        info = ", ".join(f"{k} {v}" for k, v in category.prepared.info.items())
        lines.append(f"- **{category.prepared.name}**: {info}")
        lines += [f"  - {note}" for note in category.prepared.notes]
    lines += [
        "",
        f"Confusion matrices (rows: true type, columns: predicted; summed over episodes): "
        f"`{CONFUSION_FOLDER}/`. Total wall time {config.get('wall_s', 'n/a')} s.",
        "",
    ]
    return "\n".join(lines)


def confusion_figure(
    matrices: dict[str, np.ndarray],
    ways: Sequence[str],
    heading: str,
) -> bytes:
    """A PNG with one confusion matrix per method (rows true, columns predicted), row-normalised.

    A matrix may have one more column than ``ways`` (the all-white class of the ablation).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(matrices)
    columns = min(4, count)
    rows = (count + columns - 1) // columns
    side = 2.2 + 0.35 * len(ways)
    figure, axes = plt.subplots(rows, columns, figsize=(side * columns, side * rows + 0.6))
    axes = np.atleast_1d(axes).ravel()
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=False):
        matrix = np.asarray(matrix, dtype=np.float64)
        totals = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        predicted = list(ways) + (["white"] if matrix.shape[1] > len(ways) else [])
        ax.set_xticks(range(len(predicted)), predicted, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(ways)), ways, fontsize=7)
        for (i, j), value in np.ndenumerate(share):
            colour = "white" if value > 0.6 else "black"
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_title(name, fontsize=8)
    for ax in axes[count:]:
        ax.axis("off")
    figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(
    out: Path, config: dict[str, Any], results: Sequence[CategoryResult]
) -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` and ``confusion/<category>_<K>shot.png`` to ``out``.

    Returns:
        The document written to ``results.json``.
    """
    out = Path(out)
    document = results_document(config, results)
    atomic_write_bytes(out / RESULTS_FILE, json.dumps(document, indent=1).encode("utf-8"))
    atomic_write_bytes(out / REPORT_FILE, markdown(config, results).encode("utf-8"))

    for category in results:
        for shot in category.shots:
            if not shot.methods:
                continue
            matrices = {title(m): r.confusion for m, r in shot.methods.items()}
            if shot.white:
                matrices[f"{title('gt_proto')} + white"] = np.asarray(shot.white["confusion"])
            heading = f"{category.prepared.name}, {shot.shots}-shot, % of each true type"
            png = confusion_figure(matrices, shot.episodes.ways, heading)
            name = f"{category.prepared.name}_{shot.shots}shot.png"
            atomic_write_bytes(out / CONFUSION_FOLDER / name, png)
    logger.info("Wrote %s and %s", out / RESULTS_FILE, out / REPORT_FILE)
    return document
