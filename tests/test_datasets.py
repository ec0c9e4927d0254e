"""Data set layouts: MVTec AD roots (many categories or one), the plain layout, and bad layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from patchproto.datasets import (
    GOOD,
    DatasetError,
    default_data_root,
    load_category,
    load_mvtec,
    load_plain,
)


def test_root_with_many_categories(mvtec_root: Path) -> None:
    categories = load_mvtec(mvtec_root)

    assert [c.name for c in categories] == ["gizmo", "widget"]
    widget = categories[1]
    assert widget.root == mvtec_root / "widget"
    assert len(widget.train_good) == 6
    assert len(widget.test_good) == 3
    assert widget.defect_types == ["scratch", "stain"]
    assert [len(widget.defects[t]) for t in widget.defect_types] == [3, 2]
    assert all(p.suffix == ".png" for p in widget.train_good)


def test_jpeg_images_get_png_masks_by_stem(mvtec_root: Path) -> None:
    gizmo = load_mvtec(mvtec_root, ["gizmo"])[0]

    samples = gizmo.defects["crack"]

    assert [s.path.name for s in samples] == ["000.jpg", "001.jpg"]
    assert [s.mask.name for s in samples] == ["000_mask.png", "001_mask.png"]
    assert all(s.mask.parent == mvtec_root / "gizmo" / "ground_truth" / "crack" for s in samples)
    assert all(s.label == "crack" for s in samples)


def test_test_samples_are_good_first_then_types_in_order(mvtec_root: Path) -> None:
    widget = load_mvtec(mvtec_root, ["widget"])[0]

    labels = [s.label for s in widget.test_samples()]

    assert labels == [GOOD] * 3 + ["scratch"] * 3 + ["stain"] * 2
    assert all(s.mask is None for s in widget.test_samples() if s.label == GOOD)


def test_root_that_is_one_category(mvtec_root: Path) -> None:
    categories = load_mvtec(mvtec_root / "widget")

    assert [c.name for c in categories] == ["widget"]
    assert load_category(mvtec_root / "widget").defect_types == ["scratch", "stain"]


def test_category_selection_keeps_the_order_asked(mvtec_root: Path) -> None:
    assert [c.name for c in load_mvtec(mvtec_root, ["widget", "gizmo"])] == ["widget", "gizmo"]


def test_missing_masks_are_none(tmp_path: Path, make_category) -> None:
    folder = make_category(tmp_path, "part", masks={"scratch"})
    # A mask under another name is not this image's mask.
    (folder / "ground_truth" / "scratch" / "000_mask.png").rename(
        folder / "ground_truth" / "scratch" / "000.png"
    )

    category = load_category(folder)

    assert [s.mask is None for s in category.defects["scratch"]] == [True, False, False]
    assert all(s.mask is None for s in category.defects["stain"])


def test_category_without_test_folder_has_only_training_images(tmp_path, make_category) -> None:
    folder = make_category(tmp_path, "part")
    shutil.rmtree(folder / "test")

    category = load_category(folder)

    assert len(category.train_good) == 6
    assert category.test_samples() == []


def test_unknown_category_lists_the_available_ones(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        load_mvtec(mvtec_root, ["widget", "sprocket"])
    message = str(caught.value)
    assert str(mvtec_root) in message
    assert "sprocket" in message
    assert "gizmo" in message and "widget" in message


def test_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder") as caught:
        load_mvtec(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value)


def test_folder_of_images_is_not_a_category_root(tmp_path: Path, make_image) -> None:
    make_image(tmp_path / "flat" / "a.png")

    with pytest.raises(DatasetError, match="no MVTec AD category") as caught:
        load_mvtec(tmp_path / "flat")
    assert str(tmp_path / "flat") in str(caught.value)


def test_category_without_train_good(tmp_path: Path, make_category) -> None:
    folder = make_category(tmp_path, "part")
    (folder / "train" / "good").rename(folder / "train" / "normal")

    with pytest.raises(DatasetError, match="train/good") as caught:
        load_category(folder)
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize("empty", ["train/good", "test/good", "test/scratch"])
def test_empty_image_folder_is_named(tmp_path: Path, make_category, empty: str) -> None:
    folder = make_category(tmp_path, "part")
    target = folder / empty
    for path in target.iterdir():
        path.unlink()
    (target / "readme.txt").write_text("not an image")

    with pytest.raises(DatasetError, match="no images") as caught:
        load_mvtec(tmp_path)
    assert str(target) in str(caught.value)


def test_plain_layout_with_optional_masks(plain_root: Path) -> None:
    category = load_plain(plain_root / "normal", plain_root / "defects", name="mine")

    assert category.name == "mine"
    assert len(category.train_good) == 5
    assert category.test_good == []
    assert category.defect_types == ["dent", "spot"]
    dents = category.defects["dent"]
    # The masks sit beside the images but are not images of the type.
    assert [s.path.name for s in dents] == ["dent0.png", "dent1.png"]
    assert [s.mask.name for s in dents] == ["dent0_mask.png", "dent1_mask.png"]
    assert all(s.mask is None for s in category.defects["spot"])


def test_plain_layout_normal_only(plain_root: Path) -> None:
    category = load_plain(plain_root / "normal")

    assert category.name == "normal"
    assert category.defects == {}


def test_plain_layout_errors_name_the_folder(plain_root: Path, make_image) -> None:
    with pytest.raises(DatasetError) as caught:
        load_plain(plain_root / "absent")
    assert str(plain_root / "absent") in str(caught.value)

    make_image(plain_root / "defects" / "loose.png")
    with pytest.raises(DatasetError, match="loose.png") as caught:
        load_plain(plain_root / "normal", plain_root / "defects")
    assert str(plain_root / "defects") in str(caught.value)

    empty = plain_root / "no_types"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no defect type folders") as caught:
        load_plain(plain_root / "normal", empty)
    assert str(empty) in str(caught.value)

    (plain_root / "defects" / "loose.png").unlink()
    (plain_root / "defects" / "hollow").mkdir()
    with pytest.raises(DatasetError, match="no images") as caught:
        load_plain(plain_root / "normal", plain_root / "defects")
    assert str(plain_root / "defects" / "hollow") in str(caught.value)


def test_default_data_root_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATCHPROTO_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("PATCHPROTO_DATA")
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == tmp_path.parent / "shared" / "data"
