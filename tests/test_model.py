"""The saved defect model: fit, classify, atomic save, validated load, example edits.

One small model is fitted per module (six 64-pixel synthetic surfaces, three defect types with two
examples each, embedded at 64 px by the pip-installed EfficientNet-Lite0) and copied per test.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchproto.model as model_module
from patchproto.datasets import DatasetError
from patchproto.images import ImageError
from patchproto.model import (
    FORMAT_VERSION,
    MODEL_FILE,
    TENSORS_FILE,
    DefectModel,
    ModelError,
    backup_path,
    editing,
    lock_path,
)
from patchproto.synthetic import write_synthetic_set

TYPES = ("scratch", "spot", "hole")


def fit_small(data, **kwargs) -> DefectModel:
    options = {"backbone": "efficientnet_lite0", "image_size": 64, "holdout": 2, "seed": 0}
    options.update(kwargs)
    return DefectModel.fit(data.normal_dir, data.defects_dir, **options)


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU two spinning threads run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_set(root, seed=3, normal=6, support=2, queries=1, size=64, types=TYPES)


@pytest.fixture(scope="module")
def fitted(data) -> DefectModel:
    return fit_small(data)


@pytest.fixture(scope="module")
def saved(fitted: DefectModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("models") / "model")


@pytest.fixture
def model_dir(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved model."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


def queries(data) -> list[Path]:
    return [data.queries[t][0] for t in TYPES]


def test_fit_records_types_examples_and_threshold(fitted: DefectModel, data) -> None:
    assert fitted.types() == {t: [p.name for p in data.support[t]] for t in sorted(TYPES)}
    s = fitted.settings
    assert (s.backbone, s.image_size, s.normal_images, s.holdout_images) == (
        "efficientnet_lite0",
        64,
        6,
        2,
    )
    assert fitted.threshold == pytest.approx(float(fitted.holdout_scores.max()))
    assert len(fitted.holdout_scores) == 2
    example = fitted.example("hole", data.support["hole"][0].name)
    assert example.grid == (8, 8)
    assert example.patches.shape[0] == example.patch_scores.shape[0] == 64
    assert example.image_bytes == data.support["hole"][0].read_bytes()


def test_classification_fields(fitted: DefectModel, data) -> None:
    wide = Image.open(data.queries["hole"][0]).resize((96, 40))
    result = fitted.classify(wide, name="wide.png")

    assert result.name == "wide.png"
    assert result.heatmap.shape == (40, 96)
    assert [e.distance for e in result.ranking] == sorted(e.distance for e in result.ranking)
    assert {e.type for e in result.ranking} == set(TYPES)
    assert sum(e.confidence for e in result.ranking) == pytest.approx(1.0)
    assert result.predicted_type == result.ranking[0].type
    assert result.is_anomalous == (result.anomaly_score > result.threshold)
    assert result.deciding_patches
    for patch in result.deciding_patches:
        x0, y0, x1, y1 = patch.box
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 40
        assert patch.support_type == result.predicted_type
        assert patch.support_example in fitted.types()[patch.support_type]
    record = json.loads(json.dumps(result.to_dict()))
    assert record["predicted_type"] == result.predicted_type
    assert "heatmap" not in record
    assert np.asarray(result.to_dict(heatmap=True)["heatmap"]).shape == (40, 96)


def test_classify_accepts_paths_bytes_and_images_alike(fitted: DefectModel, data) -> None:
    path = data.queries["spot"][0]
    by_path = fitted.classify(path)
    by_bytes = fitted.classify(path.read_bytes(), name=path.name)
    by_image = fitted.classify(Image.open(path), name=path.name)
    assert by_path.name == path.name
    for other in (by_bytes, by_image):
        assert [e.distance for e in other.ranking] == [e.distance for e in by_path.ranking]
    batch = fitted.classify_many(queries(data))
    assert [r.predicted_type for r in batch] == [
        fitted.classify(p).predicted_type for p in queries(data)
    ]


def test_save_load_round_trip_gives_identical_classifications(
    fitted: DefectModel, saved: Path, data
) -> None:
    loaded = DefectModel.load(saved)
    assert loaded.types() == fitted.types()
    assert loaded.settings == fitted.settings
    assert torch.equal(loaded.memory_bank, fitted.memory_bank)
    for path in queries(data):
        before, after = fitted.classify(path), loaded.classify(path)
        a, b = before.to_dict(), after.to_dict()
        a.pop("timing"), b.pop("timing")
        assert a == b
        assert np.array_equal(before.heatmap, after.heatmap)


def test_model_folder_holds_no_pickle_and_loads_without_torch_load(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffixes = {p.suffix for p in saved.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".png", ".jpg"}
    for path in saved.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80"), f"{path} looks like a pickle"
            assert head != b"PK\x03\x04", f"{path} looks like a torch zip archive"

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a model must not unpickle anything")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert DefectModel.load(saved).types()


def test_interrupted_save_leaves_previous_model_intact(
    model_dir: Path, data, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = folder_digest(model_dir)
    model = DefectModel.load(model_dir)
    model.add_examples("dent", [data.queries["hole"][0]])

    real_write = model_module._write_file
    calls = {"n": 0}

    def failing_write(path: Path, payload: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # after some example images, before the tensors and the index
            raise OSError("disk full (simulated)")
        real_write(path, payload)

    monkeypatch.setattr(model_module, "_write_file", failing_write)
    with pytest.raises(OSError, match="simulated"):
        model.save(model_dir)

    assert folder_digest(model_dir) == before
    assert [p.name for p in model_dir.parent.iterdir()] == ["model"]  # no staging left behind
    assert "dent" not in DefectModel.load(model_dir).types()


def test_interruption_between_renames_is_reported_with_the_backup(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = DefectModel.load(model_dir)
    real_rename = model_module.os.rename
    calls = {"n": 0}

    def rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # old -> backup done, new -> target interrupted
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(model_module.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        model.save(model_dir)
    monkeypatch.undo()

    assert not model_dir.exists() and backup_path(model_dir).is_dir()
    with pytest.raises(ModelError) as info:
        DefectModel.load(model_dir)
    message = str(info.value)
    assert str(backup_path(model_dir)) in message and "mv" in message
    backup_path(model_dir).rename(model_dir)
    assert DefectModel.load(model_dir).types() == model.types()


def test_save_replaces_a_model_and_refuses_other_folders(
    fitted: DefectModel, tmp_path: Path
) -> None:
    target = fitted.save(tmp_path / "m")
    fitted.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a PatchProto model"):
        fitted.save(photos)
    assert [p.name for p in photos.iterdir()] == ["a.png"]


def test_version_mismatch_names_folder_versions_and_fix(model_dir: Path) -> None:
    index = json.loads((model_dir / MODEL_FILE).read_text())
    index["format_version"] = 99
    (model_dir / MODEL_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelError) as info:
        DefectModel.load(model_dir)
    message = str(info.value)
    assert str(model_dir) in message and "99" in message
    assert f"versions 1 and {FORMAT_VERSION}" in message and "patchproto fit" in message


@pytest.mark.parametrize("name", [MODEL_FILE, TENSORS_FILE, "example image"])
def test_missing_file_is_named(model_dir: Path, name: str) -> None:
    missing = (
        next((model_dir / "examples").iterdir()) if name == "example image" else model_dir / name
    )
    missing.unlink()
    with pytest.raises(ModelError) as info:
        DefectModel.load(model_dir)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate tensors", "garbage index", "index without keys"])
def test_corrupt_files_are_named(model_dir: Path, damage: str) -> None:
    if damage == "truncate tensors":
        damaged = model_dir / TENSORS_FILE
        damaged.write_bytes(damaged.read_bytes()[:100])
    elif damage == "garbage index":
        damaged = model_dir / MODEL_FILE
        damaged.write_bytes(b"{not json")
    else:
        damaged = model_dir / MODEL_FILE
        damaged.write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(ModelError) as info:
        DefectModel.load(model_dir)
    assert str(damaged) in str(info.value)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model folder"):
        DefectModel.load(tmp_path / "nowhere")


def test_other_backbone_weights_are_refused(model_dir: Path) -> None:
    index = json.loads((model_dir / MODEL_FILE).read_text())
    index["settings"]["weights_id"] = "0123456789abcdef"
    (model_dir / MODEL_FILE).write_text(json.dumps(index))
    model = DefectModel.load(model_dir)
    with pytest.raises(ModelError, match="0123456789abcdef"):
        model.classify(Image.new("RGB", (64, 64)))


def test_add_examples_creates_a_type_and_is_checked(model_dir: Path, data) -> None:
    model = DefectModel.load(model_dir)
    crack = data.queries["hole"][0]
    added = model.add_examples("crack", [("c1.png", crack.read_bytes())])
    assert added == ["c1.png"]
    assert model.types()["crack"] == ["c1.png"]
    assert model.example_image("crack", "c1.png") == crack.read_bytes()
    assert {e.type for e in model.classify(crack).ranking} == {*TYPES, "crack"}

    with pytest.raises(ModelError, match="already has an example named 'c1.png'"):
        model.add_examples("crack", [("c1.png", data.queries["spot"][0].read_bytes())])
    with pytest.raises(ModelError, match="same image is already an example"):
        model.add_examples("crack", [("other.png", crack.read_bytes())])
    with pytest.raises(ImageError, match="broken.png"):
        model.add_examples(
            "crack", [("ok.png", data.queries["spot"][0].read_bytes()), ("broken.png", b"junk")]
        )
    with pytest.raises(ModelError, match="cannot be used"):
        model.add_examples("a/b", [crack])
    assert model.types()["crack"] == ["c1.png"]

    model.save(model_dir)
    assert DefectModel.load(model_dir).types() == model.types()


def test_non_png_examples_are_stored_as_png(model_dir: Path, data) -> None:
    model = DefectModel.load(model_dir)
    buffer = io.BytesIO()
    Image.open(data.queries["spot"][0]).save(buffer, format="BMP")
    model.add_examples("spot", [("s.bmp", buffer.getvalue())])
    stored = model.example_image("spot", "s.bmp")
    assert stored.startswith(b"\x89PNG")
    assert model.example("spot", "s.bmp").media_type == "image/png"


def test_remove_example_and_errors_list_what_exists(model_dir: Path, data) -> None:
    model = DefectModel.load(model_dir)
    with pytest.raises(ModelError) as info:
        model.remove_example("crack", "x.png")
    assert "'crack'" in str(info.value) and all(t in str(info.value) for t in TYPES)
    with pytest.raises(ModelError) as info:
        model.remove_example("hole", "x.png")
    assert "'x.png'" in str(info.value) and data.support["hole"][0].name in str(info.value)

    first, second = (p.name for p in data.support["hole"])
    model.remove_example("hole", first)
    assert model.types()["hole"] == [second]
    model.remove_example("hole", second)
    assert "hole" not in model.types()
    assert {e.type for e in model.classify(data.queries["hole"][0]).ranking} == {"scratch", "spot"}


def test_the_last_example_cannot_be_removed(model_dir: Path) -> None:
    model = DefectModel.load(model_dir)
    names = [(t, n) for t, ns in model.types().items() for n in ns]
    for type_name, name in names[:-1]:
        model.remove_example(type_name, name)
    with pytest.raises(ModelError, match="last example of the last defect type"):
        model.remove_example(*names[-1])


def test_fit_errors_name_the_folder(data, tmp_path: Path) -> None:
    empty = tmp_path / "defects"
    (empty / "scratch").mkdir(parents=True)
    with pytest.raises(DatasetError, match="scratch"):
        DefectModel.fit(data.normal_dir, empty)
    with pytest.raises(ModelError, match="holdout"):
        fit_small(data, holdout=6)
    with pytest.raises(ModelError, match="gamma"):
        fit_small(data, gamma=1.5)


def test_position_statistics_come_from_the_held_back_normal_images(
    fitted: DefectModel, data, saved: Path
) -> None:
    assert fitted.settings.score_norm == "position"
    norm = fitted.position_norm
    assert norm is not None and norm.mean.shape == norm.std.shape == (64,)
    # The mean of the held-back images' normalised patch scores is 0 at every position.
    held = sorted(data.normal_dir.iterdir())
    scores = [
        fitted._memory_bank().patch_scores(e.patches)
        for e in fitted.embedder().embed([Image.open(p).convert("RGB") for p in held])
    ]
    held_back = [s for s in scores if float(s.max()) in set(fitted.holdout_scores.tolist())]
    assert len(held_back) == 2
    assert torch.allclose(norm(torch.stack(held_back)).mean(dim=0), torch.zeros(64), atol=1e-4)
    assert torch.equal(DefectModel.load(saved).position_norm.std, norm.std)


def test_position_normalisation_changes_selection_not_the_anomaly_score(
    fitted: DefectModel, data
) -> None:
    plain = fit_small(data, score_norm="none")
    assert plain.position_norm is None
    for path in queries(data):
        a, b = fitted.classify(path), plain.classify(path)
        assert a.anomaly_score == pytest.approx(b.anomaly_score)
        assert np.allclose(a.heatmap, b.heatmap)
        assert [p.score for p in a.deciding_patches] != [p.score for p in b.deciding_patches]


def test_version_1_models_load_with_the_papers_scores(model_dir: Path, data) -> None:
    index = json.loads((model_dir / MODEL_FILE).read_text())
    index["format_version"] = 1
    del index["settings"]["score_norm"]
    (model_dir / MODEL_FILE).write_text(json.dumps(index))
    model = DefectModel.load(model_dir)
    assert model.settings.score_norm == "none" and model.position_norm is None
    assert model.classify(queries(data)[0]).predicted_type in TYPES


def test_missing_position_statistics_are_named(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / TENSORS_FILE))
    del tensors["position_std"]
    save_file(tensors, str(model_dir / TENSORS_FILE))
    index = json.loads((model_dir / MODEL_FILE).read_text())
    digest = hashlib.sha256((model_dir / TENSORS_FILE).read_bytes()).hexdigest()
    index["tensors"]["sha256"] = digest
    (model_dir / MODEL_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelError, match="position_std") as info:
        DefectModel.load(model_dir)
    assert TENSORS_FILE in str(info.value) and "patchproto fit" in str(info.value)


def test_position_statistics_need_two_held_back_images(data) -> None:
    with pytest.raises(ModelError, match="score-norm none"):
        fit_small(data, holdout=1)
    assert fit_small(data, holdout=1, score_norm="none").settings.holdout_images == 1
    assert fit_small(data, holdout=0.01).settings.holdout_images == 2


def test_edits_of_one_model_take_turns(model_dir: Path) -> None:
    order: list[str] = []
    waiting = threading.Event()

    def second() -> None:
        waiting.set()
        with editing(model_dir):
            order.append("second holds the lock")

    with editing(model_dir):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(5)
        thread.join(0.3)  # the second editor stays blocked while the first holds the lock
        assert thread.is_alive()
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second holds the lock"]
    assert lock_path(model_dir).parent == model_dir.parent  # beside the folder, not inside


def test_random_weight_models_reload_identically(data, tmp_path: Path) -> None:
    model = fit_small(data, pretrained=False)
    loaded = DefectModel.load(model.save(tmp_path / "model"))
    before, after = model.classify(queries(data)[0]), loaded.classify(queries(data)[0])
    assert [e.distance for e in after.ranking] == [e.distance for e in before.ranking]


def test_first_classifications_from_several_threads_agree(saved: Path, data) -> None:
    # A freshly loaded model builds its backbone, bank index and support set on first use;
    # threads arriving together must all get the one-at-a-time answer. (The interleaving that
    # once broke this falls between two statements, so this run does not always reach it.)
    from concurrent.futures import ThreadPoolExecutor

    def outcome(model: DefectModel) -> dict:
        found = model.classify(queries(data)[0]).to_dict()
        found.pop("timing")
        return found

    model = DefectModel.load(saved)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: outcome(model), range(8)))
    assert results == [outcome(DefectModel.load(saved))] * 8
