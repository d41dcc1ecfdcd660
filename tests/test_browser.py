"""The docs page as a person uses it: Debian's Chromium, headless, driven by Playwright.

It opens /docs on the session's tiny-model server, checks that every route of the OpenAPI spec and
every field and status code of ``POST /generate`` is on the page, clicks "Try it out" and "Execute"
on ``/generate``, and reads the 200 response out of the page. It also runs the reference fetch
example in a real page. Screenshots go to ``test-output/browser/`` (ignored by git) for a person or
CI to look at.

Playwright drives the system's Chromium (``executable_path``): a browser download is not possible
here. Chromium comes from Debian's package ``chromium``: ``.ci/run`` installs it, and so does the
session start of the suite (tests/conftest.py) when it is missing and the tests run as root; only
where neither is possible does it skip.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.debian_packages import PROBLEMS
from tests.server_process import REPO, ServerProcess

SCREENSHOTS = REPO / "test-output" / "browser"
CLIENTS = Path(__file__).parent / "reference_clients"
# What this machine's closed network needs (without the background-networking flags Chromium's own
# connections are refused many at a time). Playwright adds --headless and a fresh --user-data-dir.
CHROMIUM_FLAGS = [
    "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RESPONSE_TIMEOUT_MS = 120_000


def _find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    found = _find_chromium()
    if found is None:
        pytest.skip(PROBLEMS.get("chromium", "Chromium is not installed"))
    return found


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    yield context.new_page()
    context.close()


def _screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def _png_size(image: str, as_url: bool) -> tuple[str | None, tuple[int, int]]:
    data = requests.get(image, timeout=30).content if as_url else base64.b64decode(image)
    with Image.open(BytesIO(data)) as png:
        return png.format, png.size


def _generate_operation(page: Page, url: str) -> Locator:
    """The /generate block of the docs page, opened."""
    page.goto(url + "/docs")
    operation = page.locator(".opblock-post:has(.opblock-summary-path[data-path='/generate'])")
    operation.locator(".opblock-summary").click()
    return operation


def _execute(operation: Locator, status: str) -> str:
    """Click Execute, wait until the live response shows ``status``; its body text."""
    operation.get_by_role("button", name="Execute").click()
    shown = operation.locator(".live-responses-table tbody .response-col_status")
    expect(shown).to_have_text(status, timeout=RESPONSE_TIMEOUT_MS)
    return operation.locator(".live-responses-table tbody .response-col_description pre").first.inner_text()


def test_docs_page_lists_every_route_and_field(server: ServerProcess, page: Page) -> None:
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    operation = _generate_operation(page, server.url)
    for path, operations in spec["paths"].items():
        for method in operations:
            shown = page.locator(f".opblock-{method} .opblock-summary-path[data-path='{path}']")
            assert shown.count() == 1, f"{method.upper()} {path} is in the spec but not on the page"
    operation.get_by_role("tab", name="Schema").first.click()
    names = operation.locator(".opblock-section-request-body .property-row > td:first-child").all_inner_texts()
    assert {name.rstrip("*").strip() for name in names} == set(spec["components"]["schemas"]["GenerateRequest"]["properties"])
    codes = {code.strip() for code in operation.locator(".responses-table tbody .response-col_status").all_inner_texts()}
    assert codes == set(spec["paths"]["/generate"]["post"]["responses"]) and {"200", "400", "500", "503"} <= codes


def test_try_it_out_on_generate_shows_the_200_response(server: ServerProcess, page: Page) -> None:
    operation = _generate_operation(page, server.url)
    operation.get_by_role("button", name="Try it out").click()
    example = json.loads(operation.locator("textarea.body-param__text").input_value())
    body = json.loads(_execute(operation, "200"))
    operation.locator(".live-responses-table").scroll_into_view_if_needed()
    screenshot = _screenshot(page, "docs-try-it-out-generate.png")

    expected = len(example["prompts"]) * example.get("num_images_per_prompt", 1)
    assert body["success"] is True and body["count"] == expected == len(body["images"])
    if "seed" in example:
        assert body["seeds"] == [example["seed"] + i for i in range(expected)]
    as_url = example.get("return_format") == "url"
    kind = example.get("format", "png").upper()  # the docs' example asks for WebP at quality 85
    assert {_png_size(image, as_url) for image in body["images"]} == {(kind, (1024, 576))}
    assert screenshot.stat().st_size > 10_000


def test_try_it_out_with_an_api_key_needs_authorize(start_server, page: Page) -> None:
    """A server on a tunnel has a key: the page says 401 until the key is given in "Authorize"."""
    keyed = start_server("--model", "tiny", "--workers", "1", "--api-key", "docs-page-key-0123456789")
    operation = _generate_operation(page, keyed.url)
    operation.get_by_role("button", name="Try it out").click()
    operation.locator("textarea.body-param__text").fill(json.dumps({"prompts": ["a key-holder's image"], "seed": 3}))
    assert "API key" in json.loads(_execute(operation, "401"))["detail"]

    page.get_by_role("button", name="Authorize").first.click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").first.fill("docs-page-key-0123456789")  # the first scheme: Authorization: Bearer
    dialog.locator("button.modal-btn.authorize").first.click()
    dialog.locator("button.btn-done").first.click()
    body = json.loads(_execute(operation, "200"))
    assert body["success"] is True and body["seeds"] == [3]
    assert "Authorization: Bearer docs-page-key-0123456789" in operation.locator(".curl-command").inner_text()


