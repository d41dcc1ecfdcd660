"""Issue 25, items 1 and 8, in the test's own process (aiohttp's test client over ``create_app``, the
real scheduler, jobs and database, fake workers: ``tests/fake_transport.py``).

Jobs belong to the key that made them: on every job route another key's job answers byte for byte as
a job that does not exist, the list's cursor says nothing of other keys' ids, an ``Idempotency-Key``
(NDJSON reattach included) never reaches another key's job. ``/metrics`` shows every key's figures,
so it is for operator keys only. And with two or more keys, one key alone cannot fill the queue by
default.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from service.app import create_app
from service.settings import Settings, load_settings
from tests.fake_transport import SLOW, FakeTransport, fake_engine

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
OPS = "ops-key-0123456789abcdefghij"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"isolation-test-secret-0123456789").decode()
NDJSON = {"Accept": "application/x-ndjson"}


async def start(aiohttp_client: Any, tmp_path: Path, transport: FakeTransport | None = None, **settings: object) -> tuple[TestClient, FakeTransport]:
    """Two normal keys and an operator key, named in the key file as the README shows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# the team\nalice:{ALICE}\nbob:{BOB}\nops:{OPS}:operator\n")
    transport = transport or FakeTransport()
    base = Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2, api_key_file=str(keys))
    config = replace(base, **settings)
    return await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch))), transport


def as_(key: str, **headers: str) -> dict[str, str]:
    return {"X-API-Key": key, **headers}


async def answer(client: TestClient, method: str, path: str, key: str) -> tuple[int, str, bytes]:
    body = {"index": 0} if path.endswith("/variants") else None  # a re-roll of the job's first image
    response = await client.request(method, path, headers=as_(key), json=body)
    return response.status, response.content_type, await response.read()


