"""The HTTP contract in the test's own process: aiohttp's test client over ``create_app``, the real
scheduler, jobs, database and image store, and fake workers (``tests/fake_transport.py``).

What needs no process runs here, in milliseconds: heartbeats, NDJSON, the job routes, and how
failure reasons become HTTP statuses. The real-process tests (``test_heartbeats``, ``test_jobs``,
``test_faults``) keep what needs real workers and sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from contract.failures import FailureReason
from service.app import create_app
from service.jobs.refusal import status_for
from service.settings import Settings
from tests.fake_transport import FAIL, LOSE, SLOW, FakeTransport, fake_engine, fake_png

INTERVAL = 0.2
MakeClient = Callable[..., Awaitable[tuple[TestClient, FakeTransport]]]


@pytest.fixture
def make_client(aiohttp_client, tmp_path: Path) -> MakeClient:
    async def make(transport: FakeTransport | None = None, **settings: object) -> tuple[TestClient, FakeTransport]:
        transport = transport or FakeTransport()
        base = Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=INTERVAL)
        config = replace(base, **settings)
        client = await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch)))
        return client, transport

    return make


async def test_failure_reasons_map_to_statuses_in_one_place() -> None:
    assert {reason: status_for(reason) for reason in FailureReason} == {
        FailureReason.GENERATION: 500,
        FailureReason.WORKER_CRASHES: 500,
        FailureReason.SHARD_TIMEOUT: 500,
        FailureReason.NO_MODEL: 500,
        FailureReason.TRANSPORT_LOST: 503,
        FailureReason.SHUTTING_DOWN: 503,
    }


async def test_a_fast_request_gets_a_plain_answer_with_its_job_id(make_client: MakeClient) -> None:
    # At the server's default interval (10 s): a 3-image request on fake workers takes about 0.1 s on
    # a quiet machine, within reach of the module's 0.2 s on a loaded one (a CI run saw a heartbeat).
    client, _ = await make_client(heartbeat_interval=Settings().heartbeat_interval)
    response = await client.post("/generate", json={"prompts": ["a", "b", "c"], "seed": 7})
    raw = await response.read()
    assert response.status == 200 and not raw.startswith(b" ")
    body = json.loads(raw)
    assert body["success"] is True and body["count"] == 3 and body["seeds"] == [7, 8, 9]
    assert [base64.b64decode(image) for image in body["images"]] == [fake_png(seed) for seed in (7, 8, 9)]
    assert body["job_id"] == response.headers["X-Job-Id"]


async def test_a_long_request_sends_spaces_then_the_body_of_get_jobs(make_client: MakeClient) -> None:
    client, _ = await make_client(FakeTransport(seconds_per_shard=0.6))
    response = await client.post("/generate", json={"prompts": [f"p{i}" for i in range(6)], "seed": 100})
    raw = await response.read()
    assert response.status == 200 and response.headers["Content-Type"].startswith("application/json")
    spaces = len(raw) - len(raw.lstrip(b" "))
    assert spaces >= 3, f"{spaces} heartbeat(s) for a request of two shards of 0.6 s at {INTERVAL} s"
    body = json.loads(raw)
    assert body["success"] is True and body["count"] == 6
    stored = await (await client.get(f"/jobs/{body['job_id']}")).json()
    assert stored["state"] == "done" and stored["images"] == body["images"] and stored["seeds"] == body["seeds"]


@pytest.mark.parametrize(
    ("prompt", "status", "detail"),
    [
        (FAIL, 500, "Image generation failed: RuntimeError: deliberate"),
        (LOSE, 503, "the connection to Redis was lost"),
    ],
)
async def test_a_fast_failure_keeps_the_status_of_its_reason(make_client: MakeClient, prompt: str, status: int, detail: str) -> None:
    client, _ = await make_client()
    response = await client.post("/generate", json={"prompts": [prompt]})
    body = await response.json()
    assert response.status == status and detail in body["detail"]
    assert body["job_id"] == response.headers["X-Job-Id"]
    assert ("Retry-After" in response.headers) == (status == 503)
    stored = await (await client.get(f"/jobs/{body['job_id']}")).json()
    assert stored["state"] == "failed" and stored["success"] is False and detail in stored["detail"]


async def test_a_late_failure_is_success_false_after_the_spaces(make_client: MakeClient) -> None:
    client, _ = await make_client(FakeTransport(slow_seconds=0.5))
    response = await client.post("/generate", json={"prompts": [f"{SLOW} {FAIL}"]})
    raw = await response.read()
    assert response.status == 200 and raw.startswith(b" ")
    body = json.loads(raw)
    assert body == {"success": False, "detail": "Image generation failed: RuntimeError: deliberate", "images": [], "count": 0, "job_id": body["job_id"]}


async def test_ndjson_lines_tell_the_job_each_image_progress_and_a_summary(make_client: MakeClient) -> None:
    client, _ = await make_client(FakeTransport(seconds_per_shard=0.25))
    response = await client.post(
        "/generate", json={"prompts": [f"p{i}" for i in range(4)], "seed": 40}, headers={"Accept": "application/x-ndjson"}
    )
    assert response.status == 200 and response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in (await response.read()).splitlines() if line]
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "job" and kinds[-1] == "summary" and "progress" in kinds
    assert lines[0]["images_total"] == 4 and lines[0]["seeds"] == [40, 41, 42, 43]
    images = {line["index"]: line for line in lines if line["type"] == "image"}
    assert sorted(images) == [0, 1, 2, 3]
    assert all(base64.b64decode(images[i]["base64"]) == fake_png(40 + i) and images[i]["seed"] == 40 + i for i in range(4))
    progress = [line["images_done"] for line in lines if line["type"] == "progress"]
    assert progress == sorted(progress)
    summary = lines[-1]
    assert summary["success"] is True and summary["state"] == "done" and summary["count"] == 4
    assert summary["job_id"] == lines[0]["job_id"] == response.headers["X-Job-Id"]


async def test_ndjson_failure_is_told_in_the_summary(make_client: MakeClient) -> None:
    client, _ = await make_client()
    response = await client.post("/generate", json={"prompts": ["fine", FAIL]}, headers={"Accept": "application/x-ndjson"})
    lines = [json.loads(line) for line in (await response.read()).splitlines() if line]
    summary = lines[-1]
    assert response.status == 200 and summary["type"] == "summary"
    assert summary["success"] is False and summary["state"] == "failed" and "deliberate" in summary["detail"]
    assert summary["images_total"] == 2


async def test_a_cancelled_job_ends_its_waiting_generate_with_409(make_client: MakeClient) -> None:
    client, transport = await make_client(FakeTransport(seconds_per_shard=2.0), heartbeat_interval=5.0, max_batch=1)
    answer = asyncio.ensure_future(client.post("/generate", json={"prompts": ["a", "b", "c"]}))
    while not transport.sent:
        await asyncio.sleep(0.01)
    job_id = transport.sent[0].request_id
    cancelled = await client.delete(f"/jobs/{job_id}")
    assert cancelled.status == 200 and (await cancelled.json())["state"] == "cancelled"
    response = await answer
    body = await response.json()
    assert response.status == 409 and body["job_id"] == job_id and "cancelled" in body["detail"]
    assert len(transport.sent) == 1, "the queued shards of a cancelled job never run"
    again = await client.delete(f"/jobs/{job_id}")
    assert again.status == 409


async def test_post_jobs_answers_at_once_and_get_follows_to_the_result(make_client: MakeClient) -> None:
    client, _ = await make_client(FakeTransport(seconds_per_shard=0.2), max_batch=1)
    created = await client.post("/jobs", json={"prompts": ["x", "y"], "seed": 3, "return_format": "url"})
    body = await created.json()
    assert created.status == 202 and created.headers["Location"] == f"/jobs/{body['job_id']}" == body["location"]
    assert body["state"] == "queued" and body["seeds"] == [3, 4]
    running = await (await client.get(body["location"])).json()
    assert running["state"] in ("queued", "running") and "images" not in running
    for _ in range(100):
        status = await (await client.get(body["location"])).json()
        if status["state"] == "done":
            break
        await asyncio.sleep(0.05)
    assert status["success"] is True and status["images_done"] == 2 and len(status["images"]) == 2
    for url, seed in zip(status["images"], (3, 4), strict=True):
        assert url.startswith(str(client.make_url("/images/")))
        image = await client.get("/" + url.split("/", 3)[3])
        assert image.status == 200 and await image.read() == fake_png(seed)


async def test_no_ready_worker_is_503_with_retry_after(make_client: MakeClient) -> None:
    client, _ = await make_client(FakeTransport(ready=False))
    response = await client.post("/generate", json={"prompts": ["a"]})
    assert response.status == 503 and response.headers["Retry-After"]
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["workers"][0]["state"] == "starting"
