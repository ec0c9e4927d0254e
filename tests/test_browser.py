"""The web page end to end: the real server on a small fitted model, driven by headless Chromium.

Needs Debian's ``chromium`` package (or ``$PATCHPROTO_CHROMIUM`` naming a Chromium binary) and
the ``playwright`` Python package; Playwright's own browser download is never used. The test
skips, saying which is missing, when either is absent.

Screenshots go to the test's tmp folder; a copy of the desktop one is kept at
``/tmp/patchproto_page.png`` (and the phone-width one at ``/tmp/patchproto_page_phone.png``)
for people to look at.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchproto.model import DefectModel
from patchproto.service import create_app
from patchproto.synthetic import SyntheticSet, write_synthetic_set

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_COPY = Path("/tmp/patchproto_page.png")
PHONE_SCREENSHOT_COPY = Path("/tmp/patchproto_page_phone.png")
# Generous: two cores shared with other work can make one classification take seconds.
STEP_TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    """``$PATCHPROTO_CHROMIUM``, else a ``chromium`` on the PATH or in /usr/bin."""
    configured = os.environ.get("PATCHPROTO_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).is_file()), None
    )


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "no Chromium binary found (install Debian's `chromium` package, or set "
            "PATCHPROTO_CHROMIUM to a Chromium executable)"
        )
    pytest.importorskip(
        "playwright.sync_api", reason="install the test extra: pip install playwright"
    )
    return executable


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSet]:
    root = tmp_path_factory.mktemp("browser")
    data = write_synthetic_set(
        root / "data", normal=6, support=2, queries=1, size=128, types=("scratch", "spot")
    )
    model = DefectModel.fit(
        data.normal_dir, data.defects_dir, backbone="efficientnet_lite0", image_size=128, holdout=2
    )
    return model.save(root / "model"), data


@pytest.fixture
def server(fitted: tuple[Path, SyntheticSet]) -> Iterator[str]:
    """The real uvicorn server in a thread on a free port; yields its base URL."""
    import uvicorn

    app = create_app(fitted[0])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def test_page_classifies_an_upload_and_edits_examples(
    chromium: str, server: str, fitted: tuple[Path, SyntheticSet], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    model_dir, data = fitted
    query = data.queries["scratch"][0]
    expected = DefectModel.load(model_dir).classify(query)
    problems: list[str] = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console: {message.text}") if message.type == "error" else None
                ),
            )
            page.on(
                "response",
                lambda response: (
                    problems.append(f"HTTP {response.status}: {response.url}")
                    if response.status >= 400
                    else None
                ),
            )
            page.goto(server)
            expect(page.locator("article.type")).to_have_count(2)
            expect(page.locator("#model-info")).to_contain_text("2 types, 4 examples")

            # Upload through the labelled file input; the ranking and heatmap appear.
            page.get_by_label("Choose an image").set_input_files(str(query))
            expect(page.locator("#predicted-type")).to_have_text(expected.predicted_type)
            expect(page.locator("#ranking li")).to_have_count(2)
            expect(page.locator("#ranking li").first).to_contain_text(expected.predicted_type)
            expect(page.locator("#anomaly-text")).to_contain_text("threshold")
            page.wait_for_function(
                "() => { const image = document.getElementById('overlay');"
                " return image.complete && image.naturalWidth > 0; }"
            )
            assert page.eval_on_selector("#overlay", "image => image.naturalWidth") == 128
            assert page.locator("#patches li").count() == len(expected.deciding_patches)

            # Add it as an example of a new type; the panel lists it with a thumbnail.
            page.get_by_label("Add this image as an example of type").fill("dent")
            page.get_by_role("button", name="Add as example").click()
            added = page.locator('article.type[data-type="dent"] li.example')
            expect(added).to_have_count(1)
            expect(added).to_contain_text(query.name)
            expect(page.locator("#status")).to_contain_text("Added")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.example img')]"
                ".every(image => image.complete && image.naturalWidth > 0)"
            )
            assert DefectModel.load(model_dir).types()["dent"] == [query.name]

            screenshot = tmp_path / "page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            shutil.copyfile(screenshot, SCREENSHOT_COPY)

            # On a phone-width screen nothing runs off the side.
            page.set_viewport_size({"width": 390, "height": 844})
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide on a 390 px screen"
            phone = tmp_path / "page-phone.png"
            page.screenshot(path=str(phone), full_page=True)
            shutil.copyfile(phone, PHONE_SCREENSHOT_COPY)
            page.set_viewport_size({"width": 1280, "height": 900})

            # Remove it again with its labelled button.
            page.get_by_role("button", name=f"Remove example {query.name} of dent").click()
            expect(page.locator('article.type[data-type="dent"]')).to_have_count(0)
            assert "dent" not in DefectModel.load(model_dir).types()

            # A dropped file is classified too.
            encoded = base64.b64encode(data.queries["spot"][0].read_bytes()).decode("ascii")
            transfer = page.evaluate_handle(
                """(encoded) => {
                    const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                    return transfer;
                }""",
                encoded,
            )
            page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
            expect(page.locator("#result-name")).to_have_text("dropped.png")
            expect(page.locator("#status")).to_contain_text("Classified dropped.png")

            # A file that is not an image gets the server's message, naming it.
            page.get_by_label("Choose an image").set_input_files(
                files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not pixels"}]
            )
            expect(page.locator("#error")).to_be_visible()
            expect(page.locator("#error")).to_contain_text("notes.txt")
        finally:
            browser.close()

    # The refused upload is the only failed request (the console reports it too).
    refused = f"HTTP 422: {server}/api/classify"
    assert refused in problems
    unexpected = [p for p in problems if p != refused and "status of 422" not in p]
    assert not unexpected, unexpected
