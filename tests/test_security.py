"""Safe on a public tunnel: API keys, limits, CORS, hostile bodies, path escapes, logs."""

from __future__ import annotations

import base64
import http.client
import json
import time
from pathlib import Path

import pytest
import requests

from tests.server_process import ServerProcess
from tests.test_browser import chromium_path  # noqa: F401 - the fixture

KEY = "k3y-for-tests-0123456789abcdef"
FILE_KEY = "second-key-from-a-file"
ORIGIN = "http://app.example.org"


@pytest.fixture(scope="module")
def secured(start_server, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# team keys\n{FILE_KEY}\n")
    return start_server(
        "--model", "tiny", "--workers", "1", "--max-batch", "2",
        "--api-key-file", str(key_file), "--cors-origins", ORIGIN,
        "--image-dir-max-bytes", "4000000", "--image-retention", "4",
        env={"SDXL_API_KEY": KEY},
    )


def with_key(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(server: ServerProcess, body: object, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(server.url + "/generate", json=body, headers=headers if headers is not None else with_key(), timeout=120)


# ----- API key ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/jobs/" + "a" * 32, "/jobs/" + "a" * 32 + "/archive"])
def test_routes_need_a_key(secured: ServerProcess, path: str) -> None:
    response = requests.get(secured.url + path, timeout=10)
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]
    assert "WWW-Authenticate" in response.headers


def test_generate_without_or_with_a_wrong_key_is_401_before_any_work(secured: ServerProcess) -> None:
    assert post(secured, {"prompts": ["x"]}, headers={}).status_code == 401
    wrong = post(secured, {"prompts": ["x"]}, headers=with_key("nope"))
    assert wrong.status_code == 401 and wrong.json()["detail"] == "The API key is not valid."
    assert post(secured, {"prompts": ["x"]}, headers={"X-API-Key": KEY[:-1]}).status_code == 401
    assert secured.health()["workers"][0]["images_done"] == 0


@pytest.mark.parametrize("headers", [with_key(), {"X-API-Key": KEY}, with_key(FILE_KEY), {"authorization": f"bearer {KEY}"}])
def test_bearer_and_x_api_key_and_file_keys_are_accepted(secured: ServerProcess, headers: dict[str, str]) -> None:
    assert requests.get(secured.url + "/", headers=headers, timeout=10).status_code == 200


def test_health_and_docs_stay_open(secured: ServerProcess) -> None:
    assert requests.get(secured.url + "/health", timeout=10).status_code == 200
    assert requests.get(secured.url + "/docs", timeout=10).status_code == 200
    spec = requests.get(secured.url + "/openapi.json", timeout=10).json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert spec["paths"]["/health"]["get"]["security"] == []  # documented as open
    assert {"bearer": []} in spec["security"]  # Swagger UI shows an Authorize button


def test_the_key_never_reaches_the_log(secured: ServerProcess) -> None:
    post(secured, {"prompts": ["logged request"]})
    post(secured, {"prompts": ["x"]}, headers=with_key(KEY + "-wrong"))
    log = secured.log()
    assert KEY not in log and FILE_KEY not in log


# ----- limits ----------------------------------------------------------------------------------


def test_oversized_body_is_413_with_a_detail(secured: ServerProcess) -> None:
    body = json.dumps({"prompts": ["x" * (2**20 + 10)]})
    response = requests.post(
        secured.url + "/generate", data=body, headers={**with_key(), "Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]


def test_stored_images_keep_to_the_disk_budget_oldest_first(secured: ServerProcess) -> None:
    urls: list[str] = []
    for seed in range(3):
        urls += post(secured, {"prompts": ["budget a", "budget b"], "seed": seed, "return_format": "url"}).json()["images"]
    used = sum(p.stat().st_size for p in (secured.workdir / "images").glob("*.png"))
    assert used <= 4_000_000
    statuses = [requests.get(url, headers=with_key(), timeout=10).status_code for url in urls]
    assert statuses[-1] == 200 and statuses[0] == 404, statuses
    assert statuses == sorted(statuses, reverse=True), "the oldest go first"


def test_stored_images_expire_after_the_retention_time(secured: ServerProcess) -> None:
    [url] = post(secured, {"prompts": ["short-lived"], "return_format": "url"}).json()["images"]
    assert requests.get(url, headers=with_key(), timeout=10).status_code == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and requests.get(url, headers=with_key(), timeout=10).status_code == 200:
        time.sleep(0.5)
    assert requests.get(url, headers=with_key(), timeout=10).status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../etc/passwd",
        "/images/..%2F..%2Fetc%2Fpasswd.png",
        "/images/%2Fetc%2Fpasswd.png",
        "/images//etc/passwd.png",
        "/images/%2e%2e%2f%2e%2e%2fsetup.cfg",
        "/images/" + "A" * 32 + ".png",
        "/images/" + "a" * 31 + ".png",
    ],
)
def test_image_paths_cannot_leave_the_folder(secured: ServerProcess, path: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", secured.port, timeout=10)
    connection.request("GET", path, headers=with_key())  # sent as written, not normalised
    response = connection.getresponse()
    body = response.read()
    assert response.status in (400, 404), (path, response.status)
    assert b"root:" not in body and b"[metadata]" not in body
    assert "detail" in json.loads(body)


def test_image_ids_are_unguessable(secured: ServerProcess) -> None:
    urls = post(secured, {"prompts": ["id a", "id b"], "return_format": "url"}).json()["images"]
    ids = [url.rsplit("/", 1)[1].removesuffix(".png") for url in urls]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids[0] != ids[1]


# ----- CORS ------------------------------------------------------------------------------------


def test_cors_preflight_allows_the_configured_origin(secured: ServerProcess) -> None:
    response = requests.options(
        secured.url + "/generate",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    actual = post(secured, {"prompts": ["cors"]}, headers={**with_key(), "Origin": ORIGIN})
    assert actual.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_cors_refuses_other_origins(secured: ServerProcess) -> None:
    response = requests.options(
        secured.url + "/generate",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_is_off_by_default(server: ServerProcess) -> None:
    response = requests.post(server.url + "/generate", json={"prompts": [""]}, headers={"Origin": ORIGIN}, timeout=10)
    assert "Access-Control-Allow-Origin" not in response.headers


# ----- hostile bodies --------------------------------------------------------------------------

HOSTILE = {
    "invalid utf-8": (b'{"prompts": ["\xc3\x28"]}', "application/json"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "deep object nesting": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
    "huge integer": (b'{"prompts": ["x"], "seed": 1' + b"0" * 5000 + b"}", "application/json"),
    "huge float": (b'{"prompts": ["x"], "guidance_scale": 1e999}', "application/json"),
    "NaN": (b'{"prompts": ["x"], "guidance_scale": NaN}', "application/json"),
    "null body": (b"null", "application/json"),
    "null prompts": (b'{"prompts": null}', "application/json"),
    "null count": (b'{"prompts": ["x"], "num_images_per_prompt": null}', "application/json"),
    "duplicate keys": (b'{"prompts": ["x"], "prompts": ["y"]}', "application/json"),
    "empty body": (b"", "application/json"),
    "form body": (b"prompts=x", "application/x-www-form-urlencoded"),
    "text body": (b'{"prompts": ["x"]}', "text/plain"),
    "multipart": (b"--b\r\nContent-Disposition: form-data; name=prompts\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    "nul bytes": (b'{"prompts": ["\x00"]}', "application/json"),
    "truncated": (b'{"prompts": ["x"', "application/json"),
    "trailing garbage": (b'{"prompts": ["x"]} extra', "application/json"),
    "bare string": (b'"x"', "application/json"),
    "number": (b"42", "application/json"),
}


@pytest.mark.parametrize("body,content_type", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bodies_are_400_with_a_detail_and_no_traceback(server: ServerProcess, body: bytes, content_type: str) -> None:
    response = requests.post(server.url + "/generate", data=body, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 400, response.text[:300]
    assert isinstance(response.json()["detail"], str)
    assert "Traceback" not in response.text


def test_server_is_healthy_after_the_hostile_table(server: ServerProcess) -> None:
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "healthy"
    body = requests.post(server.url + "/generate", json={"prompts": ["still here"]}, timeout=60).json()
    assert base64.b64decode(body["images"][0])[:4] == b"\x89PNG"


# ----- logs ------------------------------------------------------------------------------------


def access_lines(server: ServerProcess) -> list[dict]:
    lines = Path(server.log_path).read_text().splitlines()
    return [json.loads(line.split(" INFO ", 1)[1]) for line in lines if " service.access INFO " in line]


def test_one_structured_log_line_per_request_without_prompts(secured: ServerProcess) -> None:
    secret_prompt = "a prompt that must not reach the info log"
    response = post(secured, {"prompts": [secret_prompt], "num_images_per_prompt": 2})
    request_id = response.headers["X-Request-Id"]
    time.sleep(0.3)
    [line] = [entry for entry in access_lines(secured) if entry["id"] == request_id]
    assert line["route"] == "/generate" and line["method"] == "POST"
    assert line["status"] == 200 and line["images"] == 2
    assert line["duration_ms"] > 0 and line["client"] == "127.0.0.1"
    assert secret_prompt not in secured.log()


# ----- last: it makes an image, which the tests above count on not having happened -----------------


def test_an_image_link_opens_in_chromium_on_a_keyed_server(secured: ServerProcess, chromium_path: str) -> None:
    """A url link goes where no header can be sent (an address bar, an editor's import): on a keyed
    server it opens without the key, because its 128-bit name is the capability; the job and its
    archive still need the key."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM_FLAGS, SCREENSHOTS

    answer = post(secured, {"prompts": ["a lighthouse, link test"], "seed": 8, "format": "webp", "return_format": "url"}).json()
    [url] = answer["images"]
    assert requests.get(secured.url + f"/jobs/{answer['job_id']}/archive", timeout=10).status_code == 401
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            opened = page.goto(url)
            assert opened is not None and opened.status == 200 and opened.headers["content-type"] == "image/webp"
            assert page.evaluate("() => [document.images[0].naturalWidth, document.images[0].naturalHeight]") == [1024, 576]
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "image-link-keyed-server.png"))
        finally:
            browser.close()
