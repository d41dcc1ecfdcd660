"""The reference description's client examples, copied verbatim, run against a live server.

They hard-code http://localhost:8000, so they run against ``reference_server`` (tests/conftest.py) on that port;
if something else holds the port, they skip.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page

from tests.conftest import REFERENCE_PORT
from tests.test_browser import RESPONSE_TIMEOUT_MS, _screenshot, browser, chromium_path, page  # noqa: F401 - fixtures
from tests.server_process import ServerProcess

CLIENTS = Path(__file__).parent / "reference_clients"


def test_python_requests_example_saves_pngs(reference_server: ServerProcess, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(CLIENTS / "python_requests.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Saved output_0.png" in result.stdout
    with Image.open(tmp_path / "output_0.png") as image:
        assert image.size == (1024, 576)
        assert image.format == "PNG"


def test_curl_example_prints_the_json_with_a_png(reference_server: ServerProcess) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian: apt-get install -y curl)")
    result = subprocess.run(["bash", str(CLIENTS / "curl.sh")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["success"] is True
    assert body["count"] == 1 and body["message"] == "Successfully generated 1 image(s)"
    with Image.open(BytesIO(base64.b64decode(body["images"][0]))) as image:
        assert (image.format, image.size) == ("PNG", (1024, 576))


def test_javascript_fetch_example_appends_an_img_per_image(reference_server: ServerProcess) -> None:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: the fetch example needs Node 18 or later")
    result = subprocess.run(["node", str(CLIENTS / "run_fetch.mjs")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    appended = json.loads(result.stdout.strip().splitlines()[-1])["images"]
    assert [(img["tag"], img["width"], img["height"]) for img in appended] == [("IMG", 1024, 576)]


def test_reference_fetch_example_renders_its_image_in_a_real_page(reference_server: ServerProcess, page: Page) -> None:
    """fetch.js, verbatim, as a <script> in a page of the server's own origin: the example calls
    http://localhost:8000 with a JSON body, which from any other origin would need CORS."""
    page.goto(f"http://localhost:{REFERENCE_PORT}/docs")
    page.add_script_tag(content=(CLIENTS / "fetch.js").read_text())
    image = page.locator("body > img[src^='data:image/png;base64,']")
    image.wait_for(timeout=RESPONSE_TIMEOUT_MS)
    image.evaluate("img => img.decode()")
    image.scroll_into_view_if_needed()
    _screenshot(page, "reference-fetch-example.png")
    assert image.count() == 1
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1024, 576]
