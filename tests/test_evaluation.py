"""Episodic evaluation end to end on a tiny synthetic MVTec AD tree with a random backbone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchproto import backbones
from patchproto.cache import FeatureCache
from patchproto.cli import app
from patchproto.datasets import load_mvtec
from patchproto.embedding import PatchEmbedder
from patchproto.evaluation import (
    EvaluationConfig,
    MethodResult,
    ci95,
    paired_comparison,
    prepare_category,
    run_evaluation,
)
from patchproto.methods import METHODS
from patchproto.patchcore import PositionNorm
from patchproto.report import write_report
from patchproto.sweep import run_sweep, write_sweep

SIZE = 64  # network input side: an 8 x 8 patch grid, fast on a CPU
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_root(tmp_path, make_category) -> Path:
    """One category with three types: ``dent`` is too small for 3-shot, ``stain`` has no masks."""
    root = tmp_path / "data"
    make_category(
        root,
        "widget",
        n_train=4,
        n_good=2,
        defects={"scratch": 4, "stain": 4, "dent": 2},
        masks={"scratch", "dent"},
        seed=1,
    )
    return root


@pytest.fixture
def cache(tmp_path, random_backbone) -> FeatureCache:
    return FeatureCache(PatchEmbedder(random_backbone, SIZE, batch_size=32), tmp_path / "cache")


def _config(root: Path, methods=None, shots=(1, 3), episodes=3) -> EvaluationConfig:
    return EvaluationConfig(
        data_root=root,
        backbone="resnet18",
        methods=list(methods or METHODS),
        shots=list(shots),
        episodes=episodes,
        image_size=SIZE,
        seed=5,
    )


def test_evaluate_writes_results_report_and_confusion_matrices(tiny_root, cache, tmp_path):
    record, results = run_evaluation(_config(tiny_root), cache)
    out = tmp_path / "out"
    write_report(out, record, results)

    document = json.loads((out / "results.json").read_text())
    config = document["config"]
    for key in ("backbone", "weights_id", "image_size", "coreset_ratio", "gamma", "m"):
        assert key in config
    assert config["temperature"] > 0 and config["seed"] == 5 and "torch" in config["versions"]

    rows = document["records"]
    assert {(r["method"], r["shots"]) for r in rows} == {(m, k) for m in METHODS for k in (1, 3)}
    for row in rows:
        assert row["category"] == "widget"
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["ci95"] is not None and row["ci95"] >= 0.0
        assert row["episodes"] == 3
        if row["shots"] == 1:
            # 10 images, 3 ways, 1 support each.
            assert row["ways"] == ["dent", "scratch", "stain"] and row["queries"] == 7
            assert row["left_out"] == {}
        else:
            assert row["ways"] == ["scratch", "stain"] and row["queries"] == 2
            assert row["left_out"] == {"dent": 2}
        confusion = np.array(row["confusion"])
        assert confusion.shape == (len(row["ways"]),) * 2
        assert confusion.sum() == row["episodes"] * row["queries"]
        assert math.isclose(np.trace(confusion) / confusion.sum(), row["accuracy"], abs_tol=1e-9)

    shots = document["categories"]["widget"]["shots"]
    paired = shots["1"]["paired"]
    assert paired["wins"] + paired["losses"] + paired["ties"] == 3
    white = shots["1"]["white_ablation"]
    assert 0.0 <= white["white_fraction"] <= 1.0
    assert np.array(white["confusion"]).shape == (3, 4)
    assert any(
        "stain" not in note and "keep their whole image" in note
        for note in document["categories"]["widget"]["notes"]
    )

    report = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Paired comparison", "All-white support class"):
        assert heading in report
    assert "PatchProto networks" in report and "dent (2 images)" in report
    for k in (1, 3):
        assert (out / "confusion" / f"widget_{k}shot.png").read_bytes().startswith(PNG_MAGIC)


def test_same_seed_same_numbers_and_the_bank_is_cached(tiny_root, cache):
    methods = ["patchproto", "protonet"]
    _, first = run_evaluation(_config(tiny_root, methods, shots=(1,)), cache)
    _, again = run_evaluation(_config(tiny_root, methods, shots=(1,)), cache)
    assert first[0].prepared.info["bank_cached"] is False
    assert again[0].prepared.info["bank_cached"] is True
    assert again[0].prepared.info["cache_misses"] == 0
    for name in methods:
        np.testing.assert_array_equal(
            first[0].shots[0].methods[name].accuracies, again[0].shots[0].methods[name].accuracies
        )


def test_only_what_the_methods_need_is_prepared(tiny_root, cache):
    (category,) = load_mvtec(tiny_root)
    prepared = prepare_category(category, cache, ["protonet"])
    assert "bank_size" not in prepared.info
    assert all(torch.isnan(f.patch_scores).all() for f in prepared.features)
    assert all(f.seg_pooled is None and f.gt_pooled is None for f in prepared.features)

    prepared = prepare_category(category, cache, ["gt_proto"])
    by_type = {}
    for sample, features in zip(prepared.samples, prepared.features, strict=True):
        by_type.setdefault(sample.label, []).append(features)
    # No masks for ``stain``: the whole image is kept; masked images differ from whole ones.
    assert all(torch.equal(f.gt_pooled, f.pooled) for f in by_type["stain"])
    assert not any(torch.equal(f.gt_pooled, f.pooled) for f in by_type["scratch"])


def test_ci95_and_paired_comparison():
    assert ci95(np.array([0.5])) is None
    assert ci95(np.array([0.5, 0.5, 0.5])) == 0.0
    assert math.isclose(ci95(np.array([0.0, 1.0])), 1.96 * math.sqrt(0.5) / math.sqrt(2))
    ours = MethodResult(np.array([0.6, 0.5, 0.9]), np.zeros((2, 2)))
    base = MethodResult(np.array([0.5, 0.5, 1.0]), np.zeros((2, 2)))
    paired = paired_comparison(ours, base)
    assert (paired["wins"], paired["losses"], paired["ties"]) == (1, 1, 1)
    assert math.isclose(paired["mean_difference"], 0.0, abs_tol=1e-12)


def test_sweep_writes_points_for_each_gamma_capped_and_not(tiny_root, cache, tmp_path):
    document = run_sweep(_config(tiny_root, episodes=2), gammas=[0.0, 1.0], m=3, cache=cache)
    entry = document["categories"]["widget"]
    assert len(entry["points"]) == 4
    by_key = {(p["gamma"], p["m"]): p for p in entry["points"]}
    assert by_key[(0.0, None)]["patches"] == 1.0
    assert by_key[(1.0, None)]["patches"] == SIZE // 8 * SIZE // 8
    assert by_key[(1.0, 3)]["patches"] == 3.0
    write_sweep(tmp_path / "sweep", document)
    assert "| gamma |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert (tmp_path / "sweep" / "sweep.png").read_bytes().startswith(PNG_MAGIC)

    # The uncapped curve can be limited to cheap thresholds.
    fewer = run_sweep(
        _config(tiny_root, episodes=2), [0.0, 1.0], m=3, cache=cache, uncapped_gammas=[0.0]
    )
    assert {(p["gamma"], p["m"]) for p in fewer["categories"]["widget"]["points"]} == {
        (0.0, None),
        (0.0, 3),
        (1.0, 3),
    }
    write_sweep(tmp_path / "fewer", fewer)
    assert "not run" in (tmp_path / "fewer" / "sweep.md").read_text()


def test_cli_evaluate_runs_with_a_backbone_by_name(
    tiny_root, tmp_path, monkeypatch, random_backbone
):
    monkeypatch.setattr(backbones, "load_backbone", lambda name, weights=None: random_backbone)
    out = tmp_path / "cli"
    args = [
        "evaluate",
        str(tiny_root),
        "--backbone",
        "resnet18",
        "--shots",
        "1",
        "--episodes",
        "2",
        "--methods",
        "patchproto,protonet",
        "--image-size",
        str(SIZE),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["records"]
    assert {r["method"] for r in rows} == {"patchproto", "protonet"}


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--methods", "patchproto,prototypical", "unknown method(s) prototypical"),
        ("--shots", "1,x", "--shots '1,x'"),
        ("--shots", "0", "shots [0]"),
        ("--episodes", "0", "--episodes 0"),
        ("--gamma", "1.5", "gamma=1.5"),
        ("--score-norm", "pixel", "--score-norm 'pixel'"),
    ],
)
def test_cli_evaluate_rejects_bad_input(tiny_root, tmp_path, option, value, expected):
    args = [
        "evaluate",
        str(tiny_root),
        "--backbone",
        "resnet18",
        option,
        value,
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())


def test_cli_evaluate_reports_a_missing_data_root(tmp_path, monkeypatch, random_backbone):
    monkeypatch.setattr(backbones, "load_backbone", lambda name, weights=None: random_backbone)
    args = [
        "evaluate",
        str(tmp_path / "nowhere"),
        "--backbone",
        "resnet18",
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "no such folder" in result.output


def test_position_normalisation_standardises_scores_by_held_back_normal_images(
    tiny_root, cache, tmp_path, make_category
):
    (category,) = load_mvtec(tiny_root)
    raw = prepare_category(category, cache, ["patchproto"], score_norm="none")
    normed = prepare_category(category, cache, ["patchproto"], score_norm="position")
    assert normed.info["score_norm"] == "position"
    norm = PositionNorm.from_scores(
        [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 5.0]), torch.tensor([2.0, 5.0])]
    )
    # The constant position's spread is floored at a tenth of the mean spread (here 0.5).
    assert norm.mean.tolist() == [2.0, 5.0]
    assert norm.std.tolist() == pytest.approx([1.0, 0.05])
    assert norm(torch.tensor([4.0, 5.1])).tolist() == pytest.approx([2.0, 2.0])
    with pytest.raises(ValueError, match="positions"):
        norm(torch.ones(3))
    with pytest.raises(ValueError, match="two or more"):
        PositionNorm.from_scores([torch.ones(2)])
    for before, after in zip(raw.features, normed.features, strict=True):
        assert not torch.allclose(before.patch_scores, after.patch_scores)
    # A monotone map per position: the ranking of one position across images is kept.
    first = torch.stack([f.patch_scores[0] for f in raw.features])
    second = torch.stack([f.patch_scores[0] for f in normed.features])
    assert torch.equal(first.argsort(), second.argsort())

    lonely = make_category(tmp_path / "lonely", "bare", n_good=0, defects={"a": 2, "b": 2})
    (bare,) = load_mvtec(lonely)
    fallback = prepare_category(bare, cache, ["patchproto"], score_norm="position")
    assert fallback.info["score_norm"] == "none"
    assert any("test/good" in note and "score_norm none" in note for note in fallback.notes)
    with pytest.raises(ValueError, match="choose one of none, position"):
        prepare_category(bare, cache, ["patchproto"], score_norm="global")


@pytest.mark.data
@pytest.mark.slow
def test_real_tire_slice_every_method_and_a_left_out_type(tmp_path, real_slice):
    """Every method on a slice of mvtec3d_tire: ``combined`` (5 images) drops out at K = 5."""
    picks = {"train/good": 30, "test/good": 6}
    picks.update({f"test/{kind}": 12 for kind in ("contamination", "cut", "hole")})
    picks["test/combined"] = 5
    subset = real_slice("mvtec3d_tire", picks)
    config = EvaluationConfig(
        data_root=subset.parent,
        backbone="efficientnet_lite2",
        methods=list(METHODS),
        shots=[1, 5],
        episodes=10,
        seed=0,
        coreset_ratio=0.05,
        cache_dir=tmp_path / "cache",
    )

    record, results = run_evaluation(config)
    out = tmp_path / "out"
    write_report(out, record, results)

    document = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["shots"]): r for r in document["records"]}
    assert set(rows) == {(m, k) for m in METHODS for k in (1, 5)}
    assert rows["patchproto", 1]["ways"] == ["combined", "contamination", "cut", "hole"]
    assert rows["patchproto", 5]["ways"] == ["contamination", "cut", "hole"]
    assert rows["patchproto", 5]["left_out"] == {"combined": 5}
    assert rows["patchproto", 1]["queries"] == 41 - 4 and rows["patchproto", 5]["queries"] == 21
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["episodes"] == 10
    assert document["config"]["score_norm"] == "position"
    # Chance is 1/4 at K = 1 and 1/3 at K = 5; measured on this slice: PatchProto 0.365 and
    # 0.538, the ground-truth-masked baseline 0.408 and 0.557.
    for method in ("patchproto", "gt_proto"):
        assert rows[method, 1]["accuracy"] > 0.3 and rows[method, 5]["accuracy"] > 0.45
    assert "combined (5 images)" in (out / "report.md").read_text()
