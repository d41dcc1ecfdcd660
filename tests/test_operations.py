"""Issue 17 in the test's own process: /metrics that move with the work and pass Prometheus's own
``promtool check metrics``, named API keys, and fair shares between keys (round-robin, a per-key
bound with 429). Issue 24: every known series at 0 from the first scrape, no ``_created`` series,
/health and the docs never refusals. The real scheduler, jobs and database; fake workers
(``tests/fake_transport.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from contract.states import JobState
from service.app import create_app
from service.settings import Settings, load_settings
from tests.debian_packages import PROBLEMS
from tests.fake_transport import FAIL, FakeTransport, fake_engine

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
OPS = "ops-key-0123456789abcdefgh"  # an operator key: /metrics shows every key's figures (tests/test_key_isolation.py)


async def start(aiohttp_client: Any, tmp_path: Path, transport: FakeTransport, **settings: object) -> TestClient:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# the team\nalice:{ALICE}\nbob:{BOB}\nops:{OPS}:operator\n")
    base = Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2, api_key_file=str(keys))
    config = replace(base, **settings)
    return await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch)))


def as_(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics", headers=as_(OPS))
    assert response.status == 200 and response.content_type == "text/plain"
    return parsed(await response.text())


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def promtool_check(text: str) -> None:
    """Prometheus's own linter: no error and no remark (skips where the Debian package is missing)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROBLEMS.get("promtool", "promtool (Debian package prometheus) is not installed"))
    checked = subprocess.run([promtool, "check", "metrics"], check=False, input=text, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", "no lint remarks either"


async def test_metrics_move_with_the_work_and_need_a_key(aiohttp_client, tmp_path: Path) -> None:
    transport = FakeTransport(seconds_per_shard=0.3)
    client = await start(aiohttp_client, tmp_path, transport, max_batch=2)
    assert (await client.get("/metrics")).status == 401
    before = await scrape(client)
    assert value(before, "sdxl_images_total", worker="0", outcome="finished") == 0

    created = await (await client.post("/jobs", json={"prompts": ["a", "b", "c", "d", "e", "f"]}, headers=as_(ALICE))).json()
    waiting = await scrape(client)
    assert value(waiting, "sdxl_queue", unit="images") == 4 and value(waiting, "sdxl_queue", unit="shards") == 2, "one shard runs, two wait"
    assert value(waiting, "sdxl_pending_images") == 6
    assert value(waiting, "sdxl_accepted_images_total", key="alice") == 6
    while (await (await client.get(f"/jobs/{created['job_id']}", headers=as_(ALICE))).json())["state"] != "done":
        await asyncio.sleep(0.05)
    failed = await client.post("/generate", json={"prompts": [f"{FAIL} x"]}, headers=as_(BOB))
    assert "deliberate" in await failed.text()
    after = await scrape(client)
    assert value(after, "sdxl_images_total", worker="0", outcome="finished") == 6
    assert value(after, "sdxl_images_total", worker="0", outcome="failed") == 1
    assert value(after, "sdxl_shard_seconds_count") == 3 and value(after, "sdxl_image_seconds_count") == 3
    assert value(after, "sdxl_time_to_first_image_seconds_count") == 1
    assert value(after, "sdxl_jobs", state="done") == 1 and value(after, "sdxl_jobs", state="failed") == 1
    assert value(after, "sdxl_queue", unit="images") == 0 and value(after, "sdxl_pending_images") == 0
    assert value(after, "sdxl_request_duration_seconds_count", route="/jobs", method="POST", status="202") == 1
    assert value(after, "sdxl_refusals_total", status="503") == 0
    transport.ready = False
    assert (await client.post("/jobs", json={"prompts": ["x"]}, headers=as_(BOB))).status == 503
    assert value(await scrape(client), "sdxl_refusals_total", status="503") == 1


async def test_metrics_pass_promtool_check(aiohttp_client, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, FakeTransport())
    await client.post("/generate", json={"prompts": ["a", "b"]}, headers=as_(BOB))
    text = await (await client.get("/metrics", headers=as_(OPS))).text()
    assert "sdxl_images_total" in text
    promtool_check(text)


async def test_the_first_scrape_shows_every_known_series_at_zero_and_health_is_no_refusal(aiohttp_client, tmp_path: Path) -> None:
    """Prometheus's ``increase()`` starts a series at its first sample: a counter born at 1 loses
    that 1. So the first scrape already has each refusal status, key name, job state and known
    worker's outcomes at 0, and no ``_created`` series. A server still starting answers /health
    with 503 to every poll, and its docs are read meanwhile: none of that is a refusal."""
    transport = FakeTransport(workers_count=2, ready=False)
    client = await start(aiohttp_client, tmp_path, transport)
    for _ in range(3):
        assert (await client.get("/health")).status == 503
    for path in ("/docs", "/openapi.json", "/static/swagger/swagger-ui.css"):
        assert (await client.get(path)).status == 200, path
    text = await (await client.get("/metrics", headers=as_(OPS))).text()
    assert "_created" not in text
    first = parsed(text)
    known = [("sdxl_refusals_total", {"status": status}) for status in ("413", "429", "503", "507")]
    known += [("sdxl_accepted_images_total", {"key": name}) for name in ("alice", "bob", "ops")]
    known += [("sdxl_images_total", {"worker": worker, "outcome": outcome}) for worker in ("0", "1") for outcome in ("finished", "failed")]
    known += [("sdxl_jobs", {"state": state.value}) for state in JobState]
    known += [("sdxl_shard_timeouts_total", {}), ("sdxl_refused_connections_total", {})]
    missing = [(name, labels) for name, labels in known if (name, tuple(sorted(labels.items()))) not in first]
    assert missing == [], f"not in the first scrape: {missing}"
    assert all(value(first, name, **labels) == 0 for name, labels in known)
    assert value(first, "sdxl_request_duration_seconds_count", route="/health", method="GET", status="503") == 3
    promtool_check(text)
    # A request for work while no worker is ready is refused, and counted as such.
    assert (await client.post("/jobs", json={"prompts": ["x"]}, headers=as_(BOB))).status == 503
    assert value(await scrape(client), "sdxl_refusals_total", status="503") == 1


async def test_a_key_past_its_share_gets_429_while_the_other_is_served_first(aiohttp_client, tmp_path: Path, caplog) -> None:
    transport = FakeTransport(seconds_per_shard=0.2)
    client = await start(aiohttp_client, tmp_path, transport, max_batch=1, max_queued_images_per_key=4)
    caplog.set_level(logging.INFO, logger="service.access")
    batch = await (await client.post("/jobs", json={"prompts": ["a1", "a2", "a3", "a4"]}, headers=as_(ALICE))).json()
    over = await client.post("/jobs", json={"prompts": ["a5"]}, headers=as_(ALICE))
    assert over.status == 429 and int(over.headers["Retry-After"]) >= 1
    assert "share of 4" in (await over.json())["detail"]
    sent_before = len(transport.sent)
    single = await client.post("/generate", json={"prompts": ["b1"]}, headers=as_(BOB))
    assert single.status == 200 and (await single.json())["success"]
    alice = await (await client.get(f"/jobs/{batch['job_id']}", headers=as_(ALICE))).json()
    assert alice["state"] == "running" and alice["images_done"] < 4, "Bob's one image did not wait for Alice's batch"
    order = [shard.request_id for shard in transport.sent]
    assert order.index(single.headers["X-Job-Id"]) <= sent_before + 1, f"Bob waited for one shard of Alice's at most: {order}"
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "service.access"]
    assert {line["key"] for line in lines if line["route"] in ("/jobs", "/generate")} == {"alice", "bob"}
    assert all(ALICE not in record.getMessage() and BOB not in record.getMessage() for record in caplog.records)


def test_key_file_lines_may_be_named_and_names_must_differ(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{ALICE}\n{BOB}\n")
    entries = load_settings(["--api-key-file", str(keys)], {}).api_keys()
    assert [entry.name for entry in entries] == ["alice", entries[1].name] and entries[1].name.startswith("key-")
    assert [entry.key for entry in entries] == [ALICE, BOB] and ALICE not in repr(entries)
    keys.write_text(f"alice:{ALICE}\nalice:{BOB}\n")
    with pytest.raises(SystemExit):
        load_settings(["--api-key-file", str(keys)], {})
