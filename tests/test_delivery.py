"""Issue 16 in the test's own process: formats, sizes, receipts, the archive, idempotency keys and
the job list, over aiohttp's test client with the real scheduler, jobs, database and image store,
and fake workers whose images go through the real encode stage (``tests/fake_transport.py``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from contract.formats import IMAGE_FORMATS, WEBP
from gpu_workers.encoding import read_receipt
from service.app import create_app
from service.settings import Settings
from tests.fake_transport import SLOW, FakeTransport, fake_engine

KEY = "delivery-test-key-0123456789"


async def start(aiohttp_client: Any, tmp_path: Path, transport: FakeTransport | None = None, **settings: object) -> tuple[TestClient, FakeTransport]:
    """A server over ``tmp_path``: a second call with the same path is the same server restarted."""
    transport = transport or FakeTransport()
    base = Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2)
    config = replace(base, **settings)
    client = await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch)))
    return client, transport


async def wait_done(client: TestClient, job_id: str, headers: dict[str, str] | None = None) -> dict:
    for _ in range(300):
        body = await (await client.get(f"/jobs/{job_id}", headers=headers)).json()
        if body["state"] not in ("queued", "running"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


async def archive(client: TestClient, job_id: str, since: int | None = None, headers: dict[str, str] | None = None) -> tuple[Any, zipfile.ZipFile]:
    query = "" if since is None else f"?since={since}"
    response = await client.get(f"/jobs/{job_id}/archive{query}", headers=headers)
    data = await response.read()
    assert response.status == 200, data[:300]
    assert response.content_type == "application/zip" and response.content_length == len(data)
    return response, zipfile.ZipFile(io.BytesIO(data))


# ----- formats, sizes, receipts -----------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["webp", "jpeg"])
@pytest.mark.parametrize("size", ["1024x576", "576x1024", "1024x1024"])
async def test_each_format_decodes_at_each_size_with_its_receipt(aiohttp_client, tmp_path: Path, image_format: str, size: str) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    """(PNG, whose fake images are plain 8 x 8 ones, is checked with real workers in
    tests/test_delivery_workers.py, as are all three formats at a size each.)"""
    body = {"prompts": ["a castle at dawn, ünïcode ✓"], "seed": 42, "format": image_format, "size": size, "return_format": "url", "quality": 70}
    answer = await (await client.post("/generate", json=body)).json()
    url = answer["images"][0]
    extension = {"webp": ".webp", "jpeg": ".jpg"}[image_format]
    assert url.endswith(extension)
    response = await client.get(url[url.index("/images/"):])
    assert response.status == 200 and response.content_type == f"image/{image_format}"
    data = await response.read()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == image_format.upper() and f"{image.width}x{image.height}" == size
    receipt = read_receipt(data)
    assert receipt is not None
    assert (receipt["prompt"], receipt["seed"], f"{receipt['width']}x{receipt['height']}") == (body["prompts"][0], 42, size)
    assert (receipt["image_format"], receipt["quality"], receipt["steps"]) == (image_format, 70, 8)


@pytest.mark.parametrize("image_format", ["webp", "jpeg"])
async def test_same_seed_same_format_same_bytes_and_default_quality(aiohttp_client, tmp_path: Path, image_format: str) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    body = {"prompts": ["a", "b"], "seed": 5, "format": image_format}
    first, second = [await (await client.post("/generate", json=body)).json() for _ in range(2)]
    assert first["job_id"] != second["job_id"] and first["images"] == second["images"]
    receipt = read_receipt(base64.b64decode(first["images"][0]))
    assert receipt["quality"] == IMAGE_FORMATS[image_format].default_quality and receipt["seed"] == 5


@pytest.mark.parametrize(
    ("change", "headers", "field"),
    [
        ({"format": "gif"}, {}, "format must be one of: png, webp, jpeg"),
        ({"size": "800x600"}, {}, "size 800x600 is not served here"),
        ({"size": "big"}, {}, "is not WIDTHxHEIGHT"),
        ({"size": "1000x577"}, {}, "multiples of 8"),
        ({"format": "webp", "quality": 0}, {}, "quality"),
        ({"format": "jpeg", "quality": 101}, {}, "quality"),
        ({"quality": 80}, {}, "png is lossless and takes none"),
        ({"format": "webp", "quality": "80"}, {}, "Not a valid integer"),
        ({"width": 1024, "height": 576}, {}, 'send "size"'),
        ({"height": 576}, {}, "height is not a field"),
        ({}, {"Idempotency-Key": ""}, "Idempotency-Key must be 1 to 255"),
        ({}, {"Idempotency-Key": "has space"}, "Idempotency-Key must be 1 to 255"),
        ({}, {"Idempotency-Key": "k" * 256}, "Idempotency-Key must be 1 to 255"),
    ],
)
async def test_bad_delivery_fields_are_400_with_a_detail(aiohttp_client, tmp_path: Path, change: dict, headers: dict, field: str) -> None:
    client, transport = await start(aiohttp_client, tmp_path, sizes="1024x576,576x1024")
    for route in ("/generate", "/jobs"):
        response = await client.post(route, json={"prompts": ["x"], **change}, headers=headers)
        assert response.status == 400 and field in (await response.json())["detail"], await response.text()
    assert transport.sent == []


async def test_root_lists_sizes_and_formats(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path, sizes="1024x576,576x1024")
    root = await (await client.get("/")).json()
    assert root["sizes"] == ["1024x576", "576x1024"]
    assert root["formats"]["webp"]["default_quality"] == WEBP.default_quality and root["formats"]["png"]["default_quality"] is None
    assert "archive" in root["endpoints"]


# ----- the archive ------------------------------------------------------------------------------


async def test_archive_manifest_matches_its_files_and_since_gives_the_rest(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    created = await (await client.post("/jobs", json={"prompts": ["one", "two", "three"], "num_images_per_prompt": 2, "seed": 100, "format": "webp"})).json()
    await wait_done(client, created["job_id"])
    response, whole = await archive(client, created["job_id"])
    assert response.headers["X-Job-State"] == "done" and response.headers["X-Images-Done"] == "6"
    assert f'job-{created["job_id"]}.zip' in response.headers["Content-Disposition"]
    names = whole.namelist()
    assert names[0] == "manifest.json" and len(names) == 7
    assert all(info.compress_type == zipfile.ZIP_STORED for info in whole.infolist())
    manifest = json.loads(whole.read("manifest.json"))
    assert [entry["index"] for entry in manifest["images"]] == list(range(6))
    for entry in manifest["images"]:
        data = whole.read(entry["file"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        assert entry["seed"] == 100 + entry["index"] and entry["prompt"] == ["one", "two", "three"][entry["index"] // 2]
        assert entry["receipt"]["seed"] == entry["seed"] and entry["file"].endswith(f"_{entry['seed']}.webp")
        assert read_receipt(data) == entry["receipt"]
    _, rest = await archive(client, created["job_id"], since=4)
    rest_manifest = json.loads(rest.read("manifest.json"))
    assert [entry["index"] for entry in rest_manifest["images"]] == [4, 5] and rest_manifest["since"] == 4
    assert rest.namelist()[1:] == names[5:]
    assert all(rest.read(name) == whole.read(name) for name in names[5:]), "the stored bytes, not encoded again"
    _, empty = await archive(client, created["job_id"], since=6)
    assert empty.namelist() == ["manifest.json"]


async def test_an_image_the_disk_budget_removed_is_left_out_of_the_archive(aiohttp_client, tmp_path: Path) -> None:
    """The manifest says what the zip holds: a file gone from the disk is in neither (and the zip
    is still whole: its Content-Length counts only what is sent)."""
    client, _ = await start(aiohttp_client, tmp_path)
    created = await (await client.post("/jobs", json={"prompts": ["a", "b", "c"], "format": "jpeg"})).json()
    await wait_done(client, created["job_id"])
    _, whole = await archive(client, created["job_id"])
    removed = json.loads(whole.read("manifest.json"))["images"][1]
    [gone] = [path for path in (tmp_path / "images").iterdir() if hashlib.sha256(path.read_bytes()).hexdigest() == removed["sha256"]]
    gone.unlink()
    _, partial = await archive(client, created["job_id"])
    assert [entry["index"] for entry in json.loads(partial.read("manifest.json"))["images"]] == [0, 2]
    assert removed["file"] not in partial.namelist() and len(partial.namelist()) == 3


@pytest.mark.parametrize("since", ["-1", "x", "1.5", "9" * 12])
async def test_archive_refuses_a_bad_since_and_an_unknown_job(aiohttp_client, tmp_path: Path, since: str) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    created = await (await client.post("/jobs", json={"prompts": ["a"]})).json()
    response = await client.get(f"/jobs/{created['job_id']}/archive?since={since}")
    assert response.status == 400 and "since" in (await response.json())["detail"]
    assert (await client.get("/jobs/" + "f" * 32 + "/archive")).status == 404


async def test_a_cancelled_job_keeps_its_finished_images_readable(aiohttp_client, tmp_path: Path) -> None:
    """One shard finishes, the slow rest is cancelled: the finished images stay in GET /jobs/{id}
    (links) and in the archive."""
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(slow_seconds=30), max_batch=2)
    created = await (await client.post("/jobs", json={"prompts": ["a", "b", f"{SLOW} c", "d"], "seed": 1, "return_format": "base64"})).json()
    job_id = created["job_id"]
    for _ in range(200):
        status = await (await client.get(f"/jobs/{job_id}")).json()
        if status["images_done"] == 2:
            break
        await asyncio.sleep(0.05)
    running = status["finished_images"]
    assert [image["index"] for image in running] == [0, 1] and [image["seed"] for image in running] == [1, 2]
    assert (await client.delete(f"/jobs/{job_id}")).status == 200
    cancelled = await (await client.get(f"/jobs/{job_id}")).json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_images"] == running
    for image in running:
        assert (await client.get(image["url"][image["url"].index("/images/"):])).status == 200
    response, partial = await archive(client, job_id)
    assert response.headers["X-Job-State"] == "cancelled"
    assert [entry["index"] for entry in json.loads(partial.read("manifest.json"))["images"]] == [0, 1]


# ----- idempotency keys -------------------------------------------------------------------------


async def test_an_idempotent_retry_after_a_restart_is_the_same_job_without_a_second_run(aiohttp_client, tmp_path: Path) -> None:
    body = {"prompts": ["a lighthouse", "a fox"], "format": "webp"}  # no seed: a retry must not draw a new one
    headers = {"Idempotency-Key": "batch-2026-12-01-a"}
    client, first_transport = await start(aiohttp_client, tmp_path)
    created = await client.post("/jobs", json=body, headers=headers)
    assert created.status == 202 and "Idempotent-Replayed" not in created.headers
    job = await created.json()
    await wait_done(client, job["job_id"])
    assert len(first_transport.sent) == 1
    await client.close()

    restarted, transport = await start(aiohttp_client, tmp_path)
    again = await restarted.post("/jobs", json={"format": "webp", "prompts": ["a lighthouse", "a fox"]}, headers=headers)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["job_id"] == job["job_id"] and (await again.json())["seeds"] == job["seeds"]
    generated = await restarted.post("/generate", json=body, headers=headers)
    answer = await generated.json()
    assert generated.status == 200 and generated.headers["X-Job-Id"] == job["job_id"] and answer["success"] is True
    assert answer["seeds"] == job["seeds"] and len(answer["images"]) == 2
    lines = await (await restarted.post("/generate", json=body, headers={**headers, "Accept": "application/x-ndjson"})).text()
    kinds = [json.loads(line)["type"] for line in lines.splitlines()]
    assert kinds == ["job", "image", "image", "summary"], "a stream of a finished job replays its images"
    assert transport.sent == [], "no second run"

    other = await restarted.post("/jobs", json={**body, "prompts": ["something else"]}, headers=headers)
    detail = (await other.json())["detail"]
    assert other.status == 422 and "batch-2026-12-01-a" in detail and job["job_id"] in detail
    assert transport.sent == []


async def test_the_same_key_sent_twice_at_once_makes_one_job_and_generate_follows_it(aiohttp_client, tmp_path: Path) -> None:
    client, transport = await start(aiohttp_client, tmp_path, FakeTransport(seconds_per_shard=0.3), max_batch=2)
    body = {"prompts": ["a", "b", "c", "d"], "seed": 3}
    headers = {"Idempotency-Key": "same-key"}
    responses = await asyncio.gather(*(client.post("/generate", json=body, headers=headers) for _ in range(4)))
    answers = [await response.json() for response in responses]
    assert len({answer["job_id"] for answer in answers}) == 1
    assert all(answer["success"] and answer["images"] == answers[0]["images"] for answer in answers)
    assert len(transport.sent) == 2, "one job of two shards, run once"
    assert sum(response.headers.get("Idempotent-Replayed") == "true" for response in responses) == 3


async def test_idempotency_keys_belong_to_their_api_key(aiohttp_client, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    other = "another-key-abcdefghijklmnop"
    keys.write_text(f"{KEY}\n{other}\n")
    client, transport = await start(aiohttp_client, tmp_path, api_key_file=str(keys))
    headers = {"Idempotency-Key": "k1"}
    first = await (await client.post("/jobs", json={"prompts": ["a"]}, headers={**headers, "X-API-Key": KEY})).json()
    second = await (await client.post("/jobs", json={"prompts": ["b"]}, headers={**headers, "X-API-Key": other})).json()
    assert first["job_id"] != second["job_id"]
    await wait_done(client, second["job_id"], {"X-API-Key": other})
    mine = await (await client.get("/jobs", headers={"X-API-Key": KEY})).json()
    assert [job["job_id"] for job in mine["jobs"]] == [first["job_id"]]


# ----- the job list -----------------------------------------------------------------------------


async def test_jobs_are_listed_newest_first_a_page_at_a_time(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    made = [(await (await client.post("/jobs", json={"prompts": [f"p{i}"], "format": "jpeg"})).json())["job_id"] for i in range(5)]
    page = await (await client.get("/jobs?limit=2")).json()
    seen = [job["job_id"] for job in page["jobs"]]
    while page["next"]:
        page = await (await client.get(page["next"])).json()
        seen += [job["job_id"] for job in page["jobs"]]
    assert seen == made[::-1]
    assert page["jobs"][-1]["format"] == "jpeg" and page["jobs"][-1]["size"] == "1024x576"
    for query in ("limit=0", "limit=101", "limit=x", "before=" + "0" * 32):
        response = await client.get(f"/jobs?{query}")
        assert response.status == 400 and (await response.json())["detail"]
