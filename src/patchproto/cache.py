"""An on-disk feature cache, so that an image is embedded once however many runs use it.

Entries are keyed by the embedder (backbone, its weights, image size, dimension) and by the
SHA-256 of the image file's bytes (plus, for masked images, of the mask), so a renamed file
hits and an edited one misses. Each entry is a small safetensors file written to a temporary
name and renamed into place: an interrupted run leaves whole entries or none.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from patchproto.embedding import Embedding, PatchEmbedder
from patchproto.images import ImageError, load_image

logger = logging.getLogger(__name__)

CACHE_ENV = "PATCHPROTO_CACHE"


def default_cache_dir() -> Path:
    """``$PATCHPROTO_CACHE`` if set, else ``~/.cache/patchproto``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "patchproto"))


def content_key(data: bytes) -> str:
    """SHA-256 of raw bytes, as hex."""
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bank_key(
    embedder_key: str,
    image_keys: Sequence[str],
    coreset_ratio: float,
    seed: int,
    projection_dim: int | None,
) -> str:
    """The cache key of a memory bank: the embedder, the normal images' contents (in any
    order), the coreset ratio, its seed and its projection. ``detect`` and ``evaluate`` compute
    the same key for the same ``train/good``, so the second one loads the first one's bank."""
    parts = ["bank", embedder_key, *sorted(image_keys), f"{coreset_ratio}", f"{seed}"]
    parts.append(f"{projection_dim}")
    return content_key("\x1f".join(parts).encode("utf-8"))


class FeatureCache:
    """Embeds images through a :class:`PatchEmbedder`, reusing earlier results from disk.

    Args:
        embedder: Computes embeddings on a miss.
        cache_dir: Root folder; ``None`` keeps nothing on disk.
    """

    def __init__(self, embedder: PatchEmbedder, cache_dir: Path | None = None) -> None:
        self.embedder = embedder
        self.folder = Path(cache_dir) / embedder.key if cache_dir is not None else None
        self.hits = 0
        self.misses = 0

    def _entry(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> Embedding | None:
        entry = self._entry(key)
        if entry is None or not entry.is_file():
            return None
        try:
            tensors = load_file(str(entry))
            grid = tensors["grid"].tolist()
            return Embedding(tensors["patches"], (int(grid[0]), int(grid[1])), tensors["pooled"])
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            logger.warning("Ignoring unreadable cache entry %s (%s); recomputing", entry, error)
            return None

    def _write(self, key: str, embedding: Embedding) -> None:
        entry = self._entry(key)
        if entry is None:
            return
        tensors = {
            "patches": embedding.patches.contiguous(),
            "pooled": embedding.pooled.contiguous(),
            "grid": torch.tensor(embedding.grid, dtype=torch.int64),
        }
        atomic_write_bytes(entry, save(tensors))

    def _bank_entry(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / "banks" / f"{key}.safetensors"

    def read_bank(self, key: str) -> torch.Tensor | None:
        """The memory bank embeddings stored under ``key`` (see :func:`bank_key`), if any."""
        entry = self._bank_entry(key)
        if entry is None or not entry.is_file():
            return None
        try:
            return load_file(str(entry))["embeddings"]
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            logger.warning("Ignoring unreadable memory bank %s (%s); rebuilding", entry, error)
            return None

    def write_bank(self, key: str, embeddings: torch.Tensor) -> None:
        """Store a memory bank's embeddings under ``key`` (nothing without a cache folder)."""
        entry = self._bank_entry(key)
        if entry is not None:
            atomic_write_bytes(entry, save({"embeddings": embeddings.contiguous()}))

    def embed_images(
        self,
        images: Sequence[Image.Image | Callable[[], Image.Image]],
        keys: Sequence[str],
        on_image: Callable[[int], None] | None = None,
    ) -> list[Embedding]:
        """Embed images given with their cache keys; an image may be a loader called on a miss."""
        found: list[Embedding | None] = [self._read(key) for key in keys]
        todo = [i for i, hit in enumerate(found) if hit is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if on_image is not None and len(keys) > len(todo):
            on_image(len(keys) - len(todo))

        step = self.embedder.batch_size
        for start in range(0, len(todo), step):
            indices = todo[start : start + step]
            batch = [
                images[i] if isinstance(images[i], Image.Image) else images[i]() for i in indices
            ]
            for index, embedding in zip(indices, self.embedder.embed(batch), strict=True):
                self._write(keys[index], embedding)
                found[index] = embedding
            if on_image is not None:
                on_image(len(indices))
        return [e for e in found if e is not None]

    def embed_files(
        self,
        paths: Sequence[Path],
        on_image: Callable[[int], None] | None = None,
    ) -> list[Embedding]:
        """Embed image files, keyed by their content.

        Raises:
            ImageError: A file cannot be read as an image (its name is in the message).
        """
        contents: list[bytes] = []
        for path in paths:
            try:
                contents.append(Path(path).read_bytes())
            except OSError as error:
                raise ImageError(
                    path, f"cannot read the file ({error})", "Check the path"
                ) from error

        def loader(data: bytes, name: str) -> Callable[[], Image.Image]:
            return lambda: load_image(data, name=name)

        loaders = [loader(d, str(p)) for d, p in zip(contents, paths, strict=True)]
        keys = [content_key(d) for d in contents]
        return self.embed_images(loaders, keys, on_image)
