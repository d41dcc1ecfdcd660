"""What people copy works: the reference description's client examples, verbatim, and this README's
own examples and statements, read from README.md (so they cannot drift), against live servers.

The examples call ``http://localhost:8000``; the tests replace that URL, and nothing else, with the
test server's (a free port: ``server`` from tests/conftest.py). What needs a key runs in this process
(aiohttp's test server over ``create_app`` with fake workers, ``make_client``), on a real loopback
socket that the examples' own interpreters (bash, Python, Node) connect to.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
import requests
from aiohttp.web_urldispatcher import StaticResource
from PIL import Image
from playwright.sync_api import Page

from client.cli import Progress, interrupted, parse_args
from gpu_workers.encoding import read_receipt
from tests.fake_transport import SLOW, FakeTransport
from tests.readme import readme_block, readme_paragraph
from tests.server_process import ServerProcess
from tests.test_browser import RESPONSE_TIMEOUT_MS, _screenshot, browser, chromium_path, page  # noqa: F401 - fixtures
from tests.test_http_inprocess import MakeClient, make_client  # noqa: F401 - fixture

CLIENTS = Path(__file__).parent / "reference_clients"
EXAMPLE_URL = "http://localhost:8000"
KEY = "readme-examples-key-0123456789abcdef"
SCREEN = (24, 80)  # lines, columns: a terminal's default
RUN_TIMEOUT = 120  # a hang guard for one example's process, not a speed limit


def pointed_at(code: str, url: str) -> str:
    """The example as written, with its one URL replaced by the test server's."""
    assert EXAMPLE_URL in code, f"the example no longer calls {EXAMPLE_URL}"
    return code.replace(EXAMPLE_URL, url.rstrip("/"))


def without_key() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "SDXL_API_KEY"}


def run_example(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env or without_key(), capture_output=True, text=True, timeout=RUN_TIMEOUT)


