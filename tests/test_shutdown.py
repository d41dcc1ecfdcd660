"""SIGTERM (what supervisord sends on stop): drain in-flight work, refuse new work, exit 0."""

from __future__ import annotations

import re
import signal
import time

import requests

from service.edge.connections import DRAIN_WRITE_SECONDS
from tests.server_process import ServerProcess
from tests.test_faults import in_background, post
from tests.test_hardening import unread_generates
from tests.timing import longest_worker_start, median_seconds, patience, scaled


def stop_limit(server: ServerProcess) -> float:
    """How soon a server told to stop now must have exited: 10 s, or twice the slowest worker
    start-up it logged where the machine is that busy (stopping ends a shard in hand and the worker
    processes). The work it must not wait for, a 30-image job on one worker, takes several start-ups
    on any machine (some 18 s against 4 s quiet, 60 s against 13 s at load 9): both grow alike."""
    return scaled(10.0, longest_worker_start(server.log()), 2)


def draining_within(server: ServerProcess) -> float:
    """A give-up for /health to say draining after a SIGTERM: 5 s, or 50 of its round trips now."""
    return scaled(5.0, median_seconds(server.health), 50)


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "2", "--grace-period", "60")
    call = in_background(post, server, {"prompts": [f"last words {i}" for i in range(6)], "seed": 11})
    # Its job recorded too (a moment after admission; on a busy machine it may come after the SIGTERM,
    # and the drain's log line below would count no job).
    server.wait_for(lambda h: h["active_requests"] == 1 and h["active_jobs"] == 1, what="the request admitted and its job recorded")
    give_up = draining_within(server)
    server.process.send_signal(signal.SIGTERM)
    server.wait_for(lambda h: h["draining"], what="draining", timeout=give_up)
    refused = post(server, {"prompts": ["too late"]})
    assert refused.status_code == 503
    assert "Retry-After" in refused.headers
    assert "shutting down" in refused.json()["detail"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 503
    call["thread"].join(patience(server.log(), 120))
    finished = call["result"].json()
    assert finished["success"] is True and finished["count"] == 6
    assert server.process.wait(30) == 0
    assert "stopped" in server.log()
    # The drain's log line counts what it waits for: the job and its images, not only requests.
    drained = re.search(r"draining (\d+) job\(s\) with (\d+) image\(s\) still to make and (\d+) request\(s\) in flight", server.log())
    assert drained is not None, server.log_tail()
    jobs, images, requests_in_flight = map(int, drained.groups())
    assert (jobs, requests_in_flight) == (1, 1) and 0 < images <= 6  # SIGTERM came right after admission: work was left


def test_grace_period_end_stops_at_once_and_the_job_resumes_after_restart(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--grace-period", "1")
    call = in_background(post, server, {"prompts": [f"long {i}" for i in range(30)]})
    server.wait_for(lambda h: h["active_requests"] == 1, what="the request admitted")
    limit = 1 + stop_limit(server)  # the grace period, then at once
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(2 * limit) == 0
    stopped_in = time.monotonic() - started
    print(f"stopped in {stopped_in:.1f} s; limit {limit:.1f} s")
    assert stopped_in < limit, f"stopped {stopped_in:.1f} s after SIGTERM; the limit here: {limit:.1f} s"
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
    limit, give_up = stop_limit(server), draining_within(server)
    server.process.send_signal(signal.SIGTERM)
    server.wait_for(lambda h: h["draining"], what="draining", timeout=give_up)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(2 * limit) == 0
    stopped_in = time.monotonic() - started
    print(f"stopped in {stopped_in:.1f} s; limit {limit:.1f} s")
    assert stopped_in < limit, f"stopped {stopped_in:.1f} s after the second SIGTERM; the limit here: {limit:.1f} s"
    call["thread"].join(30)
    assert "shutting down" in call["result"].json()["detail"]


def test_the_drain_cuts_off_clients_that_read_nothing_and_their_jobs_keep_their_images(start_server) -> None:
    """Three base64 /generate requests whose clients never read, then SIGTERM. With the default
    --write-timeout and --grace-period (60 s each) the drain still cuts them off a few seconds after
    their writes stall: the server exits within 15 s of the last shard (more on a busy machine, see
    the limit), not at the end of the grace period, and after a restart each job is done with its 4
    images."""
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "4", "--heartbeat-interval", "1")
    assert server.process is not None
    # 15 s, or on a busy machine the write cut-off and twice a worker start-up: the server must not
    # wait for the readers' write timeout or the grace period (60 s each, counted from before).
    limit = scaled(15.0, DRAIN_WRITE_SECONDS + 2 * longest_worker_start(server.log()), 1)
    stalled = unread_generates(server.port, {"prompts": [f"unread at shutdown {i}" for i in range(4)], "seed": 5})
    try:
        # Their jobs recorded too: with none yet, "active_jobs == 0" below would hold at once.
        server.wait_for(
            lambda h: h["active_requests"] == 3 and h["active_jobs"] == 3, timeout=patience(server.log(), 30), what="the three requests accepted"
        )
        server.process.send_signal(signal.SIGTERM)
        server.wait_for(lambda h: h["draining"] and h["active_jobs"] == 0, timeout=patience(server.log(), 120), what="the last shard done")
        last_shard = time.monotonic()
        assert server.process.wait(max(60, 2 * limit)) == 0
        stopped_in = time.monotonic() - last_shard
        print(f"stopped {stopped_in:.1f} s after the last shard; limit {limit:.1f} s")
        assert stopped_in < limit, f"the drain waited for clients that read nothing: {stopped_in:.1f} s (limit {limit:.1f} s)"
    finally:
        for sock in stalled:
            sock.close()
    job_ids = [line.split("job ")[1].split(":")[0] for line in server.log().splitlines() if "the client went away" in line]
    assert len(job_ids) == 3
    server.start(healthy=False)  # the stored jobs answer before the worker is ready
    for job_id in job_ids:
        stored = requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
        assert stored["state"] == "done" and len(stored["images"]) == 4
