"""SIGTERM (what supervisord sends on stop): drain in-flight work, refuse new work, exit 0."""

from __future__ import annotations

import signal
import time

import requests

from tests.test_faults import in_background, post


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "2", "--grace-period", "60")
    call = in_background(post, server, {"prompts": [f"last words {i}" for i in range(6)], "seed": 11})
    server.wait_for(lambda h: h["active_requests"] == 1, what="the request admitted")
    server.process.send_signal(signal.SIGTERM)
    server.wait_for(lambda h: h["draining"], what="draining", timeout=5)
    refused = post(server, {"prompts": ["too late"]})
    assert refused.status_code == 503
    assert "Retry-After" in refused.headers
    assert "shutting down" in refused.json()["detail"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 503
    call["thread"].join(120)
    finished = call["result"].json()
    assert finished["success"] is True and finished["count"] == 6
    assert server.process.wait(30) == 0
    assert "stopped" in server.log()


def test_grace_period_end_stops_at_once_and_the_job_resumes_after_restart(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--grace-period", "1")
    call = in_background(post, server, {"prompts": [f"long {i}" for i in range(30)]})
    server.wait_for(lambda h: h["active_requests"] == 1, what="the request admitted")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) == 0
    assert time.monotonic() - started < 10
    call["thread"].join(30)
    response = call["result"]
    # Not a failed generation: the server went away, and the job waits for it in the database.
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    job_id = response.headers["X-Job-Id"]
    assert response.json()["job_id"] == job_id
    assert "shutting down" in response.json()["detail"] and f"GET /jobs/{job_id}" in response.json()["detail"]
    server.start()
    resumed = requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
    assert resumed["state"] in ("queued", "running") and resumed["images_total"] == 30
    assert f"job {job_id} resumes" in server.log()
    assert requests.delete(f"{server.url}/jobs/{job_id}", timeout=10).json()["state"] == "cancelled"


def test_second_sigterm_stops_now(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--grace-period", "120")
    call = in_background(post, server, {"prompts": [f"long {i}" for i in range(30)]})
    server.wait_for(lambda h: h["active_requests"] == 1, what="the request admitted")
    server.process.send_signal(signal.SIGTERM)
    server.wait_for(lambda h: h["draining"], what="draining", timeout=5)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) == 0
    assert time.monotonic() - started < 10
    call["thread"].join(30)
    assert "shutting down" in call["result"].json()["detail"]
