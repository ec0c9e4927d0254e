"""The feature cache: keyed by content and embedder, self-healing, and atomic on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchproto.cache import FeatureCache, atomic_write_bytes, content_key, default_cache_dir
from patchproto.embedding import PatchEmbedder
from patchproto.images import ImageError


class CountingEmbedder(PatchEmbedder):
    """A patch embedder that counts the images it actually embeds."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embedded = 0

    def embed(self, images, on_batch=None):
        self.embedded += len(images)
        return super().embed(images, on_batch)


@pytest.fixture
def embedder(random_backbone) -> CountingEmbedder:
    return CountingEmbedder(random_backbone, image_size=64, batch_size=4)


@pytest.fixture
def files(tmp_path: Path, make_image) -> list[Path]:
    return [make_image(tmp_path / "images" / f"{i}.png", seed=i) for i in range(3)]


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_miss_then_hit(tmp_path: Path, embedder, files) -> None:
    cache = FeatureCache(embedder, tmp_path / "cache")

    first = cache.embed_files(files)
    second = FeatureCache(embedder, tmp_path / "cache").embed_files(files)

    assert embedder.embedded == 3
    assert (cache.hits, cache.misses) == (0, 3)
    assert len(_entries(tmp_path / "cache")) == 3
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.patches, b.patches)
        assert torch.equal(a.pooled, b.pooled)
        assert a.grid == b.grid == (8, 8)


def test_renamed_file_still_hits(tmp_path: Path, embedder, files) -> None:
    FeatureCache(embedder, tmp_path / "cache").embed_files(files)
    renamed = tmp_path / "elsewhere" / "renamed.png"
    renamed.parent.mkdir()
    shutil.copy(files[1], renamed)

    cache = FeatureCache(embedder, tmp_path / "cache")
    cache.embed_files([renamed])

    assert (cache.hits, cache.misses) == (1, 0)
    assert embedder.embedded == 3


def test_edited_file_misses(tmp_path: Path, embedder, files) -> None:
    FeatureCache(embedder, tmp_path / "cache").embed_files(files)
    pixels = np.asarray(Image.open(files[0])).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(files[0])

    cache = FeatureCache(embedder, tmp_path / "cache")
    cache.embed_files(files)

    assert (cache.hits, cache.misses) == (2, 1)
    assert len(_entries(tmp_path / "cache")) == 4


def test_another_embedder_setting_misses(tmp_path: Path, random_backbone, files) -> None:
    FeatureCache(PatchEmbedder(random_backbone, image_size=64), tmp_path / "cache").embed_files(
        files
    )

    cache = FeatureCache(PatchEmbedder(random_backbone, image_size=64, dim=32), tmp_path / "cache")
    embeddings = cache.embed_files(files)

    assert (cache.hits, cache.misses) == (0, 3)
    assert embeddings[0].patches.shape == (64, 32)
    assert len({p.parent.parent for p in _entries(tmp_path / "cache")}) == 2


def test_corrupt_entry_is_recomputed(tmp_path: Path, embedder, files) -> None:
    fresh = FeatureCache(embedder, tmp_path / "cache").embed_files(files[:1])[0]
    (entry,) = _entries(tmp_path / "cache")
    entry.write_bytes(b"\x00\x01 torn write")

    cache = FeatureCache(embedder, tmp_path / "cache")
    again = cache.embed_files(files[:1])[0]

    assert (cache.hits, cache.misses) == (0, 1)
    assert torch.equal(again.patches, fresh.patches)
    # The entry was rewritten whole: the next run hits.
    later = FeatureCache(embedder, tmp_path / "cache")
    later.embed_files(files[:1])
    assert (later.hits, later.misses) == (1, 0)


def test_no_temporary_files_are_left(tmp_path: Path, embedder, files) -> None:
    FeatureCache(embedder, tmp_path / "cache").embed_files(files)
    assert _leftovers(tmp_path / "cache") == []

    target = tmp_path / "out" / "value.bin"
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12345)  # fails while writing
    assert not target.exists()
    assert _leftovers(tmp_path / "out") == []

    atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["value.bin"]


def test_without_a_folder_nothing_is_kept(tmp_path: Path, embedder, files) -> None:
    cache = FeatureCache(embedder, None)
    cache.embed_files(files)
    cache.embed_files(files)

    assert (cache.hits, cache.misses) == (0, 6)
    assert embedder.embedded == 6


def test_loaders_run_only_on_a_miss(tmp_path: Path, embedder) -> None:
    image = Image.new("RGB", (64, 48), (30, 60, 90))
    FeatureCache(embedder, tmp_path / "cache").embed_images([image], ["key-a"])
    calls: list[str] = []

    def loader() -> Image.Image:
        calls.append("loaded")
        return image

    progress: list[int] = []
    cache = FeatureCache(embedder, tmp_path / "cache")
    cache.embed_images([loader, loader], ["key-a", "key-b"], on_image=progress.append)

    assert calls == ["loaded"]
    assert sum(progress) == 2


def test_bad_file_is_named(tmp_path: Path, embedder, files) -> None:
    bad = tmp_path / "images" / "bad.png"
    bad.write_bytes(b"not a png")

    with pytest.raises(ImageError) as caught:
        FeatureCache(embedder, tmp_path / "cache").embed_files([*files, bad])
    assert str(bad) in str(caught.value)

    with pytest.raises(ImageError, match="missing.png"):
        FeatureCache(embedder, tmp_path / "cache").embed_files([tmp_path / "missing.png"])


def test_keys_and_default_folder(monkeypatch, tmp_path: Path) -> None:
    assert content_key(b"abc") == content_key(b"abc") != content_key(b"abd")
    assert len(content_key(b"")) == 64
    monkeypatch.setenv("PATCHPROTO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
