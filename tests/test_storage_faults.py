"""The image disk fails, and nothing accepted is lost: a folder that disappears or cannot be written,
a full disk, images that outlive an outage, orphans of a kill. In the test's process (real files,
real SQLite, the real scheduler and fake workers), on a small tmpfs where the test may mount one."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from contract.batch import BatchSpec
from service.app import create_app
from service.jobs.image_store import ImageStore
from service.jobs.job_db import JobDatabase
from service.settings import Settings
from tests.fake_transport import FakeTransport, fake_engine

BIG = 600  # fake pictures of 600x600 noise: about 1 MB each as PNG


async def start(aiohttp_client, tmp_path: Path, transport: FakeTransport, image_dir: Path | None = None, **settings: object) -> TestClient:
    base = Settings(image_dir=str(image_dir or tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2)
    config = replace(base, **settings)
    return await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch)))


async def wait_for_state(client: TestClient, job_id: str, states: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = await (await client.get(f"/jobs/{job_id}")).json()
        if body["state"] in states:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {body}")


async def wait_for_health(client: TestClient, predicate, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = await (await client.get("/health")).json()
        if predicate(health):
            return health
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never matched: {health}")


async def test_a_folder_that_disappears_is_made_again(aiohttp_client, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, FakeTransport())
    shutil.rmtree(tmp_path / "images")
    answer = await (await client.post("/generate", json={"prompts": ["a", "b"], "seed": 1})).json()
    assert answer["success"] is True and answer["count"] == 2
    assert len(list((tmp_path / "images").glob("*.png"))) == 2


async def test_an_unwritable_folder_holds_the_job_until_it_is_usable_again(aiohttp_client, tmp_path: Path) -> None:
    """The image folder is replaced by a file (writes fail with ENOTDIR, as they would on a
    read-only or vanished mount): the job waits instead of failing, /health says why without a
    server path, and once the folder is usable again the job finishes with every image."""
    transport = FakeTransport(seconds_per_shard=0.2)
    client = await start(aiohttp_client, tmp_path, transport, max_batch=1)
    images = tmp_path / "images"
    shutil.rmtree(images)
    images.write_text("not a folder")
    created = await (await client.post("/jobs", json={"prompts": ["a", "b", "c"], "seed": 5})).json()
    health = await wait_for_health(client, lambda h: h["storage"]["problem"])
    assert str(tmp_path) not in json.dumps(health), "a server path reached a client"
    assert "cannot write images" in health["storage"]["problem"]
    refused = await client.post("/jobs", json={"prompts": ["more"]})
    assert refused.status == 507 and str(tmp_path) not in await refused.text()
    assert (await wait_for_state(client, created["job_id"], ("queued", "running", "failed", "done"), 5))["state"] in ("queued", "running")
    images.unlink()  # usable again: the store makes the folder itself
    done = await wait_for_state(client, created["job_id"], ("done", "failed"))
    assert done["state"] == "done" and len(done["images"]) == 3
    health = await wait_for_health(client, lambda h: h["storage"]["problem"] is None)
    assert health["storage"]["free_bytes"] > 0


async def test_expiry_never_removes_the_images_of_an_unfinished_job(aiohttp_client, tmp_path: Path) -> None:
    """A job interrupted at 1 of 2 images, its file an hour old (the server was down far longer
    than the 2 s retention): after the restart it resumes, and its first image is still there."""
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    store = ImageStore(tmp_path / "images", retention_seconds=2)
    job_id = secrets.token_hex(16)
    db.create(job_id, BatchSpec(("a", "b"), 1, 1, None, 0.0, "url", shard_size=1))
    first = store.save(b"\x89PNG made before the outage", "png")
    db.record_shard(job_id, 0, [first], [])
    db.close()
    path = store.path_for(first)
    assert path is not None
    long_ago = time.time() - 3600
    os.utime(path, (long_ago, long_ago))
    client = await start(aiohttp_client, tmp_path, FakeTransport(seconds_per_shard=0.5), image_retention=2)
    done = await wait_for_state(client, job_id, ("done", "failed"))
    await asyncio.sleep(0.6)  # the eviction loop has run since (every 0.5 s at this retention)
    answer = await client.get(f"/jobs/{job_id}")
    assert answer.status == 200 and done["state"] == "done"
    assert len((await answer.json())["images"]) == 2 and path.exists()


async def test_orphans_and_partial_files_are_swept_at_start(aiohttp_client, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / ("ab" * 16 + ".png")).write_bytes(b"an image whose row was never written (a kill)")
    (images / ("cd" * 16 + ".part")).write_bytes(b"half an image")
    await start(aiohttp_client, tmp_path, FakeTransport())
    assert list(images.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 6 MB tmpfs (as root where mounting is allowed; otherwise the test says why it skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}): the full-disk test needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_refuses_with_507_before_work_and_never_fails_an_accepted_job(aiohttp_client, tmp_path: Path, small_disk: Path) -> None:
    transport = FakeTransport(seconds_per_shard=0.3, png_size=BIG)
    client = await start(aiohttp_client, tmp_path, transport, image_dir=small_disk / "images", max_batch=1)
    first = await (await client.post("/generate", json={"prompts": ["a", "b"], "seed": 1})).json()
    assert first["success"] is True  # the store learns the bytes per image
    sent = len(transport.sent)
    too_big = await client.post("/generate", json={"prompts": [f"p{i}" for i in range(10)]})
    detail = (await too_big.json())["detail"]
    assert too_big.status == 507 and "MB" in detail and str(small_disk) not in detail
    assert len(transport.sent) == sent, "a refused batch must not reach a worker"
    # Accepted, then the disk fills up under it: the job waits, and finishes once there is room.
    created = await (await client.post("/jobs", json={"prompts": ["x", "y", "z"], "seed": 2})).json()
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False)
    health = await wait_for_health(client, lambda h: h["storage"]["problem"])
    assert "cannot write images" in health["storage"]["problem"]
    assert (await wait_for_state(client, created["job_id"], ("queued", "running", "failed", "done"), 5))["state"] in ("queued", "running")
    filler.unlink()
    done = await wait_for_state(client, created["job_id"], ("done", "failed"))
    assert done["state"] == "done" and len(done["images"]) == 3
