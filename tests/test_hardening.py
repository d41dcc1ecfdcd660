"""Hardened for a public tunnel (issue: connections, admission, memory and storage faults).

In the test's process where a fault needs no process of its own (aiohttp's test server on a real
loopback socket, the real scheduler and fake workers from ``tests/fake_transport.py``); in a
subprocess where the fault is the process's (a port in use).
"""

from __future__ import annotations

import asyncio
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
    assert load_settings(["--api-key", KEY], {}).api_keys() == (KEY,)


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
