"""Webhooks in the test's own process: the server (aiohttp's test client over ``create_app``, the
real scheduler, jobs, database and image store, fake workers) and a receiver on a loopback port in
the same event loop. Signatures are checked with the ``standardwebhooks`` package itself.

The receiver is on loopback, so the delivery tests run with ``webhook_allow_private``; the
refusal tests run without it. Names other than ``localhost`` are answered by a stand-in for
``HostResolver.lookup`` (``service/integrations/webhook_addresses.py``): no test resolves or reaches anything
off this machine.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import logging
import os
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook

from contract.batch import BatchSpec
from service.app import create_app
from service.app_keys import JOBS
from service.integrations import webhook_addresses, webhooks
from service.jobs.job_db import CANCELLED, DONE, JobDatabase
from service.jobs.webhook_outbox import (
    Delivery,
    WebhookTarget,
    deliveries,
    message_id,
    next_per_target,
)
from service.settings import Settings, load_settings, validate
from tests.fake_transport import FAIL, SLOW, FakeTransport, fake_engine
from tests.readme import readme_block
from tests.server_process import free_port

SECRET = "whsec_" + base64.b64encode(b"webhook-test-secret-0123456789ab").decode()


# ----- a receiver on loopback --------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers ``statuses`` in turn (then 204); ``hold`` keeps the first request open until
    ``release`` is set; ``delay`` before every answer. Counts deliveries in flight at once."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    hold: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(request.path, dict(request.headers), await request.read(), time.monotonic()))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold and len(self.requests) == 1:
                await self.release.wait()
            await asyncio.sleep(self.delay)
            status = self.statuses.pop(0) if self.statuses else 204
            if 300 <= status < 400:
                return web.Response(status=status, headers={"Location": "/elsewhere"})
            return web.Response(status=status)
        finally:
            self.in_flight -= 1

    def verified(self, index: int) -> dict[str, Any]:
        """The payload of request ``index``, after the package's own signature check."""
        request = self.requests[index]
        return Webhook(SECRET).verify(request.body, request.headers)


@pytest.fixture
async def receiver(aiohttp_server) -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    app.router.add_post("/elsewhere", found.handle)
    server = await aiohttp_server(app)
    found.url = str(server.make_url("/hook"))
    yield found
    found.release.set()  # no handler left waiting when the server closes


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str] | Callable[[], list[str]]]:
    """Made-up host names and what they resolve to (a list, or a function called at each lookup);
    every other name resolves as usual (only ``localhost`` is used)."""
    table: dict[str, list[str] | Callable[[], list[str]]] = {}
    real = webhook_addresses.HostResolver.lookup

    async def resolve(self: webhook_addresses.HostResolver, host: str, port: int) -> list[tuple[int, str]]:
        if host not in table:
            return await real(self, host, port)
        answer = table[host]
        addresses = answer() if callable(answer) else answer
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, address) for address in addresses]

    monkeypatch.setattr(webhook_addresses.HostResolver, "lookup", resolve)
    return table


# ----- the server ----------------------------------------------------------------------------------


async def start(aiohttp_client, tmp_path: Path, transport: FakeTransport | None = None, **settings: object) -> tuple[TestClient, FakeTransport]:
    """A server over ``tmp_path`` (a second call with the same path is the same server restarted)
    that signs webhooks and, unless told otherwise, may call loopback."""
    transport = transport or FakeTransport()
    base = Settings(
        image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2,
        webhook_secret=SECRET, webhook_allow_private=True,
    )
    config = replace(base, **settings)
    client = await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch)))
    return client, transport


async def outbox(client: TestClient, job_id: str) -> list[Delivery]:
    db = client.server.app[JOBS].db
    return await asyncio.to_thread(db.transaction, functools.partial(deliveries, job_id=job_id))


def outbox_on_disk(tmp_path: Path, job_id: str) -> list[Delivery]:
    """The outbox of a stopped server, read from its file."""
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    try:
        return db.transaction(functools.partial(deliveries, job_id=job_id))
    finally:
        db.close()


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


