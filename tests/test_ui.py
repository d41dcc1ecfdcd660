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

    last = page.locator("#images li").nth(2)
    expect(last.locator(".thumb.waiting")).to_be_visible()
    expect(last.locator("button.reroll")).to_be_hidden()  # no "New seed" for an image that does not exist yet
    waiting_box = last.locator(".thumb.waiting").bounding_box()
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
    expect(last.locator("button.reroll")).to_be_visible()
    assert last.locator(".thumb").bounding_box() == waiting_box, "the image takes its placeholder's box: nothing moves"
    assert seen == sorted(seen) and len(set(seen)) >= 2, f"thumbnails arrive one by one: {seen}"
    assert progress == sorted(progress) and progress[0] < 3, f"the bar moves: {progress}"
    alts = page.locator("#images .variant img").evaluate_all("images => images.map(i => i.alt)")
    assert alts == PROMPTS, "each image's alt text is its prompt, in request order"
    shot(page, "ui-done.png")

    page.locator("#images .variant .thumb").nth(1).click()  # full size
    expect(page.locator("#viewer")).to_be_visible()
    assert page.locator("#viewer-image").evaluate("i => i.naturalWidth") == 1024
    expect(page.locator("#viewer-position")).to_have_text("2 of 3")
    page.keyboard.press("ArrowRight")  # the next image, from the keyboard
    expect(page.locator("#viewer-position")).to_have_text("3 of 3")
    expect(page.locator("#viewer-caption")).to_contain_text(PROMPTS[2])
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#viewer-caption")).to_contain_text(PROMPTS[0])
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
    assert all(name.endswith(".webp") for name in archive.namelist()[1:]) and len(archive.namelist()) == 5
    [variant] = manifest["variants"]  # the re-roll is the job's, beside its original, named after it
    assert variant["index"] == 1 and variant["prompt"] == PROMPTS[1] and variant["seed"] == int(seeds[1].split()[-1])
    assert variant["file"].startswith(manifest["images"][1]["file"].rsplit(".", 1)[0] + "_reroll-1_")
    assert variant["file"] in archive.namelist()

    page.goto(keyed.url + "/ui")  # the recent jobs of this key, from the server, with their first prompt
    expect(page.locator("#recent a").first).to_have_attribute("href", f"/ui?job={job_id}")
    expect(page.locator("#recent a").first).to_have_text(PROMPTS[0])
    expect(page.locator("#recent li").first).to_contain_text("3 image(s) · 1024x576 · webp 85")


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


PORTRAIT_PROMPTS = ["a lighthouse keeper, portrait", "a violinist on a rooftop"]


@pytest.mark.parametrize("width", [1280, 390])
def test_a_portrait_batch_fills_its_boxes_and_comes_back_whole_on_another_browser(
    browser: Browser, page: Page, keyed: ServerProcess, width: int
) -> None:
    """9:16 images in 9:16 boxes; a reload (and a link opened elsewhere) puts the job's own settings
    back into the form; a re-roll is the job's, so a second browser shows it too."""
    page.set_viewport_size({"width": width, "height": 900})
    sign_in(page, keyed)
    page.fill("#prompts", "\n".join(PORTRAIT_PROMPTS))
    page.fill("#per-prompt", "2")
    page.select_option("#size", "576x1024")
    page.select_option("#format", "jpeg")
    page.fill("#quality", "70")
    page.fill("#seed", "900")
    page.click("#generate")
    page.wait_for_url("**/ui?job=*")
    job_id = page.url.split("job=")[1]
    expect(page.locator("#images .variant img")).to_have_count(4, timeout=60_000)
    for box in page.locator("#images .thumb").all():
        shape = box.bounding_box()
        assert shape is not None and abs(shape["width"] / shape["height"] - 576 / 1024) < 0.02, f"a 9:16 box: {shape}"
    page.locator("#images li").nth(3).locator("button.reroll").click()
    expect(page.locator("#images li").nth(3).locator(".variant img")).to_have_count(2, timeout=30_000)
    shot(page, f"ui-portrait-{width}.png")

    page.reload()  # the form comes back from the server, not as the defaults
    expect(page.locator("#prompts")).to_have_value("\n".join(PORTRAIT_PROMPTS))
    expect(page.locator("#size")).to_have_value("576x1024")
    expect(page.locator("#format")).to_have_value("jpeg")
    expect(page.locator("#quality")).to_have_value("70")
    expect(page.locator("#seed")).to_have_value("900")
    expect(page.locator("#per-prompt")).to_have_value("2")
    if width < 600:  # on a phone the job comes first and the form waits, folded
        assert page.locator("#batch-details").evaluate("d => d.open") is False
        job_top = page.locator("#job-panel").bounding_box()["y"]  # type: ignore[index]
        assert job_top < page.locator("#batch-panel").bounding_box()["y"]  # type: ignore[index]
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, f"ui-portrait-reloaded-{width}.png")

    other = browser.new_context(viewport={"width": width, "height": 900})  # the phone, say
    try:
        elsewhere = other.new_page()
        elsewhere.on("pageerror", lambda error: pytest.fail(f"the page raised: {error}"))
        elsewhere.goto(f"{keyed.url}/ui?job={job_id}")
        elsewhere.fill("#key", KEY)
        elsewhere.click("#key-form button")
        expect(elsewhere.locator("#images li").nth(3).locator(".variant img")).to_have_count(2, timeout=30_000)
        expect(elsewhere.locator("#images li").nth(3).locator(".seed").nth(1)).to_contain_text("new seed")
        shot(elsewhere, f"ui-other-browser-{width}.png")
    finally:
        other.close()


def test_the_page_checks_counts_itself_and_errors_go_when_the_input_changes(page: Page, keyed: ServerProcess) -> None:
    sign_in(page, keyed)
    page.fill("#prompts", "\n".join(f"prompt {n}" for n in range(151)))
    expect(page.locator("#prompts-count")).to_have_text("151 prompt(s), 151 image(s)")
    page.click("#generate")
    expect(page.locator("#prompts-error")).to_have_text("151 prompts pasted; the limit is 150.")
    page.fill("#prompts", "\n".join(f"prompt {n}" for n in range(30)))
    expect(page.locator("#prompts-error")).to_be_empty()  # fixed: the error goes
    page.fill("#per-prompt", "6")
    page.click("#generate")
    expect(page.locator("#fields-error")).to_have_text("180 images asked for (30 prompts x 6); the limit is 150.")
    page.fill("#per-prompt", "5")
    expect(page.locator("#fields-error")).to_be_empty()
    page.fill("#per-prompt", "51")  # the server's own check still answers what the page does not know
    page.fill("#prompts", "one prompt")
    page.click("#generate")
    expect(page.locator("#fields-error")).to_contain_text("num_images_per_prompt")
    page.select_option("#size", "1024x1024")
    expect(page.locator("#fields-error")).to_be_empty()
