"""The page of /ui as a person uses it: Debian's Chromium driven by Playwright, on a keyed server
whose shards each take a second (``tests.pipelines:paced_tiny``), so that images arrive one by
one. Screenshots go to ``test-output/browser/``."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.server_process import ServerProcess
from tests.test_browser import CHROMIUM_FLAGS, SCREENSHOTS, chromium_path  # noqa: F401 - the fixture

KEY = "ui-test-key-0123456789abcdef"
PROMPTS = ["a lighthouse at dusk", "a red fox in fresh snow", "a tram in the rain, night"]


@pytest.fixture(scope="module")
def keyed(start_server) -> ServerProcess:
    return start_server("--model", "tests.pipelines:paced_tiny", "--workers", "1", "--max-batch", "1", env={"SDXL_API_KEY": KEY})


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:  # noqa: F811
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, keyed: ServerProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.requested = []  # type: ignore[attr-defined]
    page.on("request", lambda request: page.requested.append(request.url))  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: pytest.fail(f"the page raised: {error}"))
    yield page
    assert all(url.startswith(keyed.url + "/") or url.startswith("blob:" + keyed.url) for url in page.requested), (
        "no request of the page leaves the server's origin"
    )
    context.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def thumbnails(page: Page) -> int:
    return page.locator("#images .variant img").count()


def sign_in(page: Page, keyed: ServerProcess) -> None:
    page.goto(keyed.url + "/ui")
    expect(page.locator("#key-panel")).to_be_visible()
    page.fill("#key", "not-the-key-at-all-000")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_have_text("The API key is not valid.")
    shot(page, "ui-key-prompt.png")
    page.fill("#key", KEY)
    page.click("#key-form button")
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#size option")).to_have_count(3)


def test_the_page_makes_a_batch_the_way_a_person_does(page: Page, keyed: ServerProcess) -> None:
    sign_in(page, keyed)

    page.click("#generate")  # nothing typed
    expect(page.locator("#prompts-error")).to_contain_text("Send between 1 and 150 prompts")

    page.fill("#prompts", "\n".join(PROMPTS) + "\n\n")
    page.select_option("#format", "webp")
    page.fill("#seed", "4242")
    page.click("#generate")
    page.wait_for_url("**/ui?job=*")
    job_id = page.url.split("job=")[1]
    expect(page.locator("#images li")).to_have_count(3)

    seen, progress = [], []
    deadline = time.monotonic() + 30
    while thumbnails(page) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen.append(thumbnails(page))
    progress.append(float(page.locator("#progress").get_attribute("value") or 0))
    shot(page, "ui-first-image.png")
    assert 1 <= seen[0] < 3, "the first image shows while the others are still being made"

    page.reload()  # the job id is in the URL: the page reattaches and shows what is done
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(page.locator("#images .variant img").first).to_be_visible()
    while thumbnails(page) < 3 and time.monotonic() < deadline:
        seen.append(thumbnails(page))
        progress.append(float(page.locator("#progress").get_attribute("value") or 0))
        time.sleep(0.2)
    assert thumbnails(page) == 3
    expect(page.locator("#progress-text")).to_contain_text("3 of 3 image(s): done")
    assert seen == sorted(seen) and len(set(seen)) >= 2, f"thumbnails arrive one by one: {seen}"
    assert progress == sorted(progress) and progress[0] < 3, f"the bar moves: {progress}"
    alts = page.locator("#images .variant img").evaluate_all("images => images.map(i => i.alt)")
    assert alts == PROMPTS, "each image's alt text is its prompt, in request order"
    shot(page, "ui-done.png")

    page.locator("#images .variant .thumb").nth(1).click()  # full size
    expect(page.locator("#viewer")).to_be_visible()
    assert page.locator("#viewer-image").evaluate("i => i.naturalWidth") == 1024
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()

    page.locator("#images li").nth(1).locator("button.reroll").click()  # a new seed for image 2
    second = page.locator("#images li").nth(1)
    expect(second.locator(".variant img")).to_have_count(2, timeout=30_000)
    seeds = second.locator(".seed").all_inner_texts()
    assert seeds[0] == "seed 4243" and seeds[1].startswith("new seed ") and seeds[1] != "new seed 4243"
    expect(second.locator(".variant a", has_text="Download")).to_have_count(2)
    shot(page, "ui-reroll.png")

    with page.expect_download() as download:
        page.click("#download")
    archive = zipfile.ZipFile(io.BytesIO(open(download.value.path(), "rb").read()))
    manifest = json.loads(archive.read("manifest.json"))
    assert [image["prompt"] for image in manifest["images"]] == PROMPTS
    assert all(name.endswith(".webp") for name in archive.namelist()[1:]) and len(archive.namelist()) == 4

    page.goto(keyed.url + "/ui")  # the recent jobs of this browser
    expect(page.locator("#recent a").first).to_have_attribute("href", f"/ui?job={job_id}")


def test_the_page_fits_a_phone_and_tells_api_errors(page: Page, keyed: ServerProcess) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, keyed)
    page.fill("#prompts", "x" * 2001)
    page.click("#generate")
    expect(page.locator("#prompts-error")).to_contain_text("the limit is 2000")
    page.fill("#prompts", "a boat")
    page.fill("#per-prompt", "51")
    page.click("#generate")
    expect(page.locator("#fields-error")).to_contain_text("num_images_per_prompt")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling at 390 px"
    page.focus("#prompts")
    for _ in range(12):  # the button is reachable with the keyboard
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "generate":
            break
    assert page.evaluate("document.activeElement.id") == "generate"
    shot(page, "ui-phone.png")
    headers = requests.get(keyed.url + "/ui", timeout=10).headers
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert requests.get(keyed.url + "/", timeout=10).json()["detail"]  # the API itself still needs the key
