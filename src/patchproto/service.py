"""The web service: classify uploaded images and edit a model's defect types from a browser.

``patchproto serve MODEL`` loads a fitted model folder and serves a JSON API and one web page:

========================================  ===================================================
``GET  /``                                 the page (``static/index.html``)
``GET  /api/health``                       liveness, the model folder and its size
``POST /api/classify``                     multipart ``file``: the classification, with the
                                           heatmap overlay as a base64 PNG data URL
``GET  /api/types``                        the defect types and their example names
``GET  /api/examples/{type}/{name}``       one example image (``?thumbnail=N`` for a PNG
                                           at most N pixels wide and high)
``POST /api/types/{type}/examples``        multipart ``files``: add examples (new type if
                                           needed)
``DELETE /api/types/{type}/examples/{n}``  remove one example
========================================  ===================================================

Errors are JSON ``{"detail": "<message>"}`` whose message names the upload, type or example
and says what to do: 413 for uploads over the size cap, 422 for files that are not usable
images, 404 for unknown types or examples (listing those that exist).

Classification runs in worker threads, several at once, under the read side of a
readers-writer lock; adding or removing examples takes the write side, so requests see the
model either before or after a change, never in between. Every change is saved with the
model's own atomic save before the response, so an acknowledged change survives a crash; a
change that fails reloads the model from its folder, so memory and disk stay the same.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import anyio
import numpy as np
import typer
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patchproto import __version__
from patchproto.backbones import WeightsError
from patchproto.cache import content_key
from patchproto.images import ImageError, load_image
from patchproto.model import MODEL_FILE, Classification, DefectModel, ModelError, editing
from patchproto.visualize import overlay_heatmap

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_FILES_PER_UPLOAD = 16
# Room for multipart boundaries and part headers on top of the file bytes themselves.
MULTIPART_OVERHEAD = 64 * 1024
# The overlay is for a screen: larger images are shrunk to this longest side before encoding.
OVERLAY_MAX_SIDE = 1024
THUMBNAIL_MAX_SIDE = 512
UPLOAD_FIX = "Upload a PNG, JPEG, BMP, TIFF or WebP image that opens in an image viewer"

T = TypeVar("T")


def _size_text(count: int) -> str:
    """A byte count for people: ``20.0 MB``, ``512 KB`` or ``100 bytes``."""
    if count >= 1024 * 1024:
        return f"{count / 1024 / 1024:.1f} MB"
    if count >= 1024:
        return f"{count / 1024:.0f} KB"
    return f"{count} bytes"


def _too_large_message(what: str, size: int | None, limit: int) -> str:
    actual = f" is {_size_text(size)}," if size is not None else " is"
    return (
        f"{what}{actual} over this server's limit of {_size_text(limit)} per image. "
        "Downscale or compress the image, or start the server with a larger --max-upload-mb"
    )


class _BodyTooLargeError(Exception):
    """Raised from ``receive`` when a request body grows past its limit."""


class UploadLimitMiddleware:
    """Refuses request bodies over the upload limit with 413, before they are read into memory.

    A request may carry one image (``max_files`` on paths ending in ``/examples``) of at most
    ``max_upload_bytes`` each, plus room for the multipart framing. A declared
    ``Content-Length`` over that is refused at once; a body without one (chunked) is counted
    as it arrives and refused when it passes the limit. The handlers check each file again.

    Args:
        app: The application to protect.
        max_upload_bytes: The per-image cap.
        max_files: Images accepted in one request to an ``/examples`` path.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_files: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_files = max_files

    def _files(self, path: str) -> int:
        return self.max_files if path.rstrip("/").endswith("/examples") else 1

    async def _refuse(self, send: Send, size: int | None, files: int) -> None:
        if files == 1:
            message = _too_large_message("The upload", size, self.max_upload_bytes)
        else:
            actual = f" is {_size_text(size)}," if size is not None else " is"
            message = (
                f"The upload{actual} over this server's limit of {files} images of at most "
                f"{_size_text(self.max_upload_bytes)} each per request. Send fewer or smaller "
                "images at a time, or start the server with a larger --max-upload-mb"
            )
        response = JSONResponse({"detail": message}, status_code=413)
        await response({"type": "http"}, _no_body, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        files = self._files(scope["path"])
        limit = files * self.max_upload_bytes + MULTIPART_OVERHEAD
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared), files)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLargeError:
            if started:
                raise
            await self._refuse(send, None, files)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers so it cannot starve."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the lock shared for the ``with`` block."""
        with self._condition:
            self._condition.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the lock exclusively for the ``with`` block."""
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(lambda: not self._writer and not self._readers)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


class ModelStore:
    """A loaded model and its folder, guarded so that reads run together and changes one by one.

    Args:
        folder: The model folder; every change is saved back here before it is acknowledged.

    Raises:
        ModelError: The folder holds no usable model.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = ReadWriteLock()
        with editing(self.folder):
            self.model = DefectModel.load(self.folder)
            self._loaded = self._stamp()
        self._prepare()

    def _stamp(self) -> str | None:
        """Identifies the saved model (its index names every file's hash and the save time)."""
        try:
            return content_key((self.folder / MODEL_FILE).read_bytes())
        except OSError:
            return None

    def _prepare(self) -> None:
        # DefectModel builds its backbone, memory bank index and support set on first use; one
        # classification up front keeps that wait out of the first user's request.
        try:
            self.model.classify(Image.new("RGB", (32, 32), (128, 128, 128)), name="warm-up")
        except ModelError as error:
            logger.warning("the model cannot classify yet: %s", error)

    def read(self, action: Callable[[DefectModel], T]) -> T:
        """Run ``action(model)`` while no change is in progress (many may run at once)."""
        with self._lock.reading():
            return action(self.model)

    def change(
        self,
        action: Callable[[DefectModel], T],
        check: Callable[[DefectModel], None] | None = None,
    ) -> T:
        """Run ``action(model)`` alone and save the model; on any failure reload the saved one.

        ``check(model)`` runs first under the same lock; what it raises leaves the model as is.
        The result is returned only once the model folder holds the change. The folder's edit
        lock is held throughout, and if another process (``add-example``, say) saved the model
        since this one loaded it, that version is loaded first, so its change is kept.
        """
        with self._lock.writing(), editing(self.folder):
            if self._stamp() != self._loaded:
                logger.info("%s changed on disk; loading it before this change", self.folder)
                self.model = DefectModel.load(self.folder)
                self._loaded = self._stamp()
                self._prepare()
            if check is not None:
                check(self.model)
            try:
                result = action(self.model)
                self.model.save(self.folder)
                self._loaded = self._stamp()
            except BaseException:
                # The change may have half-happened in memory; the folder is the truth.
                logger.warning("change failed; reloading the model from %s", self.folder)
                self.model = DefectModel.load(self.folder)
                self._loaded = self._stamp()
                self._prepare()
                raise
            self._prepare()
            return result


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _listing(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names) if names else "none"


