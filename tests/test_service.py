"""The web service end to end through FastAPI's test client, on a small model fitted here.

The model is fitted once per module from the seeded synthetic set (two defect types, 128 px
images, ``efficientnet_lite0`` with its packaged weights). Tests that change the model get a
fresh copy of its folder and their own app; tests that must change nothing share one app and
check, byte for byte, that its folder is unchanged afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from patchproto.cli import app as cli_app
from patchproto.model import DefectModel
from patchproto.service import MAX_FILES_PER_UPLOAD, ReadWriteLock, create_app
from patchproto.synthetic import SyntheticSet, write_synthetic_set

TYPES = ("scratch", "spot")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSet]:
    """A model folder fitted from the synthetic set, and the set (never modify either)."""
    root = tmp_path_factory.mktemp("service")
    data = write_synthetic_set(root / "data", normal=6, support=2, queries=2, size=128, types=TYPES)
    model = DefectModel.fit(
        data.normal_dir, data.defects_dir, backbone="efficientnet_lite0", image_size=128, holdout=2
    )
    return model.save(root / "model"), data


@pytest.fixture
def model_dir(fitted: tuple[Path, SyntheticSet], tmp_path: Path) -> Path:
    """A private copy of the fitted model folder."""
    return Path(shutil.copytree(fitted[0], tmp_path / "model"))


@pytest.fixture
def data(fitted: tuple[Path, SyntheticSet]) -> SyntheticSet:
    return fitted[1]


@pytest.fixture
def client(model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(model_dir)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def shared_dir(fitted: tuple[Path, SyntheticSet], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fitted model shared by the tests that must leave it unchanged."""
    return Path(shutil.copytree(fitted[0], tmp_path_factory.mktemp("shared") / "model"))


