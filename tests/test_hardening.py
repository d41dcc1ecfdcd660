"""Hardened for a public tunnel (issue: connections, admission, memory and storage faults).

In the test's process where a fault needs no process of its own (aiohttp's test server on a real
loopback socket, the real scheduler and fake workers from ``tests/fake_transport.py``); in a
subprocess where the fault is the process's (a port in use).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.settings import Settings, load_settings
from tests.fake_transport import FakeTransport, fake_engine
from tests.server_process import REPO, free_port

KEY = "a-key-long-enough-0123456789"


async def start(aiohttp_client, tmp_path: Path, transport: FakeTransport, **settings: object) -> TestClient:
    base = Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2)
    config = replace(base, **settings)
    return await aiohttp_client(create_app(config, fake_engine(transport, max_batch=config.max_batch)))


async def raw_exchange(port: int, request: bytes, read_for: float = 1.0) -> bytes:
    """Send bytes as written (a header no client library would send) and read what comes back
    (from a thread: the server under test runs on this event loop)."""
    return await asyncio.to_thread(_exchange, port, request, read_for)


def _exchange(port: int, request: bytes, read_for: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(read_for)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


# ----- admission without races ----------------------------------------------------------------


async def test_concurrent_requests_cannot_pass_the_queue_bound_together(aiohttp_client, tmp_path: Path) -> None:
    """20 POST /jobs of 150 images at once against a bound of 600: exactly 4 fit. Admission counts a
    request's images before it awaits the job database, so none slips through meanwhile."""
    transport = FakeTransport(seconds_per_shard=30.0)  # nothing finishes during the test
    client = await start(aiohttp_client, tmp_path, transport, max_queued_images=600)
    body = {"prompts": [f"p{i}" for i in range(150)]}
    answers = await asyncio.gather(*(client.post("/jobs", json=body) for _ in range(20)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [202] * 4 + [503] * 16
    refused = next(answer for answer in answers if answer.status == 503)
    assert "limit of 600" in (await refused.json())["detail"] and refused.headers["Retry-After"]
    health = await (await client.get("/health")).json()
    assert health["active_jobs"] == 4


async def test_jobs_resumed_after_a_restart_count_against_the_bound(aiohttp_client, tmp_path: Path) -> None:
    """A job of 100 images was unfinished when the server stopped; after the restart (bound 120) it
    resumes before the port takes requests, and a new 40-image batch does not fit beside it."""
    from contract.batch import BatchSpec
    from service.jobs.job_db import JobDatabase

    db = JobDatabase(tmp_path / "jobs.sqlite3")
    db.create("resumed-job", BatchSpec(tuple(f"p{i}" for i in range(100)), 1, 1, None, 0.0, "url", shard_size=4))
    db.close()
    client = await start(aiohttp_client, tmp_path, FakeTransport(seconds_per_shard=30.0), max_queued_images=120)
    refused = await client.post("/jobs", json={"prompts": [f"new {i}" for i in range(40)]})
    assert refused.status == 503 and "100 image(s) are queued" in (await refused.json())["detail"]
    assert (await client.post("/jobs", json={"prompts": [f"new {i}" for i in range(20)]})).status == 202


# ----- text that is not text ------------------------------------------------------------------


@pytest.mark.parametrize("body", [b'{"prompts": ["\\ud800 a lone surrogate"]}', b'{"prompts": ["fine"], "negative_prompt": "\\udfff"}'])
async def test_a_lone_surrogate_is_a_400_not_a_failed_batch(aiohttp_client, tmp_path: Path, body: bytes) -> None:
    transport = FakeTransport()
    client = await start(aiohttp_client, tmp_path, transport)
    response = await client.post("/generate", data=body, headers={"Content-Type": "application/json"})
    answer = await response.json()
    assert response.status == 400 and "lone surrogate" in answer["detail"]
    assert transport.sent == []


# ----- keys -----------------------------------------------------------------------------------


async def test_an_undecodable_key_header_is_a_401(aiohttp_client, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, FakeTransport(), api_key=KEY)
    port = client.server.port
    for header in (b"X-API-Key: \xff\xfe\xc3(", b"Authorization: Bearer \xe2\x28\xa1"):
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"The API key is not valid." in answer


async def test_expect_100_continue_is_answered_after_the_key_and_size_checks(aiohttp_client, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, FakeTransport(), api_key=KEY, max_body_bytes=1000)
    port = client.server.port
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
    no_key = await raw_exchange(port, head + b"Content-Length: 20\r\n\r\n")
    assert no_key.startswith(b"HTTP/1.1 401") and b"100 Continue" not in no_key
    too_big = await raw_exchange(port, head + f"X-API-Key: {KEY}\r\nContent-Length: 5000\r\n\r\n".encode())
    assert too_big.startswith(b"HTTP/1.1 413") and b"100 Continue" not in too_big
    body = b'{"prompts": ["ok"]}'
    fine = await raw_exchange(port, head + f"X-API-Key: {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode(), read_for=0.5)
    assert fine.startswith(b"HTTP/1.1 100 Continue")


@pytest.mark.parametrize(("argv", "environ"), [(["--api-key", "short-key"], {}), ([], {"SDXL_API_KEY": "..."})])
def test_short_keys_are_refused_at_start(argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(argv, environ)
    assert "shorter than 16 characters" in capsys.readouterr().err
    assert [entry.key for entry in load_settings(["--api-key", KEY], {}).api_keys()] == [KEY]


# ----- the port, before anything loads --------------------------------------------------------


def test_a_port_in_use_is_reported_at_once_before_any_worker_starts(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--model", "tiny",
             "--model-cache", str(tmp_path / "cache"), "--image-dir", str(tmp_path / "images"), "--job-db", str(tmp_path / "jobs.db")],
            cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=False,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert "starting" not in result.stderr, "a worker was started before the port was known to be free"
    assert time.monotonic() - started < 30


# ----- connections ----------------------------------------------------------------------------


async def test_a_body_that_does_not_arrive_in_time_is_a_408(aiohttp_client, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, FakeTransport(), body_timeout=0.5)
    started = time.monotonic()
    answer = await raw_exchange(
        client.server.port,
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompts\"",
        read_for=3.0,
    )
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
    assert time.monotonic() - started < 3.5


async def test_one_connection_past_the_cap_is_answered_503_and_closed(tmp_path: Path) -> None:
    """When every connection is busy with a request (idle ones make room instead: tests/test_edge.py)."""
    from aiohttp import web

    from service.__main__ import bind
    from service.edge.connections import CappedSite

    release = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/", ok)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, keepalive_timeout=30)
    await runner.setup()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    site = CappedSite(runner, sock, max_connections=5)
    await site.start()
    try:
        held = await asyncio.to_thread(_open_idle, port, 5)
        for sock_ in held:
            sock_.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.3)  # all five accepted, each busy with its request
        # It sends nothing: the server answers at once, without waiting for a request (a client that
        # sends first may see a reset instead, since the socket is closed to free its file at once).
        answer = await raw_exchange(port, b"", read_for=2.0)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in answer and b"too many open connections" in answer
        assert site.refused == 1 and site.evicted == 0
        release.set()
        for sock_ in held:
            sock_.close()
        await asyncio.sleep(0.3)
        assert site.open == 0
        assert (await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).startswith(b"HTTP/1.1 200")
        # A burst accepted in one go: the cap counts each connection as it is accepted.
        burst = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(20)))
        await asyncio.sleep(0.5)
        answered = [reader for reader, _ in burst if reader.at_eof() or len(reader._buffer) > 0]
        assert len(answered) == 15 and site.open == 5, (len(answered), site.open)
        for _, writer in burst:
            writer.close()
    finally:
        await runner.cleanup()


def _open_idle(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(sock)
    return sockets


def _first_bytes(sockets: list[socket.socket], wait: float) -> list[bytes]:
    """What each socket received within ``wait`` seconds (b"" for nothing yet, or closed silently)."""
    import selectors

    received = {sock: b"" for sock in sockets}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + wait
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                try:
                    chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    chunk = b""
                received[key.fileobj] += chunk  # type: ignore[index]
                if not chunk:
                    selector.unregister(key.fileobj)
    return [received[sock] for sock in sockets]


def test_idle_connections_past_the_file_limit_lose_no_job(tmp_path: Path) -> None:
    """Under a 1,024 open-file limit (hard and soft, as supervisord and systemd set it), 1,100 idle
    connections without a key: past --max-connections the idle longest is closed to make room (or,
    were all busy, the newcomer answered 503 and closed at once), so the server never runs out of files, the job accepted before finishes with every image, idle
    connections are closed after --keepalive-timeout, and the log does not flood."""
    import resource

    import requests

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2400:
        pytest.skip(f"the test process needs 2,400 open files to hold the connections; its hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from tests.server_process import ServerProcess

    server = ServerProcess(
        tmp_path / "server",
        ["--model", "tiny", "--workers", "1", "--max-batch", "2", "--model-cache", str(tmp_path / "cache"),
         "--api-key", KEY, "--keepalive-timeout", "3", "--max-connections", "200"],
        {},
    )
    server.args = ["prlimit", "--nofile=1024:1024", "--", *server.args]
    server.start()
    idle: list[socket.socket] = []
    try:
        job = requests.post(server.url + "/jobs", json={"prompts": ["a", "b", "c", "d"]}, headers={"X-API-Key": KEY}, timeout=10).json()
        idle = _open_idle(server.port, 1100)  # past the 1,024 open files
        first_bytes = _first_bytes(idle, wait=2.0)
        refused = [data for data in first_bytes if data.startswith(b"HTTP/1.1 503")]
        assert all(data in (b"", *refused) for data in first_bytes), "an idle connection got something other than a 503"
        time.sleep(3.5)  # past the keep-alive timeout: the server has closed the idle ones it served
        health = requests.get(server.url + "/health", timeout=5)
        assert health.status_code == 200
        deadline = time.monotonic() + 120
        while (state := requests.get(f"{server.url}/jobs/{job['job_id']}", headers={"X-API-Key": KEY}, timeout=10).json())["state"] != "done":
            assert state["state"] in ("queued", "running"), state
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert state["images_done"] == 4 and len(state["images"]) == 4
        log = server.log()
        assert "Too many open files" not in log
        assert 0 < log.count("idle connection(s) closed to make room") <= 3, "what the cap does must not flood the log"
        assert "at most 200 connections" in log and "API keys: on (1 key(s))" in log
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def unread_generates(port: int, request: dict, count: int = 3) -> list[socket.socket]:
    """``count`` base64 ``POST /generate`` whose clients never read the answer (a tiny receive
    buffer, nothing read): the server's writes to them stall."""
    body = json.dumps(request).encode()
    stalled: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes nothing
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        stalled.append(sock)
    return stalled


def test_a_client_that_reads_nothing_is_cut_off_and_holds_no_memory(start_server) -> None:
    """Three base64 /generate requests whose clients never read: each is cut off --write-timeout
    after its writes stall, the API process lets go of what it held (RSS back near where it was),
    the jobs stay readable, and a SIGTERM then does not wait for them."""
    import psutil
    import requests

    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "4", "--write-timeout", "2", "--heartbeat-interval", "1")
    assert server.process is not None
    api = psutil.Process(server.process.pid)
    before = api.memory_info().rss
    stalled = unread_generates(server.port, {"prompts": [f"unread {i}" for i in range(4)], "seed": 9})
    try:
        server.wait_for(lambda h: h["active_requests"] == 3, timeout=30, what="the three requests accepted")
        health = server.wait_for(lambda h: h["active_requests"] == 0 and h["active_jobs"] == 0, timeout=120, what="the stalled requests cut off")
        assert health["status"] == "healthy"
        assert server.log().count("the client went away") >= 3
        grown = (api.memory_info().rss - before) / 2**20
        assert grown < 60, f"the API process kept {grown:.0f} MiB for clients that read nothing"
        job_ids = [line.split("job ")[1].split(":")[0] for line in server.log().splitlines() if "the client went away" in line][-3:]
        for job_id in job_ids:
            stored = requests.get(f"{server.url}/jobs/{job_id}", timeout=30).json()
            assert stored["state"] == "done" and len(stored["images"]) == 4
    finally:
        for sock in stalled:
            sock.close()