def _check_type(types: dict[str, list[str]], type_name: str) -> list[str]:
    if type_name not in types:
        raise _error(
            404,
            f"No defect type {type_name!r}. Types in this model: {_listing(sorted(types))}. "
            "Check the spelling, or add examples to create it",
        )
    return types[type_name]


def _check_example(types: dict[str, list[str]], type_name: str, example: str) -> None:
    examples = _check_type(types, type_name)
    if example not in examples:
        raise _error(
            404,
            f"Type {type_name!r} has no example {example!r}. Its examples: {_listing(examples)}",
        )


def _example_name(upload: UploadFile, index: int) -> str:
    """An uploaded example's name: the base name of its file, without control characters."""
    raw = (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in raw if unicodedata.category(c)[0] != "C").strip()
    return name if name.strip(".") else f"upload-{index + 1}.png"


def _check_same_origin(request: Request) -> None:
    """Refuse a change sent by a page from another site (403).

    A form on any web site can make the browser POST to this server; browsers name the page's
    origin in the ``Origin`` header, so a change whose origin is not this server is refused.
    Requests without the header (command-line clients) pass.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    # Behind a proxy that rewrites Host, the name the browser used is in X-Forwarded-Host.
    hosts = {host, request.headers.get("x-forwarded-host", host)}
    if origin == "null" or urlsplit(origin).netloc not in hosts:
        raise _error(
            403,
            f"Changes from pages of other sites are refused (origin {origin!r}, this server "
            f"{host!r}). Use this server's own page, or send the request without an Origin",
        )


def _upload_label(upload: UploadFile) -> str:
    return f"upload {upload.filename!r}" if upload.filename else "the upload"


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The bytes of one uploaded file, refusing it (413) when over ``max_bytes``."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _error(413, _too_large_message(f"The {_upload_label(upload)}", None, max_bytes))
    return data


def _decode(data: bytes, upload: UploadFile) -> Image.Image:
    """The uploaded image; 422 naming the upload and the fix when it cannot be used."""
    try:
        return load_image(data, name=_upload_label(upload))
    except ImageError as error:
        # The reader's fixes speak of files in folders; an upload needs an upload's fix.
        too_big = "pixels" in error.problem or "too large" in error.problem
        fix = error.fix if too_big else UPLOAD_FIX
        raise _error(422, f"{error.path}: {error.problem}. {fix}") from error


async def _form_files(request: Request, field: str, max_files: int) -> list[UploadFile]:
    """The files sent in multipart ``field``; 400/422 with the fix when there are none."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise _error(
            415,
            f"Send the image as multipart/form-data in a field named {field!r} "
            f"(got content type {content_type or 'none'!r})",
        )
    form = await request.form(max_files=max_files)
    files = [value for value in form.getlist(field) if isinstance(value, UploadFile)]
    if not files:
        raise _error(422, f"No file in the form field {field!r}. Attach an image there")
    return files


