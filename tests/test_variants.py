"""Re-rolls belong to their job (``POST /jobs/{id}/variants``): listed by ``GET /jobs/{id}`` for
anyone with the job, carried by its archive beside the image they remake, absent from the job list;
bounded per image, retried safely, refused clearly. In this process: aiohttp's test client over
``create_app`` with the real scheduler, jobs and database and fake workers."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from schemas.variants import MAX_VARIANTS_PER_IMAGE
from tests.test_key_isolation import ALICE, BOB, as_, start, wait_ended

PROMPTS = ["a castle at dawn", "a knight on a hill"]


async def _done_job(client, **fields: object) -> dict:
    made = await (await client.post("/jobs", json={"prompts": PROMPTS, "num_images_per_prompt": 2, "seed": 100, **fields}, headers=as_(ALICE))).json()
    assert (await wait_ended(client, made["job_id"], ALICE))["state"] == "done"
    return made


async def test_a_reroll_is_the_jobs_own_in_its_status_its_archive_and_not_in_the_list(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    job = await _done_job(client, format="webp", quality=70, size="576x1024")
    answer = await client.post(f"/jobs/{job['job_id']}/variants", json={"index": 3, "seed": 777}, headers=as_(ALICE))
    assert answer.status == 202 and answer.headers["Location"].startswith("/jobs/")
    variant = await answer.json()
    assert variant["images_total"] == 1 and variant["seeds"] == [777]
    assert (await wait_ended(client, variant["job_id"], ALICE))["state"] == "done"

    status = await (await client.get(f"/jobs/{job['job_id']}", headers=as_(ALICE))).json()
    [listed] = status["variants"]
    assert listed["index"] == 3 and listed["job_id"] == variant["job_id"] and listed["seed"] == 777 and listed["state"] == "done"
    assert listed["url"].endswith(".webp")
    child = await (await client.get(f"/jobs/{variant['job_id']}", headers=as_(ALICE))).json()
    assert child["prompts"] == [PROMPTS[1]] and (child["size"], child["format"], child["quality"]) == ("576x1024", "webp", 70)

    archive = zipfile.ZipFile(io.BytesIO(await (await client.get(f"/jobs/{job['job_id']}/archive", headers=as_(ALICE))).read()))
    manifest = json.loads(archive.read("manifest.json"))
    original = manifest["images"][3]["file"]
    [carried] = manifest["variants"]
    assert carried["file"] == f"{original.rsplit('.', 1)[0]}_reroll-1_777.webp"
    assert sorted(archive.namelist())[1:].index(carried["file"]) == sorted(archive.namelist())[1:].index(original) + 1, "the pair sorts together"
    assert carried["prompt"] == PROMPTS[1] and carried["seed"] == 777 and carried["job_id"] == variant["job_id"]
    assert len(archive.read(carried["file"])) == carried["bytes"]
    since = json.loads(zipfile.ZipFile(io.BytesIO(await (await client.get(f"/jobs/{job['job_id']}/archive?since=3", headers=as_(ALICE))).read())).read("manifest.json"))
    assert [v["index"] for v in since["variants"]] == [3]
    assert json.loads(zipfile.ZipFile(io.BytesIO(await (await client.get(f"/jobs/{job['job_id']}/archive?since=4", headers=as_(ALICE))).read())).read("manifest.json"))["variants"] == []

    listing = await (await client.get("/jobs", headers=as_(ALICE))).json()
    assert [item["job_id"] for item in listing["jobs"]] == [job["job_id"]], "a re-roll shows with its job, not as a job"
    assert listing["jobs"][0]["prompt"] == PROMPTS[0] and listing["jobs"][0]["quality"] == 70


async def test_the_list_says_the_quality_the_images_have_and_cuts_long_prompts(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    for body in ({"prompts": ["x" * 500], "format": "jpeg"}, {"prompts": ["a boat"]}):
        await client.post("/jobs", json=body, headers=as_(ALICE))
    png, jpeg = (await (await client.get("/jobs", headers=as_(ALICE))).json())["jobs"]
    assert (jpeg["format"], jpeg["quality"]) == ("jpeg", 85), "the default the receipt names, not null"
    assert (png["format"], png["quality"], png["prompt"]) == ("png", None, "a boat")
    assert len(jpeg["prompt"]) == 120 and jpeg["prompt"].endswith("…") and "prompts" not in jpeg


async def test_rerolls_are_bounded_retried_once_and_refused_clearly(aiohttp_client, tmp_path: Path) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    job = await _done_job(client)
    path = f"/jobs/{job['job_id']}/variants"
    first = await client.post(path, json={"index": 0}, headers=as_(ALICE, **{"Idempotency-Key": "reroll-0"}))
    again = await client.post(path, json={"index": 0}, headers=as_(ALICE, **{"Idempotency-Key": "reroll-0"}))
    assert first.status == again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert (await first.json())["job_id"] == (await again.json())["job_id"], "a retried re-roll is the same re-roll, whatever seed it drew"
    other = await client.post(path, json={"index": 1}, headers=as_(ALICE, **{"Idempotency-Key": "reroll-0"}))
    assert other.status == 422

    for _ in range(MAX_VARIANTS_PER_IMAGE - 1):
        assert (await client.post(path, json={"index": 0}, headers=as_(ALICE))).status == 202
    full = await client.post(path, json={"index": 0}, headers=as_(ALICE))
    assert full.status == 409 and f"has {MAX_VARIANTS_PER_IMAGE} re-rolls already" in (await full.json())["detail"]
    assert (await client.post(path, json={"index": 1}, headers=as_(ALICE))).status == 202  # another image has its own count

    beyond = await client.post(path, json={"index": 4}, headers=as_(ALICE))
    assert beyond.status == 400 and (await beyond.json())["detail"] == f"index must be below 4: job {job['job_id']} has 4 image(s)."
    for body in ({}, {"index": "1"}, {"index": 0, "prompt": "x"}, {"index": -1}):
        refused = await client.post(path, json=body, headers=as_(ALICE))
        assert refused.status == 400, body
    nobody = await client.post("/jobs/0123456789abcdef0123456789abcdef/variants", json={"index": 0}, headers=as_(ALICE))
    assert nobody.status == 404
    assert (await client.post(path, json={"index": 0}, headers=as_(BOB))).status == 404  # another key: as if there were no job