async def submit(client: TestClient, url: str, route: str = "/jobs", **body: object) -> dict:
    response = await client.post(route, json={"prompts": ["a lighthouse"], "seed": 7, "webhook_url": url, **body})
    answer = await response.json()
    assert response.status in (200, 202), answer
    return answer


# ----- delivery: retries, the signature, restarts --------------------------------------------------


async def test_a_failed_first_delivery_is_retried_with_the_same_id_and_a_signature_that_verifies(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses = [500]
    client, _ = await start(aiohttp_client, tmp_path)
    job = await submit(client, receiver.url, prompts=["a lighthouse", "a storm ✓"], return_format="url")
    await eventually(lambda: len(receiver.requests) == 2, what="a second delivery")
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == message_id(job["job_id"], "job.completed")
    assert first.body == second.body and second.at - first.at >= 0.9, "the same message, after the backoff"
    assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])
    assert first.headers["webhook-signature"].startswith("v1,") and first.headers["Content-Type"] == "application/json"
    payload = receiver.verified(0)
    assert receiver.verified(1) == payload
    assert payload["type"] == "job.completed" and payload["timestamp"].endswith("Z")
    data = payload["data"]
    assert (data["job_id"], data["state"], data["images_done"], data["images_total"], data["detail"]) == (job["job_id"], "done", 2, 2, None)
    assert [(image["index"], image["seed"]) for image in data["images"]] == [(0, 7), (1, 8)]
    assert data["job_url"].endswith(f"/jobs/{job['job_id']}")
    link = data["images"][1]["url"]
    assert (await client.get(link[link.index("/images/"):])).status == 200
    tampered = dict(first.headers, **{"webhook-id": "msg_other"})
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(first.body, tampered)
    [delivery] = await eventually(lambda: _delivered(client, job["job_id"]), what="marked delivered")
    assert (delivery.attempts, delivery.last_error) == (2, None)
    shown = (await (await client.get(f"/jobs/{job['job_id']}")).json())["webhooks"]
    assert shown == [{"event": "job.completed", "webhook_id": delivery.message_id, "state": "delivered", "attempts": 2, "last_error": None}]


async def _state_is(client: TestClient, job_id: str, state: str) -> bool:
    return (await (await client.get(f"/jobs/{job_id}")).json())["state"] == state


async def _delivered(client: TestClient, job_id: str) -> list[Delivery] | None:
    rows = await outbox(client, job_id)
    return rows if rows and all(row.state == "delivered" for row in rows) else None


async def test_a_restart_between_two_attempts_delivers_with_the_same_id(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    """/generate this time; the first attempt fails, the server stops, a new one on the same
    database and image folder sends the message again, the same message with a new signature."""
    receiver.statuses = [503]
    client, _ = await start(aiohttp_client, tmp_path)
    job = await submit(client, receiver.url, route="/generate")
    assert job["success"] is True
    await eventually(lambda: len(receiver.requests) == 1, what="the first attempt")
    await eventually(lambda: _attempted(client, job["job_id"]), what="the failure recorded")
    await client.close()
    [pending] = outbox_on_disk(tmp_path, job["job_id"])
    assert (pending.state, pending.attempts, pending.last_error) == ("pending", 1, "HTTP 503")

    await start(aiohttp_client, tmp_path)
    await eventually(lambda: len(receiver.requests) == 2, what="the attempt after the restart")
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]
    assert receiver.verified(1)["data"]["job_id"] == job["job_id"]


async def _attempted(client: TestClient, job_id: str) -> bool:
    return any(row.attempts for row in await outbox(client, job_id))


async def test_a_delivery_cut_by_a_stop_goes_again_after_the_restart(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    """At least once: the receiver holds the first attempt open, the server stops meanwhile; the
    row was never marked, so the next server sends it again, same id."""
    receiver.hold = True
    client, _ = await start(aiohttp_client, tmp_path)
    job = await submit(client, receiver.url)
    await eventually(lambda: len(receiver.requests) == 1, what="the first attempt")
    await client.close()
    [pending] = outbox_on_disk(tmp_path, job["job_id"])
    assert (pending.state, pending.attempts) == ("pending", 0)
    await start(aiohttp_client, tmp_path)
    await eventually(lambda: len(receiver.requests) == 2, what="the attempt after the restart")
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]
    receiver.verified(1)