def _overlay_data_url(image: Image.Image, heatmap: Any, boxes: list[Any]) -> str:
    """The heatmap blended over ``image`` with the boxes drawn, as a PNG ``data:`` URL."""
    overlay = overlay_heatmap(image, np.asarray(heatmap, dtype=np.float64), boxes=boxes or None)
    scale = OVERLAY_MAX_SIDE / max(overlay.size)
    if scale < 1:
        size = (max(1, round(overlay.width * scale)), max(1, round(overlay.height * scale)))
        overlay = overlay.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_safe(value: Any) -> Any:
    """numpy values and non-finite floats turned into plain JSON (infinities become null)."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _types_payload(types: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [
        {
            "name": type_name,
            "examples": [
                {
                    "name": example,
                    "url": f"/api/examples/{quote(type_name, safe='')}/{quote(example, safe='')}",
                }
                for example in examples
            ],
        }
        for type_name, examples in sorted(types.items())
    ]


def create_app(
    model_dir: Path,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    classify_workers: int = 2,
) -> FastAPI:
    """Build the web application around the model saved in ``model_dir``.

    Args:
        model_dir: A folder written by ``DefectModel.save``; changes are saved back into it.
        max_upload_bytes: Largest accepted image upload; bigger ones get 413.
        classify_workers: How many classifications run at the same time; more wait their
            turn. Each uses torch's intra-op threads, so workers times threads should not
            exceed the cores.

    Returns:
        The FastAPI application, ready for uvicorn or a test client.

    Raises:
        ModelError: The folder holds no usable model, or its backbone weights are missing.

    Example:
        >>> app = create_app(Path("runs/model"))  # doctest: +SKIP
        >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
    """
    if max_upload_bytes < 1:
        msg = f"max_upload_bytes must be positive, got {max_upload_bytes}"
        raise ValueError(msg)
    if classify_workers < 1:
        msg = f"classify_workers must be at least 1, got {classify_workers}"
        raise ValueError(msg)
    store = ModelStore(Path(model_dir))
    classify_slots = anyio.CapacityLimiter(classify_workers)

    app = FastAPI(
        title="PatchProto",
        description="Few-shot classification of industrial defects",
        version=__version__,
    )
    app.add_middleware(
        UploadLimitMiddleware, max_upload_bytes=max_upload_bytes, max_files=MAX_FILES_PER_UPLOAD
    )
    app.state.store = store
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def read(action: Callable[[DefectModel], T]) -> T:
        # Off the event loop: a change in progress holds the lock for seconds.
        return await anyio.to_thread.run_sync(store.read, action)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        types = await read(lambda model: model.types())
        return {
            "status": "ok",
            "model": str(store.folder),
            "types": len(types),
            "examples": sum(len(names) for names in types.values()),
            "max_upload_bytes": max_upload_bytes,
        }

    @app.post("/api/classify")
    async def classify(request: Request) -> dict[str, Any]:
        upload = (await _form_files(request, "file", max_files=1))[0]
        data = await _read_upload(upload, max_upload_bytes)

        def work() -> dict[str, Any]:
            image = _decode(data, upload)
            name = upload.filename or "upload"
            classification = store.read(lambda model: model.classify(image, name=name))
            return _classification_payload(classification, image, upload.filename)

        return await anyio.to_thread.run_sync(work, limiter=classify_slots)

    @app.get("/api/types")
    async def list_types() -> dict[str, Any]:
        return {"types": _types_payload(await read(lambda model: model.types()))}

    @app.get("/api/examples/{type_name}/{example}")
    async def example_image(
        type_name: str,
        example: str,
        thumbnail: int | None = Query(None, ge=16, le=THUMBNAIL_MAX_SIDE),
    ) -> Response:
        def fetch(model: DefectModel) -> bytes:
            _check_example(model.types(), type_name, example)
            return model.example_image(type_name, example)

        data = await read(fetch)
        headers = {"Cache-Control": "no-cache"}
        if thumbnail is None:
            return Response(data, media_type=_media_type(data), headers=headers)
        small = await anyio.to_thread.run_sync(_thumbnail, data, example, thumbnail)
        return Response(small, media_type="image/png", headers=headers)

    @app.post("/api/types/{type_name}/examples")
    async def add_examples(type_name: str, request: Request) -> dict[str, Any]:
        _check_same_origin(request)
        uploads = await _form_files(request, "files", max_files=MAX_FILES_PER_UPLOAD)
        examples: list[tuple[str, bytes]] = []
        for index, upload in enumerate(uploads):
            data = await _read_upload(upload, max_upload_bytes)
            name = _example_name(upload, index)
            if name in (taken for taken, _ in examples):
                raise _error(422, f"Two uploads are named {name!r}. Rename one and try again")
            examples.append((name, data))

        def check(model: DefectModel) -> None:
            clashes = sorted({name for name, _ in examples} & set(model.types().get(type_name, [])))
            if clashes:
                raise _error(
                    409,
                    f"Type {type_name!r} already has an example named {_listing(clashes)}. "
                    "Rename the file, or remove the old example first",
                )

        def apply(model: DefectModel) -> dict[str, list[str]]:
            model.add_examples(type_name, examples)
            return model.types()

        def work() -> dict[str, list[str]]:
            # Every upload must decode before the model is touched.
            for (_, data), upload in zip(examples, uploads, strict=True):
                _decode(data, upload)
            return _run_change(store, apply, check)

        types = await anyio.to_thread.run_sync(work)
        added = [name for name, _ in examples]
        logger.info("added %s to type %r", ", ".join(added), type_name)
        return {"type": type_name, "added": added, "types": _types_payload(types)}

    @app.delete("/api/types/{type_name}/examples/{example}")
    async def remove_example(type_name: str, example: str, request: Request) -> dict[str, Any]:
        _check_same_origin(request)

        def check(model: DefectModel) -> None:
            _check_example(model.types(), type_name, example)

        def apply(model: DefectModel) -> dict[str, list[str]]:
            model.remove_example(type_name, example)
            return model.types()

        types = await anyio.to_thread.run_sync(_run_change, store, apply, check)
        logger.info("removed %r from type %r", example, type_name)
        return {"type": type_name, "removed": example, "types": _types_payload(types)}

    return app


def _classification_payload(
    classification: Classification, image: Image.Image, filename: str | None
) -> dict[str, Any]:
    """The classification as JSON, with its heatmap drawn over the image as a PNG data URL."""
    payload = _json_safe(classification.to_dict())
    payload["filename"] = filename or ""
    boxes = [tuple(patch.box) for patch in classification.deciding_patches]
    payload["overlay"] = _overlay_data_url(image, classification.heatmap, boxes)
    return payload


def _thumbnail(data: bytes, example: str, side: int) -> bytes:
    """A PNG of an example image at most ``side`` pixels wide and high."""
    image = load_image(data, name=f"example {example!r}")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _run_change(
    store: ModelStore,
    apply: Callable[[DefectModel], T],
    check: Callable[[DefectModel], None] | None = None,
) -> T:
    """``store.change(apply, check)``, the model's own refusals turned into 422 responses."""
    try:
        return store.change(apply, check)
    except ModelError as error:
        raise _error(422, str(error)) from error
    except OSError as error:
        logger.exception("could not save the model to %s", store.folder)
        message = (
            f"Could not save the model to {store.folder} ({error}); the change was not made. "
            "Check the disk space and permissions of that folder, then try again"
        )
        raise _error(500, message) from error


