"""The ``fit``, ``classify``, ``add-example`` and ``remove-example`` commands, and bad input.

One model is fitted through the command line per module (64-pixel synthetic surfaces, three
defect types, EfficientNet-Lite0 at 64 px) and copied for each test that edits it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import zlib
from pathlib import Path

import faiss
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from patchproto.cli import app
from patchproto.model import MODEL_FILE, DefectModel
from patchproto.synthetic import write_synthetic_set

TYPES = ("scratch", "spot", "hole")
FIT_OPTIONS = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--holdout", "2"]


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def text(result) -> str:
    """Everything the command wrote, with line wrapping undone."""
    return " ".join(result.output.split())


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU two spinning threads run 10x slower."""
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_set(root, seed=5, normal=6, support=2, queries=2, size=64, types=TYPES)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fitted") / "model"
    result = run(
        "fit", "--normal", data.normal_dir, "--defects", data.defects_dir, "--out", out,
        *FIT_OPTIONS, "--no-cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def model_dir(fitted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fitted, tmp_path / "models" / "model"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, data) -> dict[str, Path]:
    """Every kind of unusable image file, by kind."""
    root = tmp_path_factory.mktemp("bad")
    good = data.queries["spot"][0].read_bytes()
    files = {
        "corrupt": (root / "corrupt.png", bytes(range(256)) * 4),
        "empty": (root / "empty.png", b""),
        "truncated": (root / "truncated.png", good[: len(good) // 2]),
        "not an image": (root / "notes.txt", b"hello, this is text\n"),
        "text named png": (root / "text.png", b"hello, this is text\n"),
        "bomb": (root / "bomb.png", bomb_png()),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {kind: path for kind, (path, _) in files.items()}


def test_fit_writes_a_model(fitted: Path, data) -> None:
    model = DefectModel.load(fitted)
    assert model.types() == {t: [p.name for p in data.support[t]] for t in sorted(TYPES)}
    assert model.settings.image_size == 64


def test_classify_writes_json_lines_csv_and_overlays(fitted: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("classify", fitted, data.queries_dir, "--out", out)
    assert result.exit_code == 0, result.output

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    expected = sorted(str(p) for t in TYPES for p in data.queries[t])
    assert sorted(r["name"] for r in records) == expected
    assert all(r["predicted_type"] in TYPES for r in records)
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [r["name"] for r in records]
    assert {f"distance:{t}" for t in TYPES} <= set(rows[0])
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted(f"{Path(name).stem}.png" for name in expected)
    assert Image.open(out / "overlays" / overlays[0]).size == (64, 64)
    assert f"Classified {len(expected)} images" in text(result)


def test_classify_without_out_prints_json_lines(fitted: Path, data) -> None:
    image = data.queries["hole"][0]
    result = run("classify", fitted, image, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert faiss.omp_get_max_threads() == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["name"] == str(image)
    assert record["ranking"][0]["type"] == record["predicted_type"]


def test_on_error_skip_goes_on_and_lists_skipped(
    fitted: Path, data, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    good = data.queries["scratch"]
    bad = [bad_files["corrupt"], bad_files["empty"], tmp_path / "missing.png"]
    out = tmp_path / "out"
    result = run("classify", fitted, good[0], *bad, good[1], "--out", out, "--on-error", "skip")
    assert result.exit_code == 0, result.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    message = text(result)
    assert f"Skipped {len(bad)}" in message
    for path in bad:
        assert str(path) in message
    assert "Traceback" not in result.output


def test_on_error_stop_exits_at_the_first_bad_image(
    fitted: Path, data, bad_files: dict[str, Path]
) -> None:
    result = run("classify", fitted, data.queries["scratch"][0], bad_files["truncated"])
    assert result.exit_code == 2
    assert str(bad_files["truncated"]) in text(result) and "--on-error skip" in text(result)


def test_add_and_remove_examples(model_dir: Path, data) -> None:
    new = data.queries["hole"]
    result = run("add-example", model_dir, "--type", "crater", *new)
    assert result.exit_code == 0, result.output
    assert "new type 'crater'" in text(result)
    assert DefectModel.load(model_dir).types()["crater"] == [p.name for p in new]

    result = run("remove-example", model_dir, "--type", "crater", new[0].name)
    assert result.exit_code == 0, result.output
    assert DefectModel.load(model_dir).types()["crater"] == [new[1].name]

    result = run("remove-example", model_dir, "--type", "crater", new[1].name)
    assert result.exit_code == 0, result.output
    assert "the type is removed" in text(result)
    assert "crater" not in DefectModel.load(model_dir).types()
    # Nothing is left beside the model but its (empty) edit lock file.
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [".model.lock", "model"]


def _bad_model(model_dir: Path, damage: str) -> str:
    """Damage a model folder; returns what the error message must name."""
    if damage == "other version":
        index = json.loads((model_dir / MODEL_FILE).read_text())
        index["format_version"] = 0
        (model_dir / MODEL_FILE).write_text(json.dumps(index))
        return "version 0"
    if damage == "missing tensors":
        (model_dir / "tensors.safetensors").unlink()
        return str(model_dir / "tensors.safetensors")
    if damage == "missing example image":
        victim = next((model_dir / "examples").iterdir())
        victim.unlink()
        return str(victim)
    raise AssertionError(damage)


@pytest.mark.parametrize("damage", ["other version", "missing tensors", "missing example image"])
def test_damaged_model_folders_are_named(model_dir: Path, data, damage: str) -> None:
    named = _bad_model(model_dir, damage)
    before = folder_digest(model_dir)
    for args in (
        ["classify", model_dir, data.queries["hole"][0]],
        ["add-example", model_dir, "--type", "hole", data.queries["hole"][0]],
        ["remove-example", model_dir, "--type", "hole", data.support["hole"][0].name],
    ):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert named in text(result) and "patchproto fit" in text(result)
        assert "Traceback" not in result.output
        assert folder_digest(model_dir) == before


def test_every_bad_input_is_named_and_leaves_the_model_unchanged(
    model_dir: Path, data, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    before = folder_digest(model_dir)
    hole = data.support["hole"][0].name
    cases: list[tuple[list, str]] = []
    for path in bad_files.values():
        cases.append((["classify", model_dir, path], str(path)))
        cases.append((["add-example", model_dir, "--type", "hole", path], str(path)))
        # A bad image among good ones must not add the good ones either.
        cases.append(
            (["add-example", model_dir, "--type", "new", data.queries["hole"][0], path], str(path))
        )
    missing = tmp_path / "missing.png"
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    cases += [
        (["classify", model_dir, missing], str(missing)),
        (["classify", model_dir, empty_dir], str(empty_dir)),
        (["add-example", model_dir, "--type", "hole", missing], str(missing)),
        (["add-example", model_dir, "--type", "a/b", data.queries["hole"][0]], "'a/b'"),
        (["add-example", model_dir, "--type", "hole", data.support["hole"][0]], hole),
        (["remove-example", model_dir, "--type", "nope", hole], "'nope'"),
        (["remove-example", model_dir, "--type", "hole", "nope.png"], "'nope.png'"),
        (["remove-example", model_dir, "--type", "hole", hole, "nope.png"], "'nope.png'"),
        (["classify", tmp_path / "no_model", data.queries["hole"][0]], str(tmp_path / "no_model")),
        (
            ["add-example", tmp_path / "no_model", "--type", "hole", data.queries["hole"][0]],
            str(tmp_path / "no_model"),
        ),
        (["remove-example", tmp_path / "no_model", "--type", "hole", hole], "no_model"),
    ]
    for args, named in cases:
        result = run(*args)
        message = text(result)
        assert result.exit_code == 2, (args, result.output)
        assert named in message, (args, message)
        assert "Traceback" not in result.output, args
        assert folder_digest(model_dir) == before, args
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [".model.lock", "model"]
    assert not (tmp_path / ".no_model.lock").exists()

    # The messages list what exists.
    assert "scratch" in text(run("remove-example", model_dir, "--type", "nope", hole))
    listing = text(run("remove-example", model_dir, "--type", "hole", "nope.png"))
    assert hole in listing


def test_fit_bad_input_is_named_and_writes_nothing(
    data, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "model"
    empty_type = tmp_path / "defects_empty"
    shutil.copytree(data.defects_dir, empty_type)
    (empty_type / "dent").mkdir()
    corrupt_normal = tmp_path / "normal_corrupt"
    shutil.copytree(data.normal_dir, corrupt_normal)
    shutil.copy(bad_files["truncated"], corrupt_normal / "zz_truncated.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.png").write_bytes(b"x")
    cases = [
        (
            ["--normal", data.normal_dir, "--defects", empty_type, "--out", out],
            str(empty_type / "dent"),
        ),
        (
            ["--normal", corrupt_normal, "--defects", data.defects_dir, "--out", out],
            "zz_truncated.png",
        ),
        (
            ["--normal", tmp_path / "nowhere", "--defects", data.defects_dir, "--out", out],
            "nowhere",
        ),
        (
            ["--normal", data.normal_dir, "--defects", data.defects_dir, "--out", photos],
            str(photos),
        ),
        (
            [
                "--normal",
                data.normal_dir,
                "--defects",
                data.defects_dir,
                "--out",
                out,
                "--gamma",
                "2",
            ],
            "gamma",
        ),
        (
            [
                "--normal",
                data.normal_dir,
                "--defects",
                data.defects_dir,
                "--out",
                out,
                "--backbone",
                "vgg",
            ],
            "'vgg'",
        ),
    ]
    for args, named in cases:
        result = run("fit", *FIT_OPTIONS, "--no-cache", *args)
        assert result.exit_code == 2, (args, result.output)
        assert named in text(result), (args, text(result))
        assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in photos.iterdir()] == ["keep.png"]