# ----- events --------------------------------------------------------------------------------------


async def test_image_completed_comes_per_image_where_asked_for(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    client, _ = await start(aiohttp_client, tmp_path, max_batch=2)
    job = await submit(client, receiver.url, prompts=["a", "b", "c"], seed=40, format="webp",
                       webhook_events=["image.completed", "job.completed"])
    await eventually(lambda: len(receiver.requests) == 4, what="three images and the end")
    payloads = [receiver.verified(i) for i in range(4)]
    images = sorted((p["data"] for p in payloads if p["type"] == "image.completed"), key=lambda d: d["index"])
    assert [(d["index"], d["seed"], d["images_total"]) for d in images] == [(0, 40, 3), (1, 41, 3), (2, 42, 3)]
    assert all(d["url"].endswith(".webp") and d["job_id"] == job["job_id"] for d in images)
    assert {p["type"] for p in payloads} == {"image.completed", "job.completed"}
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 4, "each message its own id"
    response = await client.get(images[2]["url"][images[2]["url"].index("/images/"):])
    assert response.status == 200 and response.content_type == "image/webp"


async def test_a_failed_and_a_cancelled_job_send_job_failed(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(slow_seconds=30, workers_count=2), max_batch=1)
    failed = await submit(client, receiver.url, prompts=[f"{FAIL} a"])
    await eventually(lambda: len(receiver.requests) == 1, what="job.failed")
    payload = receiver.verified(0)
    assert payload["type"] == "job.failed" and payload["data"]["job_id"] == failed["job_id"]
    assert payload["data"]["state"] == "failed" and "deliberate" in payload["data"]["detail"]
    cancelled = await submit(client, receiver.url, prompts=[f"{SLOW} b"])
    assert (await client.delete(f"/jobs/{cancelled['job_id']}")).status == 200
    await eventually(lambda: len(receiver.requests) == 2, what="job.failed of the cancelled job")
    data = receiver.verified(1)["data"]
    assert receiver.verified(1)["type"] == "job.failed" and (data["job_id"], data["state"]) == (cancelled["job_id"], "cancelled")
    done = await submit(client, receiver.url, prompts=["c"], webhook_events=["job.failed"])
    await eventually(lambda: _state_is(client, done["job_id"], "done"), what="the third job done")
    await asyncio.sleep(0.2)
    assert len(receiver.requests) == 2 and await outbox(client, done["job_id"]) == [], "not asked for: not sent"


def test_an_end_and_an_image_are_written_once_with_their_transaction(tmp_path: Path) -> None:
    """``finish`` and ``record_shard`` write the messages themselves: a second finish (a running
    shard ending after a cancel) or a shard recorded twice adds none."""
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    target = WebhookTarget("http://hooks.example/x", ("job.completed", "job.failed", "image.completed"), "http://api.example")
    db.create("j1", BatchSpec(("a", "b"), 1, 5, None, 0.0, "url", shard_size=2), webhook=target)
    db.create("j2", BatchSpec(("a",), 1, 5, None, 0.0, "url", shard_size=2))
    woken = []
    db.outbox_written = lambda: woken.append(1)
    db.record_shard("j1", 0, ["a" * 32 + ".png", "b" * 32 + ".png"], [])
    db.record_shard("j1", 0, ["c" * 32 + ".png", "d" * 32 + ".png"], [])
    db.finish("j1", CANCELLED, "Cancelled.")
    db.finish("j1", DONE)
    db.record_shard("j2", 0, ["e" * 32 + ".png"], [])
    db.finish("j2", DONE)
    rows = db.transaction(functools.partial(deliveries, job_id="j1"))
    assert sorted(row.event for row in rows) == ["image.completed", "image.completed", "job.failed"]
    assert db.transaction(functools.partial(deliveries, job_id="j2")) == [] and len(woken) == 2
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as raw:
        bodies = [row[0] for row in raw.execute("SELECT body FROM webhook_outbox WHERE event = 'image.completed' ORDER BY id")]
    assert all("a" * 32 in body or "b" * 32 in body for body in bodies), "the names recorded first"
    db.close()


# ----- refused at submit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "resolves_to", "detail"),
    [
        ("http://127.0.0.1:9/hook", None, "the address 127.0.0.1 is a loopback address"),
        ("http://localhost:9/hook", None, "the host localhost resolves to a loopback address"),
        ("http://[::1]:9/hook", None, "loopback"),
        ("http://[::ffff:127.0.0.1]:9/hook", None, "loopback"),
        ("http://169.254.169.254/latest/meta-data", None, "link-local"),
        ("http://10.1.2.3/hook", None, "a private address"),
        ("https://printer.internal/hook", ["10.0.0.7"], "the host printer.internal resolves to a private address"),
        ("https://half.example/hook", ["93.184.216.34", "192.168.1.20"], "resolves to a private address"),
        ("https://cgnat.example/hook", ["100.64.0.1"], "non-public"),
        ("http://240.0.0.1/hook", None, "reserved"),
        ("http://0.0.0.0:9/hook", None, "unspecified"),
        ("http://224.0.0.1/hook", None, "multicast"),
        ("https://nowhere.example/hook", [], "the host nowhere.example cannot be resolved"),
        # IPv6 forms that carry an IPv4 address are judged as that address (issue 25, item 7)
        ("http://[2002:7f00:1::]/hook", None, "the address 2002:7f00:1:: is a loopback address"),  # 6to4
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", None, "is a loopback address"),  # Teredo, client 127.0.0.1
        ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data", None, "is a link-local address"),  # NAT64 of 169.254.169.254
        ("http://[64:ff9b:1::a00:1]/hook", None, "is a private address"),  # local-use NAT64 of 10.0.0.1
        ("https://sixtofour.example/hook", ["2002:c0a8:114::1"], "the host sixtofour.example resolves to a private address"),
        ("https://teredo.example/hook", ["2001:0:4136:e378:8000:63bf:f5ff:fffe"], "resolves to a private address"),  # 10.0.0.1
        ("https://nat64.example/hook", ["64:ff9b::7f00:1"], "resolves to a loopback address"),
    ],
)
async def test_a_refused_target_is_a_400_at_submit(aiohttp_client, tmp_path: Path, names, url: str, resolves_to: list[str] | None, detail: str) -> None:
    if resolves_to is not None:
        names[url.split("/")[2]] = resolves_to
    client, transport = await start(aiohttp_client, tmp_path, webhook_allow_private=False)
    for route in ("/jobs", "/generate"):
        response = await client.post(route, json={"prompts": ["a"], "webhook_url": url})
        body = await response.json()
        assert response.status == 400 and body["detail"].startswith("webhook_url refused: ") and detail in body["detail"], body
    assert transport.sent == [] and (await (await client.get("/jobs")).json())["jobs"] == []


