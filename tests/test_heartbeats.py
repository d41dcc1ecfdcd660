"""Heartbeats (DESIGN.md section 2) seen by a raw HTTP client, byte by byte."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests.pipelines import FAIL_LATE, FAIL_NOW
from tests.server_process import ServerProcess

INTERVAL = 0.3


@pytest.fixture(scope="module")
def beating_server(start_server) -> ServerProcess:
    return start_server(
        "--model", "tests.pipelines:failing_tiny", "--workers", "1", "--max-batch", "1",
        "--heartbeat-interval", str(INTERVAL),
    )


def read_raw_response(server: ServerProcess, body: dict) -> tuple[bytes, list[tuple[float, bytes]]]:
    """POST over a plain socket; return the head and the body bytes with their arrival times."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        received: list[tuple[float, bytes]] = []
        while chunk := sock.recv(65536):
            received.append((time.monotonic(), chunk))
    raw = b"".join(chunk for _, chunk in received)
    head, _, _ = raw.partition(b"\r\n\r\n")
    return head, received


def dechunk(raw: bytes) -> bytes:
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return body


def test_long_request_gets_leading_spaces_then_valid_json(beating_server: ServerProcess) -> None:
    head, received = read_raw_response(beating_server, {"prompts": ["one", "two", "three", "four"], "seed": 1})
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"application/json" in head.lower()
    body = dechunk(b"".join(chunk for _, chunk in received))
    spaces = len(body) - len(body.lstrip(b" "))
    assert spaces >= 2, "a multi-second request must have sent several heartbeats"
    parsed = json.loads(body)  # leading whitespace is valid JSON
    assert parsed["success"] is True and parsed["count"] == 4


def test_requests_client_parses_a_heartbeat_response(beating_server: ServerProcess) -> None:
    response = requests.post(beating_server.url + "/generate", json={"prompts": ["a", "b", "c"]}, timeout=60)
    assert response.status_code == 200
    assert response.text.startswith(" ")
    assert response.json()["count"] == 3


def test_late_failure_arrives_as_success_false_with_detail(beating_server: ServerProcess) -> None:
    response = requests.post(beating_server.url + "/generate", json={"prompts": [f"{FAIL_LATE} please"]}, timeout=60)
    assert response.status_code == 200  # the status line went out with the first heartbeat
    assert response.text.startswith(" ")
    body = response.json()
    assert body["success"] is False
    assert body["images"] == [] and body["count"] == 0
    assert "Image generation failed" in body["detail"]
    assert "deliberate late failure" in body["detail"]


def test_fast_failure_keeps_its_true_status(beating_server: ServerProcess) -> None:
    response = requests.post(beating_server.url + "/generate", json={"prompts": [f"{FAIL_NOW} please"]}, timeout=60)
    assert response.status_code == 500
    assert not response.text.startswith(" ")
    assert "deliberate failure" in response.json()["detail"]
    assert "Traceback" not in response.text


def test_server_still_serves_after_failures(beating_server: ServerProcess) -> None:
    response = requests.post(beating_server.url + "/generate", json={"prompts": ["fine"]}, timeout=60)
    assert response.json()["success"] is True
    health = requests.get(beating_server.url + "/health", timeout=10).json()
    assert health["workers"][0]["restarts"] == 0
