"""The HTTP contract of every route, against a real server with a real tiny-model worker."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image

from gpu_workers.encoding import read_receipt
from tests.server_process import ServerProcess

PROMPT = "baroque oil painting, dramatic chiaroscuro lighting, a weathered stone tablet"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def generate(server: ServerProcess, body: object, **kwargs: object) -> requests.Response:
    return requests.post(server.url + "/generate", json=body, timeout=120, **kwargs)


def test_the_log_names_the_page_and_the_docs_and_holds_no_progress_bars(server: ServerProcess) -> None:
    """The first lines a person reads say where to go; the libraries' progress bars (model loading)
    stay out of the log."""
    log = server.log()
    assert f"the page: http://127.0.0.1:{server.port}/ui  the API docs: http://127.0.0.1:{server.port}/docs" in log
    assert "it/s]" not in log and "Loading pipeline components" not in log


def test_root_describes_the_api(server: ServerProcess) -> None:
    response = requests.get(server.url + "/", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "SDXL Lightning API"
    assert body["status"] == "running"
    assert {"generate", "health", "docs"} <= set(body["endpoints"])


def test_health_lists_the_ready_worker(server: ServerProcess) -> None:
    response = requests.get(server.url + "/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["cuda_available"] is False
    assert body["cuda_device"] is None
    assert body["model"] == "tiny"
    [worker] = body["workers"]
    assert worker["id"] == 0
    assert worker["device"] == "cpu"
    assert worker["state"] in ("ready", "busy")
    assert isinstance(worker["pid"], int) and worker["pid"] > 0
    assert isinstance(worker["images_done"], int)


def test_docs_page_and_spec(server: ServerProcess) -> None:
    page = requests.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200
    assert "swagger" in page.text.lower()
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    assert {"/", "/health", "/generate", "/images/{image_name}", "/jobs", "/jobs/{job_id}/archive"} <= set(spec["paths"])
    generate_op = spec["paths"]["/generate"]["post"]
    assert {"200", "400", "500", "503"} <= set(generate_op["responses"])
    ok = generate_op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/GenerateResponse"}
    health_op = spec["paths"]["/health"]["get"]["responses"]
    assert health_op["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}
    image_op = spec["paths"]["/images/{image_name}"]["get"]["responses"]
    assert {"image/png", "image/webp", "image/jpeg"} <= set(image_op["200"]["content"])
    request_schema = spec["components"]["schemas"]["GenerateRequest"]
    assert {"prompts", "num_images_per_prompt", "return_format", "seed", "negative_prompt", "format", "quality", "size"} <= set(request_schema["properties"])
    assert any(p["name"] == "Idempotency-Key" for p in generate_op["parameters"]) and "422" in generate_op["responses"]


def test_base64_images_decode_to_1024x576_pngs_in_order(server: ServerProcess) -> None:
    response = generate(server, {"prompts": [PROMPT, "a second prompt", "a third"], "seed": 7})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["count"] == 3
    assert body["message"] == "Successfully generated 3 image(s)"
    assert body["seeds"] == [7, 8, 9]
    images = [base64.b64decode(image) for image in body["images"]]
    assert [png_size(image) for image in images] == [(1024, 576)] * 3
    assert len(set(images)) == 3


def test_url_images_match_base64_bytes_in_the_same_order(server: ServerProcess) -> None:
    request = {"prompts": [PROMPT, "another prompt"], "num_images_per_prompt": 2, "seed": 99}
    inline = generate(server, request).json()
    linked = generate(server, {**request, "return_format": "url"}).json()
    assert linked["count"] == 4
    assert linked["seeds"] == inline["seeds"] == [99, 100, 101, 102]
    fetched = []
    for url in linked["images"]:
        assert url.startswith(server.url + "/images/") and url.endswith(".png")
        image = requests.get(url, timeout=10)
        assert image.status_code == 200
        assert image.headers["Content-Type"] == "image/png"
        fetched.append(image.content)
    assert [png_size(image) for image in fetched] == [(1024, 576)] * 4
    assert fetched == [base64.b64decode(image) for image in inline["images"]]


@pytest.mark.parametrize(("image_format", "size"), [("png", "576x1024"), ("webp", "1024x1024"), ("jpeg", "1024x576")])
def test_real_workers_write_each_format_with_its_receipt(server: ServerProcess, image_format: str, size: str) -> None:
    """Every format from a real worker, at a size each (all nine pairs: tests/test_delivery.py),
    with the receipt Pillow reads: what made the image, down to the weights and the versions."""
    import torch

    request = {"prompts": ["a red kite over the dunes"], "seed": 4242, "format": image_format, "size": size, "return_format": "url"}
    [url] = generate(server, request).json()["images"]
    data = requests.get(url, timeout=10).content
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == image_format.upper() and f"{image.width}x{image.height}" == size
    receipt = read_receipt(data)
    assert receipt is not None
    assert (receipt["prompt"], receipt["seed"], receipt["steps"], receipt["guidance_scale"]) == ("a red kite over the dunes", 4242, 8, 0.0)
    assert (receipt["model"], receipt["device_name"], receipt["torch_version"]) == ("tiny", "cpu", torch.__version__)
    assert receipt["model_fingerprint"].startswith("sha256:") and receipt["diffusers_version"]
    if image_format == "webp":
        again = requests.get(generate(server, request).json()["images"][0], timeout=10).content
        assert again == data, "same seed, same format, same quality: same bytes"


def test_images_come_in_prompt_major_order_with_seed_plus_index(server: ServerProcess) -> None:
    """Images 2-3 of a request (prompt 1, seeds s+2, s+3) equal a request of prompt 1 alone with
    seed s+2: the shard composition is the same (max_batch 2), so the bytes must be too."""
    whole = generate(server, {"prompts": ["first subject", "second subject"], "num_images_per_prompt": 2, "seed": 500}).json()
    tail = generate(server, {"prompts": ["second subject"], "num_images_per_prompt": 2, "seed": 502}).json()
    assert whole["images"][2:] == tail["images"]
    assert whole["images"][:2] != tail["images"]


def test_random_seed_is_reported_and_reproduces(server: ServerProcess) -> None:
    first = generate(server, {"prompts": [PROMPT], "seed": -1}).json()
    [seed] = first["seeds"]
    assert 0 <= seed < 2**32
    again = generate(server, {"prompts": [PROMPT], "seed": seed}).json()
    assert again["images"] == first["images"]


def test_unknown_image_is_a_json_404(server: ServerProcess) -> None:
    response = requests.get(server.url + "/images/" + "0" * 32 + ".png", timeout=10)
    assert response.status_code == 404
    assert "detail" in response.json()
    response = requests.get(server.url + "/images/..%2F..%2Fetc%2Fpasswd.png", timeout=10)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_unknown_route_is_a_json_404(server: ServerProcess) -> None:
    response = requests.get(server.url + "/nope", timeout=10)
    assert response.status_code == 404
    assert response.json()["detail"]


def test_wrong_method_is_a_json_405(server: ServerProcess) -> None:
    response = requests.get(server.url + "/generate", timeout=10)
    assert response.status_code == 405
    assert response.json()["detail"]


VALID = {"prompts": [PROMPT]}

BAD_BODIES = {
    "non-integral count": {**VALID, "num_images_per_prompt": 2.5},
    "integral float count": {**VALID, "num_images_per_prompt": 2.0},
    "boolean count": {**VALID, "num_images_per_prompt": True},
    "string count": {**VALID, "num_images_per_prompt": "2"},
    "zero count": {**VALID, "num_images_per_prompt": 0},
    "count over 50": {**VALID, "num_images_per_prompt": 51},
    "blank prompt": {"prompts": [PROMPT, "   "]},
    "empty prompt": {"prompts": [""]},
    "non-string prompt": {"prompts": [42]},
    "null prompt": {"prompts": [None]},
    "prompt over 2000 chars": {"prompts": ["x" * 2001]},
    "negative prompt over 2000 chars": {**VALID, "negative_prompt": "x" * 2001},
    "no prompts": {"prompts": []},
    "prompts not a list": {"prompts": PROMPT},
    "prompts missing": {"return_format": "base64"},
    "over 150 prompts": {"prompts": [PROMPT] * 151},
    "total over 150": {"prompts": [PROMPT] * 4, "num_images_per_prompt": 40},
    "unknown return_format": {**VALID, "return_format": "jpeg"},
    "seed too large": {**VALID, "seed": 2**32},
    "seed below -1": {**VALID, "seed": -2},
    "non-integral seed": {**VALID, "seed": 1.5},
    "boolean seed": {**VALID, "seed": False},
    "huge seed": {**VALID, "seed": 10**400},
    "string guidance": {**VALID, "guidance_scale": "1"},
    "boolean guidance": {**VALID, "guidance_scale": True},
    "guidance out of range": {**VALID, "guidance_scale": 1000},
    "unknown field": {**VALID, "steps": 50},
    "body is a list": [PROMPT],
    "body is a string": PROMPT,
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_invalid_bodies_are_400_with_a_detail(server: ServerProcess, body: object) -> None:
    response = generate(server, body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail


def test_invalid_json_is_400(server: ServerProcess) -> None:
    response = requests.post(
        server.url + "/generate", data=b'{"prompts": [', headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]


def test_invalid_utf8_is_400(server: ServerProcess) -> None:
    response = requests.post(
        server.url + "/generate", data=b'{"prompts": ["\xff\xfe"]}', headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()["detail"]


def test_wrong_content_type_is_400_naming_json(server: ServerProcess) -> None:
    response = requests.post(server.url + "/generate", data=json.dumps(VALID), headers={"Content-Type": "text/plain"}, timeout=10)
    assert response.status_code == 400
    assert "application/json" in response.json()["detail"]


def test_field_errors_name_the_field(server: ServerProcess) -> None:
    body = generate(server, {"prompts": [PROMPT, " "], "return_format": "gif"}).json()
    assert "prompts[1]" in body["errors"]
    assert "return_format" in body["errors"]
    assert "prompts[1]" in body["detail"] and "return_format" in body["detail"]


def test_long_prompt_is_truncated_with_a_warning(server: ServerProcess) -> None:
    long_prompt = " ".join(["baroque"] * 120)
    body = generate(server, {"prompts": [long_prompt, PROMPT], "seed": 3}).json()
    assert body["success"] is True
    assert len(body["warnings"]) == 1
    assert "tokens" in body["warnings"][0]