@pytest.mark.parametrize("url", ["http://0.0.0.0:9/hook", "http://224.0.0.1/hook", "http://[ff02::1]/hook", "http://[2002:e000:1::]/hook"])
async def test_multicast_and_unspecified_stay_refused_where_private_addresses_are_allowed(aiohttp_client, tmp_path: Path, url: str) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    response = await client.post("/jobs", json={"prompts": ["a"], "webhook_url": url})
    detail = (await response.json())["detail"]
    assert response.status == 400 and "never a webhook target" in detail and "--webhook-allow-private" not in detail


async def test_a_host_that_does_not_resolve_in_time_is_a_400(aiohttp_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(self: webhook_addresses.HostResolver, host: str, port: int) -> list[tuple[int, str]]:
        await asyncio.sleep(60)
        return []

    monkeypatch.setattr(webhook_addresses.HostResolver, "lookup", never)
    monkeypatch.setattr(webhook_addresses, "RESOLVE_TIMEOUT", 0.2)
    client, transport = await start(aiohttp_client, tmp_path)
    response = await client.post("/jobs", json={"prompts": ["a"], "webhook_url": "https://slow-dns.example/hook"})
    assert response.status == 400 and "did not resolve within 0.2 s" in (await response.json())["detail"]
    assert transport.sent == []


async def test_a_webhook_url_without_a_secret_is_a_400_that_says_to_set_one(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    client, transport = await start(aiohttp_client, tmp_path, webhook_secret="")
    response = await client.post("/generate", json={"prompts": ["a"], "webhook_url": receiver.url})
    detail = (await response.json())["detail"]
    assert response.status == 400 and "--webhook-secret" in detail and "unsigned webhooks are not sent" in detail
    assert transport.sent == [] and receiver.requests == []
    assert (await client.post("/generate", json={"prompts": ["a"], "webhook_url": None})).status == 200, "null: no webhook"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"webhook_url": "ftp://example.com/hook"}, "absolute http:// or https://"),
        ({"webhook_url": "/hook"}, "absolute http:// or https://"),
        ({"webhook_url": "https://example.com/" + "x" * 2048}, "the limit is 2048"),
        ({"webhook_url": "https://user:pw@example.com/hook"}, "user name or password"),
        ({"webhook_url": "https://exa mple.com/hook"}, "spaces or control characters"),
        ({"webhook_url": "http://2130706433/hook"}, "four decimal numbers"),
        ({"webhook_url": "https://example.com:99999/hook"}, "Not a valid URL"),
        ({"webhook_url": 5}, "Not a valid string"),
        ({"webhook_url": "https://example.com/h", "webhook_events": []}, "at least one event"),
        ({"webhook_url": "https://example.com/h", "webhook_events": ["job.started"]}, "events are: job.completed, job.failed, image.completed"),
        ({"webhook_url": "https://example.com/h", "webhook_events": ["job.failed", "job.failed"]}, "each event once"),
        ({"webhook_events": ["job.completed"]}, "webhook_events: Needs a webhook_url"),
    ],
)
async def test_bad_webhook_fields_are_400_with_a_detail(aiohttp_client, tmp_path: Path, change: dict, field: str) -> None:
    client, transport = await start(aiohttp_client, tmp_path)
    response = await client.post("/jobs", json={"prompts": ["x"], **change})
    assert response.status == 400 and field in (await response.json())["detail"], await response.text()
    assert transport.sent == []