async def run_example_beside(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """``run_example`` for a server in this process: its loop must keep serving while the example runs."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _png_size(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(BytesIO(data)) as image:
        return image.format, image.size


def _prompt_of(code: str) -> str:
    """The first prompt an example sends (each example has one)."""
    return re.search(r"prompts\"?: \[\s*['\"]([^'\"]+)['\"]", code)[1]


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed: the README's examples use it")


# ----- the reference's examples, verbatim ---------------------------------------------------------


def test_reference_python_requests_example_saves_pngs(server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(pointed_at((CLIENTS / "python_requests.py").read_text(), server.url))
    result = run_example([sys.executable, "example.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Saved output_0.png" in result.stdout
    assert _png_size((tmp_path / "output_0.png").read_bytes()) == ("PNG", (1024, 576))


def test_reference_curl_example_prints_the_json_with_a_png(server: ServerProcess, tmp_path: Path) -> None:
    require("curl")
    (tmp_path / "curl.sh").write_text(pointed_at((CLIENTS / "curl.sh").read_text(), server.url))
    result = run_example(["bash", "curl.sh"], tmp_path)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["success"] is True
    assert body["count"] == 1 and body["message"] == "Successfully generated 1 image(s)"
    assert _png_size(base64.b64decode(body["images"][0])) == ("PNG", (1024, 576))


def test_reference_fetch_example_in_node_appends_an_img_per_image(server: ServerProcess, tmp_path: Path) -> None:
    require("node")
    result = run_example(["node", str(CLIENTS / "run_fetch.mjs"), server.url], tmp_path)
    assert result.returncode == 0, result.stderr
    appended = json.loads(result.stdout.strip().splitlines()[-1])["images"]
    assert [(img["tag"], img["width"], img["height"]) for img in appended] == [("IMG", 1024, 576)]


# ----- the README's examples, as written there -------------------------------------------------


def test_readme_first_curl_prints_less_than_a_screen_and_links_the_png(server: ServerProcess, tmp_path: Path) -> None:
    require("curl")
    code = readme_block("Then open <http://localhost:8000/docs>, or:", "bash")
    result = run_example(["bash", "-c", pointed_at(code, server.url)], tmp_path)
    assert result.returncode == 0, result.stderr
    lines, columns = SCREEN
    printed = result.stdout
    assert len(printed.splitlines()) < lines and len(printed) < lines * columns, f"{len(printed)} characters: {printed[:300]}"
    body = json.loads(printed)
    assert body["success"] is True and body["seeds"] == [42]
    image = requests.get(body["images"][0], timeout=30)
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
    assert _png_size(image.content) == ("PNG", (1024, 576))
    assert read_receipt(image.content)["prompt"] == _prompt_of(code)


def test_readme_python_example_saves_the_bytes_with_their_receipt(server: ServerProcess, tmp_path: Path) -> None:
    code = readme_block("Python (it saves the bytes as sent", "python")
    assert "PIL" not in code and "Image" not in code, "the example must not encode the image again"
    (tmp_path / "example.py").write_text(pointed_at(code, server.url))
    result = run_example([sys.executable, "example.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Saved output_0.png\n"
    saved = (tmp_path / "output_0.png").read_bytes()
    assert _png_size(saved) == ("PNG", (1024, 576))
    receipt = read_receipt(saved)
    assert receipt is not None, "the receipt did not survive the save"
    assert receipt["prompt"] == _prompt_of(code) and receipt["negative_prompt"] == "modern, photograph, cartoon, anime"


def test_readme_curl_example_writes_the_answer_to_a_file(server: ServerProcess, tmp_path: Path) -> None:
    require("curl")
    code = readme_block("cURL (the answer goes to `response.json`", "bash")
    result = run_example(["bash", "-c", pointed_at(code, server.url)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", "nothing but the transfer meter (on stderr) reaches the terminal"
    body = json.loads((tmp_path / "response.json").read_text())
    assert body["success"] is True and body["count"] == 1
    assert read_receipt(base64.b64decode(body["images"][0]))["prompt"] == _prompt_of(code)


def test_readme_node_example_saves_the_bytes_with_their_receipt(server: ServerProcess, tmp_path: Path) -> None:
    require("node")
    code = readme_block("Node 20 or later", "javascript")
    assert "document" not in code
    (tmp_path / "generate.mjs").write_text(pointed_at(code, server.url))
    result = run_example(["node", "generate.mjs"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Saved output_0.png\n"
    saved = (tmp_path / "output_0.png").read_bytes()
    assert _png_size(saved) == ("PNG", (1024, 576))
    assert read_receipt(saved)["prompt"] == _prompt_of(code)


def test_readme_browser_example_is_the_reference_one_and_says_it_is_for_a_browser() -> None:
    code = readme_block("JavaScript in a browser page", "javascript")
    first, _, rest = code.partition("\n")
    assert first.startswith("//") and "browser" in first and "Node" in first
    assert rest == (CLIENTS / "fetch.js").read_text(), "the rest is the reference's example, which the tests run verbatim"


# ----- on a keyed server: the examples' key, the Ctrl-C line, the open routes -----------------------


async def test_readme_python_and_node_examples_send_the_key_from_sdxl_api_key(make_client: MakeClient, tmp_path: Path) -> None:
    client, _ = await make_client(api_key=KEY)
    url = str(client.make_url("/"))
    examples = {"example.py": "Python (it saves the bytes as sent", "generate.mjs": "Node 20 or later"}
    interpreters = {"example.py": sys.executable, "generate.mjs": shutil.which("node")}
    for name, heading in examples.items():
        if interpreters[name] is None:
            continue  # no Node: its own test above skips and says so
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        language = "python" if name.endswith(".py") else "javascript"
        (folder / name).write_text(pointed_at(readme_block(heading, language), url))
        status, out, err = await run_example_beside([interpreters[name], name], folder, without_key())
        assert status != 0 and "HTTP 401: This server needs an API key" in err, (name, out, err)
        assert not (folder / "output_0.png").exists()
        status, out, err = await run_example_beside([interpreters[name], name], folder, {**without_key(), "SDXL_API_KEY": KEY})
        assert status == 0, (name, err)
        assert out == "Saved output_0.png\n" and (folder / "output_0.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


async def test_the_ctrl_c_stop_line_cancels_the_job_on_a_keyed_server_through_sdxl_api_key(
    make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("curl")
    client, _ = await make_client(FakeTransport(slow_seconds=120), api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    created = await client.post("/jobs", json={"prompts": [f"{SLOW} a ship in a storm"]}, headers=auth)
    assert created.status == 202, await created.text()
    job_id = (await created.json())["job_id"]
    monkeypatch.setenv("SDXL_API_KEY", KEY)  # as the run that printed the line had it
    args = parse_args(["--job", job_id, "-o", str(tmp_path / "out"), "--url", str(client.make_url("/"))])
    message = interrupted(args, None, Progress(job_id=job_id, job_images=1))
    line = message.splitlines()[-1].split("to stop the job instead: ", 1)[1]
    assert KEY not in message and line.startswith("curl -X DELETE")

    status, out, err = await run_example_beside(["bash", "-c", line], tmp_path, without_key())
    assert status == 0 and json.loads(out)["detail"].startswith("This server needs an API key"), (out, err)
    status, out, err = await run_example_beside(["bash", "-c", line], tmp_path, {**without_key(), "SDXL_API_KEY": KEY})
    assert status == 0 and json.loads(out)["state"] == "cancelled", (out, err)
    job = await client.get(f"/jobs/{job_id}", headers=auth)
    assert (await job.json())["state"] == "cancelled"


async def test_favicon_answers_without_a_key(make_client: MakeClient) -> None:
    client, _ = await make_client(api_key=KEY)
    response = await client.get("/favicon.ico")
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "image/x-icon"
    assert "max-age=" in response.headers["Cache-Control"]
    with Image.open(BytesIO(await response.read())) as icon:
        assert icon.format == "ICO" and {(16, 16), (32, 32)} <= icon.info["sizes"]


async def test_the_readme_lists_exactly_the_routes_open_without_a_key(make_client: MakeClient) -> None:
    """Every route of the app, asked without a key: a 401, or a path the README names as open; and
    each path the README names is open. Route parameters and static files get sample values."""
    paragraph = readme_paragraph("Open without a key, exactly these paths:")
    named = re.findall(r"`(/[^`]*)`", paragraph)
    exact = {path for path in named if not path.endswith("…")}
    prefixes = tuple(path.removesuffix("…") for path in named if path.endswith("…"))
    assert exact and prefixes and "`OPTIONS`" in paragraph

    def open_in_readme(path: str) -> bool:
        return path in exact or path.startswith(prefixes)

    client, _ = await make_client(api_key=KEY)
    asked: list[tuple[str, str]] = [("GET", "/no-such-route"), ("POST", "/health/nothing")]
    for route in client.app.router.routes():
        resource = route.resource
        assert resource is not None
        if isinstance(resource, StaticResource):
            path = resource.canonical + "/sample.css"
        else:
            path = re.sub(r"\{[^}]+\}", "sample", resource.canonical)
            path = path.replace("/images/sample", "/images/" + "0" * 32 + ".png")
        asked.append((route.method, path))
    reached: set[str] = set()
    for method, path in asked:
        response = await client.request(method, path)
        refused = response.status == 401
        assert refused != open_in_readme(path), f"{method} {path}: {response.status}, README says {'open' if open_in_readme(path) else 'keyed'}"
        if not refused:
            reached.add(path)
        preflight = await client.options(path, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status != 401, f"OPTIONS {path}: 401"
    for name in named:
        assert any(path == name or path.startswith(name.removesuffix("…")) for path in reached), f"README names {name}, which no route serves"


# ----- last: a real browser (its module-scoped Chromium starts here) ---------------------------------


def test_readme_browser_example_renders_its_image_in_a_real_page(server: ServerProcess, page: Page) -> None:
    """The README's browser example as a <script> in a page of the server's own origin: from any
    other origin its JSON POST would need CORS."""
    page.goto(f"{server.url}/docs")
    page.add_script_tag(content=pointed_at(readme_block("JavaScript in a browser page", "javascript"), server.url))
    image = page.locator("body > img[src^='data:image/png;base64,']")
    image.wait_for(timeout=RESPONSE_TIMEOUT_MS)
    image.evaluate("img => img.decode()")
    image.scroll_into_view_if_needed()
    _screenshot(page, "readme-browser-example.png")
    assert image.count() == 1
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1024, 576]