async def wait_ended(client: TestClient, job_id: str, key: str) -> dict[str, Any]:
    for _ in range(400):
        body = await (await client.get(f"/jobs/{job_id}", headers=as_(key))).json()
        if body["state"] not in ("queued", "running"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


JOB_ROUTES = [
    ("GET", "/jobs/{}"),
    ("GET", "/jobs/{}/archive"),
    ("GET", "/jobs/{}/archive?since=1"),
    ("DELETE", "/jobs/{}"),
    ("POST", "/jobs/{}/variants"),
]


async def test_another_keys_job_answers_exactly_as_a_job_that_does_not_exist(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(slow_seconds=60), webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True)
    hook = {"webhook_url": "http://127.0.0.1:9/hook"}  # discard port: nothing answers, the message stays pending
    done = await (await client.post("/jobs", json={"prompts": ["a", "b", "c"], **hook}, headers=as_(ALICE))).json()
    assert (await wait_ended(client, done["job_id"], ALICE))["state"] == "done"
    running = await (await client.post("/jobs", json={"prompts": [f"{SLOW} a"]}, headers=as_(ALICE))).json()
    unknown = secrets.token_hex(16)

    for job_id in (done["job_id"], running["job_id"]):
        for method, template in JOB_ROUTES:
            for other in (BOB, OPS):  # an operator key sees every key's figures, not every key's jobs
                theirs = await answer(client, method, template.format(job_id), other)
                nobodys = await answer(client, method, template.format(unknown), other)
                assert theirs == nobodys, f"{method} {template} of alice's job, asked by another key, differs from an unknown job's"
                assert theirs[0] == 404 and json.loads(theirs[2]) == {"detail": "No such job: it never existed or has expired."}

    # The owner still has everything, and the other keys' DELETE cancelled nothing (nor re-rolled).
    mine = await (await client.get(f"/jobs/{done['job_id']}", headers=as_(ALICE))).json()
    assert mine["success"] is True and len(mine["images"]) == 3 and "variants" not in mine
    assert [hook["state"] for hook in mine["webhooks"]] == ["pending"], "the owner sees the job's webhook status"
    for method, template in JOB_ROUTES[1:3]:
        assert (await client.request(method, template.format(done["job_id"]), headers=as_(ALICE))).status == 200
    assert (await state_of(client, running["job_id"])) in ("queued", "running")
    cancelled = await client.delete(f"/jobs/{running['job_id']}", headers=as_(ALICE))
    assert cancelled.status == 200 and (await cancelled.json())["state"] == "cancelled"


async def state_of(client: TestClient, job_id: str) -> str:
    return (await (await client.get(f"/jobs/{job_id}", headers=as_(ALICE))).json())["state"]


async def test_the_job_lists_cursor_tells_nothing_of_other_keys_jobs(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    ids = [(await (await client.post("/jobs", json={"prompts": [p]}, headers=as_(ALICE))).json())["job_id"] for p in ("a", "b")]
    bobs = (await (await client.post("/jobs", json={"prompts": ["c"]}, headers=as_(BOB))).json())["job_id"]
    theirs = await answer(client, "GET", f"/jobs?before={ids[1]}", BOB)
    nobodys = await answer(client, "GET", f"/jobs?before={secrets.token_hex(16)}", BOB)
    assert theirs == nobodys and theirs[0] == 400
    page = await (await client.get(f"/jobs?before={ids[1]}", headers=as_(ALICE))).json()
    assert [job["job_id"] for job in page["jobs"]] == [ids[0]], "the owner's cursor works"
    listed = await (await client.get("/jobs", headers=as_(BOB))).json()
    assert [job["job_id"] for job in listed["jobs"]] == [bobs]


async def ndjson_lines(client: TestClient, body: dict[str, Any], key: str, idempotency_key: str) -> tuple[int, str | None, list[dict[str, Any]]]:
    response = await client.post("/generate", json=body, headers=as_(key, **NDJSON, **{"Idempotency-Key": idempotency_key}))
    lines = [json.loads(line) for line in (await response.text()).splitlines() if line.strip()]
    return response.status, response.headers.get("Idempotent-Replayed"), lines


async def test_an_idempotency_key_never_reaches_another_keys_job(aiohttp_client, tmp_path: Path) -> None:
    """A replay (NDJSON reattach on /generate, POST /jobs) finds only the caller's own jobs: another
    key's Idempotency-Key is answered as a key never used, a new job, and never as alice's 422."""
    client, transport = await start(aiohttp_client, tmp_path)
    body = {"prompts": ["a", "b"], "seed": 5}
    status, replayed, first = await ndjson_lines(client, body, ALICE, "render-1")
    alices_job = first[0]["job_id"]
    assert status == 200 and replayed is None and first[-1]["type"] == "summary"
    status, replayed, again = await ndjson_lines(client, body, ALICE, "render-1")
    assert (status, replayed, again[0]["job_id"]) == (200, "true", alices_job), "the owner reattaches"
    sent = len(transport.sent)

    reused = await ndjson_lines(client, body, BOB, "render-1")
    fresh = await ndjson_lines(client, body, BOB, "never-used")
    assert reused[:2] == fresh[:2] == (200, None)
    assert [line["type"] for line in reused[2]] == [line["type"] for line in fresh[2]]
    assert reused[2][0]["job_id"] not in (alices_job, fresh[2][0]["job_id"]), "bob's own new job"
    assert len(transport.sent) > sent, "bob's jobs ran"

    await client.post("/jobs", json=body, headers=as_(ALICE, **{"Idempotency-Key": "render-2"}))
    other_body = {"prompts": ["c"]}
    conflict = await client.post("/jobs", json=other_body, headers=as_(ALICE, **{"Idempotency-Key": "render-2"}))
    assert conflict.status == 422, "the owner's reuse with another body is a conflict"
    reused_jobs = await client.post("/jobs", json=other_body, headers=as_(BOB, **{"Idempotency-Key": "render-2"}))
    fresh_jobs = await client.post("/jobs", json=other_body, headers=as_(BOB, **{"Idempotency-Key": "never-used-2"}))
    assert (reused_jobs.status, fresh_jobs.status) == (202, 202)
    assert "Idempotent-Replayed" not in reused_jobs.headers and "Idempotent-Replayed" not in fresh_jobs.headers


async def test_metrics_are_for_operator_keys(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    await client.post("/jobs", json={"prompts": ["a"]}, headers=as_(ALICE))
    refused = await client.get("/metrics", headers=as_(BOB))
    assert refused.status == 403 and "operator key" in (await refused.json())["detail"]
    assert (await client.get("/metrics")).status == 401
    scraped = await client.get("/metrics", headers=as_(OPS))
    assert scraped.status == 200 and 'sdxl_accepted_images_total{key="alice"} 1.0' in await scraped.text()

    # The key of --api-key is an operator key; a server without keys keeps /metrics open.
    flagged, _ = await start(aiohttp_client, tmp_path / "flag", api_key="flag-key-0123456789abcdef")
    assert (await flagged.get("/metrics", headers=as_("flag-key-0123456789abcdef"))).status == 200
    assert (await flagged.get("/metrics", headers=as_(ALICE))).status == 403
    open_, _ = await start(aiohttp_client, tmp_path / "open", api_key_file="")
    assert (await open_.get("/metrics")).status == 200


def test_key_file_marks_operator_keys_and_old_lines_keep_their_meaning(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    bare = "bare-key-0123456789abcdef"
    keys.write_text(f"alice:{ALICE}\nops:{OPS}:operator\n{bare}:operator\nbob:{BOB}\n")
    entries = load_settings(["--api-key-file", str(keys)], {}).api_keys()
    assert [(entry.name, entry.key, entry.operator) for entry in entries] == [
        ("alice", ALICE, False), ("ops", OPS, True), (entries[2].name, bare, True), ("bob", BOB, False),
    ]
    assert entries[2].name.startswith("key-") and OPS not in repr(entries)
    flagged = load_settings(["--api-key", "flag-key-0123456789abcdef", "--api-key-file", str(keys)], {}).api_keys()
    assert flagged[0].operator and not flagged[1].operator


def test_the_default_share_per_key() -> None:
    """Half the queue with two or more keys, never less than one largest request; unset with one
    key or none; a value that is set stays."""
    assert Settings().queued_images_per_key(2) == Settings().queued_images_per_key(5) == 300
    assert Settings().queued_images_per_key(1) == Settings().queued_images_per_key(0) == 0
    assert Settings(max_queued_images=200).queued_images_per_key(2) == 150, "a 150-image batch must stay possible"
    assert Settings(max_queued_images_per_key=10).queued_images_per_key(3) == 10


async def test_with_two_keys_and_default_settings_one_key_cannot_fill_the_queue(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(seconds_per_shard=60))
    batch = {"prompts": [f"p{i}" for i in range(150)]}
    for _ in range(2):
        assert (await client.post("/jobs", json=batch, headers=as_(ALICE))).status == 202
    over = await client.post("/jobs", json=batch, headers=as_(ALICE))
    assert over.status == 429 and "share of 300" in (await over.json())["detail"]
    assert (await client.post("/jobs", json=batch, headers=as_(BOB))).status == 202, "bob is still admitted"