async def test_an_idempotency_key_covers_the_webhook(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    client, transport = await start(aiohttp_client, tmp_path)
    headers = {"Idempotency-Key": "hooked-1"}
    body = {"prompts": ["a"], "webhook_url": receiver.url}
    first = await (await client.post("/jobs", json=body, headers=headers)).json()
    again = await client.post("/jobs", json={**body, "webhook_events": ["job.failed", "job.completed"]}, headers=headers)
    assert again.status == 202 and (await again.json())["job_id"] == first["job_id"], "the default events, named: the same body"
    other = await client.post("/jobs", json={**body, "webhook_url": receiver.url + "?v=2"}, headers=headers)
    assert other.status == 422
    await eventually(lambda: len(receiver.requests) == 1, what="one delivery")
    await asyncio.sleep(0.2)
    assert len(receiver.requests) == 1 and len(transport.sent) == 1


# ----- refused, cut or slow at delivery ------------------------------------------------------------


async def test_a_name_that_resolves_elsewhere_at_delivery_is_never_called(aiohttp_client, tmp_path: Path, names, receiver: Receiver) -> None:
    """DNS rebinding: public at submit, loopback at delivery. The connection goes only to
    addresses the resolver checked, so nothing reaches the receiver on loopback."""
    answers = iter([["93.184.216.34"]])
    names["rebind.example"] = lambda: next(answers, ["127.0.0.1"])
    port = receiver.url.split(":")[2].split("/")[0]
    client, _ = await start(aiohttp_client, tmp_path, webhook_allow_private=False, webhook_max_attempts=1)
    job = await submit(client, f"http://rebind.example:{port}/hook")
    [dead] = await eventually(lambda: _dead(client, job["job_id"]), what="the delivery given up")
    assert "refused" in dead.last_error and "loopback" in dead.last_error and dead.attempts == 1
    assert receiver.requests == []


@pytest.mark.parametrize(
    "carrier", ["2002:7f00:1::", "2001:0:4136:e378:8000:63bf:80ff:fffe", "64:ff9b::7f00:1", "64:ff9b:1::7f00:1"], ids=["6to4", "teredo", "nat64", "nat64-local"]
)
async def test_a_name_that_resolves_to_loopback_inside_ipv6_at_delivery_is_never_called(
    aiohttp_client, tmp_path: Path, names, receiver: Receiver, carrier: str
) -> None:
    """DNS rebinding to an IPv6 address that carries 127.0.0.1: refused at delivery as loopback."""
    answers = iter([["93.184.216.34"]])
    names["rebind6.example"] = lambda: next(answers, [carrier])
    client, _ = await start(aiohttp_client, tmp_path, webhook_allow_private=False, webhook_max_attempts=1)
    job = await submit(client, "http://rebind6.example/hook")
    [dead] = await eventually(lambda: _dead(client, job["job_id"]), what="the delivery given up")
    assert "refused" in dead.last_error and "resolves to a loopback address" in dead.last_error, dead.last_error


@pytest.mark.parametrize(
    ("address", "carried"),
    [
        ("2002:5db8:d822::", "93.184.216.34"),
        ("2001:0:4136:e378:8000:63bf:a247:27dd", "93.184.216.34"),
        ("64:ff9b::5db8:d822", "93.184.216.34"),
        ("64:ff9b:1::5db8:d822", "93.184.216.34"),
        ("::ffff:93.184.216.34", "93.184.216.34"),
    ],
)
def test_an_ipv6_address_that_carries_a_public_ipv4_is_as_public_as_it(address: str, carried: str) -> None:
    """What DNS64 gives an IPv6-only box, a 6to4 or Teredo host: reachable where its IPv4 is."""
    parsed = ipaddress.ip_address(address)
    assert str(webhook_addresses.embedded_ipv4(parsed)[-1]) == carried
    assert webhook_addresses.address_problem(parsed, allow_private=False) is None


async def _dead(client: TestClient, job_id: str) -> list[Delivery] | None:
    rows = await outbox(client, job_id)
    return rows if rows and all(row.state == "dead" for row in rows) else None


async def test_a_checked_name_is_connected_at_the_address_checked(aiohttp_client, tmp_path: Path, names, receiver: Receiver) -> None:
    """The same resolver, where the name's address is allowed: the delivery reaches it, with the
    name (not the address) as the Host."""
    names["receiver.test"] = ["127.0.0.1"]
    port = receiver.url.split(":")[2].split("/")[0]
    client, _ = await start(aiohttp_client, tmp_path)
    await submit(client, f"http://receiver.test:{port}/hook")
    await eventually(lambda: receiver.requests, what="the delivery")
    assert receiver.requests[0].headers["Host"] == f"receiver.test:{port}"
    receiver.verified(0)


async def test_a_redirect_is_not_followed_and_the_last_attempt_gives_the_message_up(aiohttp_client, tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [302, 302]
    client, _ = await start(aiohttp_client, tmp_path, webhook_max_attempts=2)
    with caplog.at_level(logging.INFO, logger="service.integrations.webhooks"):
        job = await submit(client, receiver.url)
        [dead] = await eventually(lambda: _dead(client, job["job_id"]), what="given up after 2 attempts")
    assert dead.attempts == 2 and "redirect (not followed)" in dead.last_error
    [shown] = (await (await client.get(f"/jobs/{job['job_id']}")).json())["webhooks"]
    assert (shown["state"], shown["attempts"], shown["last_error"]) == ("dead", 2, dead.last_error), "the job says its webhook was given up"
    assert [request.path for request in receiver.requests] == ["/hook", "/hook"], "never /elsewhere"
    assert any("given up after 2 attempt(s)" in record.message and record.levelno == logging.WARNING for record in caplog.records)
    db = client.server.app[JOBS].db
    assert await asyncio.to_thread(db.transaction, next_per_target) == [], "a dead message is not sent again"


async def test_a_receiver_slower_than_the_timeout_fails_the_attempt(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    receiver.hold = True  # the first request never gets an answer
    client, _ = await start(aiohttp_client, tmp_path, webhook_timeout=0.3, webhook_max_attempts=1)
    job = await submit(client, receiver.url)
    started = time.monotonic()
    [dead] = await eventually(lambda: _dead(client, job["job_id"]), what="the attempt timed out")
    assert dead.last_error == "no answer within 0.3 s" and time.monotonic() - started < 2


async def test_one_delivery_in_flight_per_target(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    receiver.delay = 0.15
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(workers_count=3))
    for prompt in ("a", "b", "c"):
        await submit(client, receiver.url, prompts=[prompt])
    await eventually(lambda: len(receiver.requests) == 3, what="three deliveries")
    assert receiver.most_in_flight == 1


async def test_deliveries_in_flight_are_bounded_across_targets(aiohttp_client, tmp_path: Path, names, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "MAX_PARALLEL", 1)
    names["second.test"] = ["127.0.0.1"]
    receiver.delay = 0.15
    port = receiver.url.split(":")[2].split("/")[0]
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(workers_count=2))
    await submit(client, receiver.url, prompts=["a"])
    await submit(client, f"http://second.test:{port}/hook", prompts=["b"])
    await eventually(lambda: len(receiver.requests) == 2, what="both targets served")
    assert receiver.most_in_flight == 1


async def test_a_failing_target_is_left_alone_for_its_backoff(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    """Three messages wait for a target that answers 500: one attempt, then nothing for the
    backoff (not one attempt per message), then the next."""
    receiver.statuses = [500] * 10
    client, _ = await start(aiohttp_client, tmp_path, FakeTransport(workers_count=3))
    for prompt in ("a", "b", "c"):
        await submit(client, receiver.url, prompts=[prompt])
    await eventually(lambda: receiver.requests, what="the first attempt")
    await asyncio.sleep(0.7)
    assert len(receiver.requests) == 1
    await eventually(lambda: len(receiver.requests) == 2, timeout=3, what="the attempt after the backoff")
    assert receiver.requests[1].at - receiver.requests[0].at >= 0.9


async def test_the_outbox_goes_with_its_job_at_expiry(aiohttp_client, tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses = [500] * 10  # pending rows go too, not only delivered ones
    client, _ = await start(aiohttp_client, tmp_path, image_retention=0.5)
    job = await submit(client, receiver.url)
    await eventually(lambda: receiver.requests, what="an attempt")
    await eventually(lambda: _gone(client, job["job_id"]), what="the job expired")
    assert await outbox(client, job["job_id"]) == []
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as raw:
        assert raw.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0] == 0


async def _gone(client: TestClient, job_id: str) -> bool:
    return (await client.get(f"/jobs/{job_id}")).status == 404


async def test_a_database_fault_while_marking_sends_the_message_again(aiohttp_client, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivered, but the database cannot record it: the row stays pending, so the message goes
    again (at least once, same id) once the target's short pause is over."""
    faults = [sqlite3.OperationalError("disk I/O error")]
    real = webhooks.mark_delivered

    def flaky(db: sqlite3.Connection, message: str, now: float) -> None:
        if faults:
            raise faults.pop()
        real(db, message, now)

    monkeypatch.setattr(webhooks, "mark_delivered", flaky)
    monkeypatch.setattr(webhooks, "DB_RETRY_SECONDS", 0.2)
    client, _ = await start(aiohttp_client, tmp_path)
    job = await submit(client, receiver.url)
    await eventually(lambda: _delivered(client, job["job_id"]), what="delivered and recorded")
    assert len(receiver.requests) == 2 and receiver.requests[0].body == receiver.requests[1].body
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]


async def test_a_database_fault_while_reading_the_outbox_is_waited_out(aiohttp_client, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    faults = [sqlite3.OperationalError("database is locked")]
    real = webhooks.due_rows

    def flaky(db: sqlite3.Connection, **arguments: Any) -> Any:
        if faults:
            raise faults.pop()
        return real(db, **arguments)

    monkeypatch.setattr(webhooks, "due_rows", flaky)
    monkeypatch.setattr(webhooks, "DB_RETRY_SECONDS", 0.2)
    client, _ = await start(aiohttp_client, tmp_path)
    job = await submit(client, receiver.url)
    await eventually(lambda: _delivered(client, job["job_id"]), what="delivered after the fault")
    assert faults == [] and len(receiver.requests) == 1
    assert any("cannot read the outbox" in record.message for record in caplog.records)


# ----- the README's receiver ---------------------------------------------------------------------


def readme_receiver() -> str:
    """The receiver example of the README's "Webhooks" section, as it is there."""
    return readme_block("### Webhooks", "python")


async def test_the_readme_receiver_verifies_a_delivery_and_refuses_a_forgery(aiohttp_client, tmp_path: Path) -> None:
    script = tmp_path / "receiver.py"
    script.write_text(readme_receiver())
    port = free_port()
    env = {**os.environ, "SDXL_WEBHOOK_SECRET": SECRET, "PORT": str(port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-u", str(script), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}/hooks/sdxl"
        async with aiohttp.ClientSession() as session:
            async def listening() -> bool:
                try:
                    async with session.post(url, data=b"{}") as response:
                        return response.status == 401  # unsigned: refused
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(listening, timeout=10, what="the receiver listening")
            forged = {"webhook-id": "msg_forged", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,bm90IGl0"}
            async with session.post(url, data=b'{"type": "job.completed"}', headers=forged) as response:
                assert response.status == 401
        client, _ = await start(aiohttp_client, tmp_path)
        job = await submit(client, url, return_format="url")
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert line.startswith(f"job {job['job_id']} done: http") and "/images/" in line, line
        await eventually(lambda: _delivered(client, job["job_id"]), what="marked delivered")
    finally:
        process.terminate()
        await process.wait()


# ----- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"webhook_secret": "not-whsec"}, "must start with whsec_"),
        ({"webhook_secret": "whsec_***"}, "is not whsec_ and base64"),
        ({"webhook_secret": "whsec_" + base64.b64encode(b"short").decode()}, "holds 5 bytes; it must hold 24 to 64"),
        ({"webhook_secret": "whsec_" + base64.b64encode(b"x" * 65).decode()}, "holds 65 bytes"),
        ({"webhook_timeout": 0.0}, "--webhook-timeout must be positive"),
        ({"webhook_max_attempts": 0}, "--webhook-max-attempts must be at least 1"),
        ({"max_pending_webhooks_per_key": -1}, "--max-pending-webhooks-per-key must not be negative"),
        ({"webhook_nameservers": "127.0.0.1:53, dns.example"}, "--webhook-nameservers: 'dns.example' is not an IP address or IP:port"),
        ({"webhook_nameservers": "[::1]:99999"}, "'[::1]:99999' is not an IP address"),
    ],
)
def test_webhook_settings_are_checked_at_start(changes: dict, problem: str) -> None:
    problems = validate(replace(Settings(), **changes))
    assert any(problem in text for text in problems), problems
    assert "python -c" in " ".join(problems) or "webhook_secret" not in changes


def test_webhook_switches_read_as_flags_and_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(replace(Settings(), webhook_secret=SECRET)) == []
    assert validate(replace(Settings(), webhook_nameservers="127.0.0.1:5353,::1,[::1]:53")) == []
    assert load_settings(["--webhook-nameservers", "127.0.0.1:5353"], {}).webhook_nameservers == "127.0.0.1:5353"
    assert load_settings([], {"SDXL_MAX_PENDING_WEBHOOKS_PER_KEY": "7"}).max_pending_webhooks_per_key == 7
    assert load_settings(["--webhook-allow-private"], {}).webhook_allow_private is True
    assert load_settings([], {"SDXL_WEBHOOK_ALLOW_PRIVATE": "true"}).webhook_allow_private is True
    assert load_settings(["--no-webhook-allow-private"], {"SDXL_WEBHOOK_ALLOW_PRIVATE": "1"}).webhook_allow_private is False
    assert load_settings([], {"SDXL_WEBHOOK_ALLOW_PRIVATE": "0"}).webhook_allow_private is False
    with pytest.raises(SystemExit):
        load_settings([], {"SDXL_WEBHOOK_ALLOW_PRIVATE": "maybe"})
    assert "SDXL_WEBHOOK_ALLOW_PRIVATE='maybe' is not a valid bool" in capsys.readouterr().err
    assert SECRET not in repr(load_settings(["--webhook-secret", SECRET], {})), "a secret stays out of logs"