def _media_type(data: bytes) -> str:
    """The MIME type of image bytes, from their content rather than a name."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (OSError, ValueError):
        return "application/octet-stream"


def serve_command(
    model: Path = typer.Argument(..., help="Model folder written by `patchproto fit`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted image upload, in MB."),
    threads: int = typer.Option(
        0, help="Torch threads per classification (0: half the cores, at most 4)."
    ),
    workers: int = typer.Option(
        0, help="Classifications run at once (0: cores / threads, at least 2)."
    ),
) -> None:
    """Serve the model: a web page and a JSON API to classify images and edit examples."""
    import torch
    import uvicorn

    from patchproto.cli import fail

    if not max_upload_mb > 0:
        raise fail(f"--max-upload-mb {max_upload_mb} must be positive, for example 20")
    if threads < 0 or workers < 0:
        raise fail("--threads and --workers must be positive, or 0 to choose from the cores")
    cores = os.cpu_count() or 1
    threads = threads or max(1, min(4, cores // 2))
    workers = workers or max(2, cores // threads)
    torch.set_num_threads(threads)
    try:
        app = create_app(
            model, max_upload_bytes=int(max_upload_mb * 1024 * 1024), classify_workers=workers
        )
    except (ModelError, WeightsError, OSError) as error:
        raise fail(str(error)) from error
    if host not in ("127.0.0.1", "localhost", "::1"):
        # NOTE: the service has no accounts or passwords: anyone who can reach the port can
        # classify images and add or remove examples. Serve beyond this machine only on a
        # trusted network, or behind a proxy that authenticates.
        logger.warning("serving on %s: anyone who reaches it can change the model", host)
    logger.info(
        "serving %s on http://%s:%d (%d workers x %d torch threads)",
        model,
        host,
        port,
        workers,
        threads,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