@pytest.fixture(scope="module")
def shared_client(shared_dir: Path) -> Iterator[TestClient]:
    """A client of the app on ``shared_dir``; tests using it check that the folder is unchanged."""
    with TestClient(create_app(shared_dir)) as test_client:
        yield test_client


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def png_bytes(size: tuple[int, int] = (40, 30), colour: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (colour, colour, colour)).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def classify(client: TestClient, path: Path) -> dict:
    response = client.post("/api/classify", files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


def test_page_static_files_and_health(shared_client: TestClient) -> None:
    page = shared_client.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert shared_client.get(asset).status_code == 200, asset

    health = shared_client.get("/api/health").json()
    assert health["status"] == "ok"
    assert (health["types"], health["examples"]) == (2, 4)


def test_classify_returns_ranking_scores_patches_and_overlay(
    shared_client: TestClient, shared_dir: Path, data: SyntheticSet
) -> None:
    before = snapshot(shared_dir)
    query = data.queries["scratch"][0]
    result = classify(shared_client, query)

    expected = DefectModel.load(shared_dir).classify(query)
    assert result["predicted_type"] == expected.predicted_type
    assert [entry["type"] for entry in result["ranking"]] == [e.type for e in expected.ranking]
    for got, want in zip(result["ranking"], expected.ranking, strict=True):
        assert got["distance"] == pytest.approx(want.distance, abs=1e-5)
    assert sum(entry["confidence"] for entry in result["ranking"]) == pytest.approx(1.0)
    assert result["threshold"] == pytest.approx(expected.threshold)
    assert result["anomaly_score"] == pytest.approx(expected.anomaly_score, rel=1e-5)
    assert result["is_anomalous"] == expected.is_anomalous
    assert result["filename"] == query.name

    assert result["deciding_patches"], "a defect image must have deciding patches"
    for patch in result["deciding_patches"]:
        x0, y0, x1, y1 = patch["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128

    prefix = "data:image/png;base64,"
    assert result["overlay"].startswith(prefix)
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay"][len(prefix) :])))
    assert overlay.format == "PNG" and overlay.size == (128, 128)
    assert "heatmap" not in result
    assert snapshot(shared_dir) == before


def test_types_and_example_images(shared_client: TestClient, shared_dir: Path) -> None:
    listed = shared_client.get("/api/types").json()["types"]
    assert [entry["name"] for entry in listed] == list(TYPES)
    model = DefectModel.load(shared_dir)
    assert {entry["name"]: [e["name"] for e in entry["examples"]] for entry in listed} == (
        model.types()
    )

    example = listed[0]["examples"][0]
    image = shared_client.get(example["url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.content == model.example_image(listed[0]["name"], example["name"])

    thumbnail = shared_client.get(example["url"], params={"thumbnail": 32})
    assert thumbnail.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 32


def test_added_examples_are_on_disk_and_used(
    client: TestClient, model_dir: Path, data: SyntheticSet
) -> None:
    query = data.queries["spot"][1]
    response = client.post(
        "/api/types/spot/examples",
        files=[("files", ("new spot.png", query.read_bytes()))],
    )
    assert response.status_code == 200, response.text
    assert response.json()["added"] == ["new spot.png"]

    reloaded = DefectModel.load(model_dir)
    assert "new spot.png" in reloaded.types()["spot"]
    assert reloaded.example_image("spot", "new spot.png") == query.read_bytes()

    # A new type is created by its first examples, several in one request.
    two = [data.queries["scratch"][1], data.queries["spot"][0]]
    response = client.post(
        "/api/types/dent/examples",
        files=[("files", (path.name, path.read_bytes())) for path in two],
    )
    assert response.status_code == 200, response.text
    assert DefectModel.load(model_dir).types()["dent"] == [path.name for path in two]
    listed = [entry["name"] for entry in client.get("/api/types").json()["types"]]
    assert listed == ["dent", "scratch", "spot"]

    # The running app classifies with the changed model.
    result = classify(client, data.queries["scratch"][1])
    assert {entry["type"] for entry in result["ranking"]} == {"dent", "scratch", "spot"}


def test_a_change_keeps_what_another_process_saved_meanwhile(
    client: TestClient, model_dir: Path, data: SyntheticSet
) -> None:
    # `patchproto add-example` edits the folder while the service runs.
    cli = CliRunner().invoke(
        cli_app,
        ["add-example", str(model_dir), "--type", "dent", str(data.queries["spot"][0])],
    )
    assert cli.exit_code == 0, cli.output
    response = client.post(
        "/api/types/spot/examples",
        files=[("files", ("new spot.png", data.queries["spot"][1].read_bytes()))],
    )
    assert response.status_code == 200, response.text
    saved = DefectModel.load(model_dir).types()
    assert saved["dent"] == [data.queries["spot"][0].name]
    assert "new spot.png" in saved["spot"]
    listed = [entry["name"] for entry in response.json()["types"]]
    assert listed == ["dent", "scratch", "spot"]


def test_removed_examples_are_gone_from_disk(client: TestClient, model_dir: Path) -> None:
    response = client.delete("/api/types/scratch/examples/scratch_s00.png")
    assert response.status_code == 200, response.text
    assert DefectModel.load(model_dir).types()["scratch"] == ["scratch_s01.png"]

    # Removing a type's last example removes the type.
    assert client.delete("/api/types/scratch/examples/scratch_s01.png").status_code == 200
    assert list(DefectModel.load(model_dir).types()) == ["spot"]
    assert [entry["name"] for entry in client.get("/api/types").json()["types"]] == ["spot"]

    # The model's very last example stays; the refusal says why and changes nothing.
    assert client.delete("/api/types/spot/examples/spot_s00.png").status_code == 200
    before = snapshot(model_dir)
    refused = client.delete("/api/types/spot/examples/spot_s01.png")
    assert refused.status_code == 422
    assert "last example" in refused.json()["detail"]
    assert snapshot(model_dir) == before


def test_unknown_type_or_example_is_404_listing_what_exists(
    shared_client: TestClient, shared_dir: Path
) -> None:
    before = snapshot(shared_dir)

    missing_type = shared_client.get("/api/examples/dent/a.png")
    assert missing_type.status_code == 404
    detail = missing_type.json()["detail"]
    assert "'dent'" in detail and "'scratch'" in detail and "'spot'" in detail

    missing_example = shared_client.delete("/api/types/spot/examples/nothing.png")
    assert missing_example.status_code == 404
    detail = missing_example.json()["detail"]
    assert "'nothing.png'" in detail and "'spot_s00.png'" in detail and "'spot_s01.png'" in detail

    assert shared_client.delete("/api/types/dent/examples/a.png").status_code == 404
    assert snapshot(shared_dir) == before


def test_oversize_uploads_are_413_and_change_nothing(model_dir: Path, data: SyntheticSet) -> None:
    limit = 20_000
    query = data.queries["scratch"][0].read_bytes()
    assert len(query) > limit, "the test needs a query image over the limit"
    before = snapshot(model_dir)
    with TestClient(create_app(model_dir, max_upload_bytes=limit)) as client:
        # Refused from the declared length alone, for classification and for examples.
        too_big = b"\x00" * (MAX_FILES_PER_UPLOAD * limit + 100_000)
        for url in ("/api/classify", "/api/types/spot/examples"):
            field = "file" if url.endswith("classify") else "files"
            response = client.post(url, files={field: ("big.png", too_big)})
            assert response.status_code == 413, url
            assert "20 KB" in response.json()["detail"], response.json()

        # One file over the per-image cap, in a request small enough to be read.
        response = client.post("/api/classify", files={"file": ("query.png", query)})
        assert response.status_code == 413
        detail = response.json()["detail"]
        assert "'query.png'" in detail and "20 KB" in detail and "--max-upload-mb" in detail
        response = client.post("/api/types/spot/examples", files={"files": ("query.png", query)})
        assert response.status_code == 413

        # A chunked body (no Content-Length) is counted as it arrives.
        boundary = "patchprotoboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()

        def chunks() -> Iterator[bytes]:
            yield head
            for _ in range(20):
                yield b"\x00" * 10_000
            yield f"\r\n--{boundary}--\r\n".encode()

        response = client.post(
            "/api/classify",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 413
        assert "20 KB" in response.json()["detail"]

        # Small images still pass.
        small = client.post("/api/classify", files={"file": ("small.png", png_bytes())})
        assert small.status_code == 200, small.text
    assert snapshot(model_dir) == before


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        ("notes.txt", b"these are not pixels", "not an image"),
        ("empty.png", b"", "empty"),
        ("cut.png", png_bytes((64, 64))[:60], "corrupt"),
        ("huge.png", huge_png_header(9000, 8000), "pixels"),
    ],
    ids=["text", "empty", "truncated", "too-many-pixels"],
)
def test_unusable_uploads_are_422_naming_upload_and_fix(
    shared_client: TestClient, shared_dir: Path, filename: str, content: bytes, problem: str
) -> None:
    before = snapshot(shared_dir)
    for url, field in (("/api/classify", "file"), ("/api/types/spot/examples", "files")):
        response = shared_client.post(url, files={field: (filename, content)})
        assert response.status_code == 422, (url, response.text)
        detail = response.json()["detail"]
        assert repr(filename) in detail and problem in detail
        assert "Upload" in detail or "Downscale" in detail, detail

    # One bad image among good ones: nothing is added.
    good = ("fine.png", png_bytes())
    response = shared_client.post(
        "/api/types/spot/examples", files=[("files", good), ("files", (filename, content))]
    )
    assert response.status_code == 422
    assert snapshot(shared_dir) == before
    assert "fine.png" not in shared_client.get("/api/types").text


def test_malformed_requests_explain_themselves(shared_client: TestClient, shared_dir: Path) -> None:
    before = snapshot(shared_dir)
    not_multipart = shared_client.post("/api/classify", json={"file": "x"})
    assert not_multipart.status_code == 415
    assert "multipart/form-data" in not_multipart.json()["detail"]

    no_file = shared_client.post("/api/classify", files={"image": ("a.png", png_bytes())})
    assert no_file.status_code == 422
    assert "'file'" in no_file.json()["detail"]

    duplicate = shared_client.post(
        "/api/types/spot/examples", files={"files": ("spot_s00.png", png_bytes())}
    )
    assert duplicate.status_code == 409
    assert "spot_s00.png" in duplicate.json()["detail"]

    cross_site = shared_client.post(
        "/api/types/spot/examples",
        files={"files": ("a.png", png_bytes())},
        headers={"Origin": "https://elsewhere.example"},
    )
    assert cross_site.status_code == 403
    assert "other sites" in cross_site.json()["detail"]
    cross_site = shared_client.delete(
        "/api/types/spot/examples/spot_s00.png", headers={"Origin": "https://elsewhere.example"}
    )
    assert cross_site.status_code == 403

    bad_name = shared_client.post(
        "/api/types/%20/examples", files={"files": ("a.png", png_bytes())}
    )
    assert bad_name.status_code == 422
    assert "type name" in bad_name.json()["detail"]
    assert snapshot(shared_dir) == before


def test_failed_save_keeps_folder_and_memory_unchanged(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(model_dir)

    def broken_save(self: DefectModel, folder: Path) -> Path:
        raise OSError(28, "No space left on device")

    with TestClient(create_app(model_dir), raise_server_exceptions=False) as client:
        monkeypatch.setattr(DefectModel, "save", broken_save)
        response = client.post("/api/types/spot/examples", files={"files": ("a.png", png_bytes())})
        assert response.status_code == 500
        assert "No space left" in response.json()["detail"]
        assert "a.png" not in client.get("/api/types").text
    assert snapshot(model_dir) == before


def test_concurrent_classifications_all_succeed_and_agree(
    model_dir: Path, data: SyntheticSet
) -> None:
    queries = [data.queries[t][i] for t in TYPES for i in range(2)]
    with TestClient(create_app(model_dir, classify_workers=3)) as client:
        expected = {path: classify(client, path) for path in queries}
        results: list[tuple[Path, int, dict]] = []
        errors: list[BaseException] = []

        def worker(index: int) -> None:
            path = queries[index % len(queries)]
            try:
                response = client.post(
                    "/api/classify", files={"file": (path.name, path.read_bytes())}
                )
                results.append((path, response.status_code, response.json()))
            except BaseException as error:  # reported below, not lost in the thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert not errors
    assert len(results) == 8
    for path, status, body in results:
        assert status == 200, body
        want = expected[path]
        assert body["predicted_type"] == want["predicted_type"]
        assert [e["distance"] for e in body["ranking"]] == pytest.approx(
            [e["distance"] for e in want["ranking"]], abs=1e-5
        )


def test_classifications_during_changes_see_a_whole_model(
    model_dir: Path, data: SyntheticSet
) -> None:
    query = data.queries["scratch"][0]
    with TestClient(create_app(model_dir, classify_workers=2)) as client:
        statuses: list[int] = []
        rankings: list[set[str]] = []

        def classify_many() -> None:
            for _ in range(3):
                response = client.post(
                    "/api/classify", files={"file": (query.name, query.read_bytes())}
                )
                statuses.append(response.status_code)
                if response.status_code == 200:
                    rankings.append({entry["type"] for entry in response.json()["ranking"]})

        readers = [threading.Thread(target=classify_many) for _ in range(2)]
        for reader in readers:
            reader.start()
        added = client.post(
            "/api/types/dent/examples",
            files={"files": ("d.png", data.queries["spot"][0].read_bytes())},
        )
        removed = client.delete("/api/types/dent/examples/d.png")
        for reader in readers:
            reader.join()

    assert (added.status_code, removed.status_code) == (200, 200)
    assert statuses == [200] * 6
    assert all(types in ({"scratch", "spot"}, {"dent", "scratch", "spot"}) for types in rankings)
    assert list(DefectModel.load(model_dir).types()) == list(TYPES)


def test_read_write_lock_excludes_writers_from_readers() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    reading = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with lock.reading():
            events.append("read start")
            reading.set()
            release.wait(timeout=10)
            events.append("read end")

    def writer() -> None:
        with lock.writing():
            events.append("write")

    first = threading.Thread(target=reader)
    first.start()
    reading.wait(timeout=10)
    second = threading.Thread(target=writer)
    second.start()
    # The writer is blocked until the reader leaves, however long that takes.
    second.join(timeout=0.2)
    assert second.is_alive()
    release.set()
    first.join()
    second.join()
    assert events == ["read start", "read end", "write"]


def test_serve_command_refuses_a_missing_model_or_bad_limits(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["serve", str(tmp_path / "nothing")])
    assert missing.exit_code == 2
    assert "no such model folder" in missing.output

    (tmp_path / "model").mkdir()
    zero = runner.invoke(cli_app, ["serve", str(tmp_path / "model"), "--max-upload-mb", "0"])
    assert zero.exit_code == 2
    assert "--max-upload-mb" in zero.output
