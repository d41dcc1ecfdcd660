"""Faults with real processes: killed workers, poison shards, out of memory, bursts, hang-ups,
start failures. Each must end in a clear outcome with nothing lost and no other request harmed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from gpu_workers.pool import KILL_GRACE_SECONDS
from gpu_workers.shard_rules import FIRST_RESTART_DELAY, MAX_SHARD_LOSSES
from tests.pipelines import CRASH, HANG, HUGE
from tests.server_process import ServerProcess
from tests.timing import longest_worker_start, median_seconds, patience, scaled, seconds

SHARD_TIMEOUT = 3.0  # the hanging server's --shard-timeout
INNOCENT_IMAGES = 6  # the request beside the hung one
ACCEPTED = re.compile(r"job [0-9a-f]{32}: \d+ image\(s\)")


def post(server: ServerProcess, body: dict, timeout: float = 180) -> requests.Response:
    return requests.post(server.url + "/generate", json=body, timeout=timeout)


def in_background(function, *args) -> dict:
    """Run ``function(*args)`` in a thread; the returned dict gets ``result`` and ``finished_at``."""
    box: dict = {}

    def run() -> None:
        box["result"] = function(*args)
        box["finished_at"] = time.monotonic()

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


# ----- worker death ----------------------------------------------------------------------------


def test_sigkill_mid_request_loses_nothing_and_changes_no_byte(server: ServerProcess, two_workers: ServerProcess) -> None:
    request = {"prompts": [f"subject {i}" for i in range(6)], "num_images_per_prompt": 2, "seed": 777}
    undisturbed = post(server, request).json()
    before = two_workers.health()
    call = in_background(post, two_workers, request)
    busy = two_workers.wait_for(
        lambda h: any(w["state"] == "busy" and w["shards_in_flight"] for w in h["workers"]), what="a busy worker"
    )
    victim = next(w for w in busy["workers"] if w["state"] == "busy")
    # A second, or 10 /health round trips of this busy server now (each poll is one, 0.1 s apart);
    # without the sentinel nothing would see the death before the shard timeout (300 s).
    seen_within = scaled(1.0, median_seconds(two_workers.health), 10)
    os.kill(victim["pid"], signal.SIGKILL)
    dead_seen = time.monotonic()
    after_kill = two_workers.wait_for(
        lambda h: h["workers"][victim["id"]]["pid"] != victim["pid"] or h["workers"][victim["id"]]["state"] == "dead",
        timeout=5 * seen_within,
        what="the death seen",
    )
    seen_after = time.monotonic() - dead_seen
    print(f"death seen in {seen_after:.2f} s; limit {seen_within:.2f} s")
    assert seen_after < seen_within, f"death must be seen through the sentinel within a second (or {seen_within:.1f} s here); {seen_after:.1f} s"
    assert after_kill["workers"][victim["id"]]["restarts"] == before["workers"][victim["id"]]["restarts"] + 1
    call["thread"].join(180)
    disturbed = call["result"].json()
    assert disturbed["success"] is True
    assert disturbed["count"] == 12
    assert disturbed["images"] == undisturbed["images"]
    healed = two_workers.wait_for(
        lambda h: all(w["state"] in ("ready", "busy") for w in h["workers"]), timeout=patience(two_workers.log()), what="a replacement"
    )
    assert healed["workers"][victim["id"]]["pid"] != victim["pid"]


@pytest.fixture(scope="module")
def crashing(start_server) -> ServerProcess:
    return start_server("--model", "tests.pipelines:crashing_tiny", "--workers", "2", "--max-batch", "1")


def test_poison_shard_fails_only_its_own_request(crashing: ServerProcess) -> None:
    innocent = in_background(post, crashing, {"prompts": [f"fine {i}" for i in range(6)], "seed": 1})
    poisoned = post(crashing, {"prompts": [f"{CRASH} here"]})
    innocent["thread"].join(180)
    if poisoned.status_code == 200:  # heartbeats may have started before the second crash
        body = poisoned.json()
        assert body["success"] is False
    else:
        assert poisoned.status_code == 500
        body = poisoned.json()
    assert "crashed 2 workers" in body["detail"]
    good = innocent["result"].json()
    assert good["success"] is True and good["count"] == 6
    health = crashing.wait_for(lambda h: all(w["state"] in ("ready", "busy") for w in h["workers"]), timeout=patience(crashing.log()), what="recovery")
    assert sum(w["restarts"] for w in health["workers"]) == 2
    assert post(crashing, {"prompts": ["after the storm"]}).json()["success"] is True


# ----- out of memory ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hanging(start_server) -> ServerProcess:
    return start_server("--model", "tests.pipelines:hanging_tiny", "--workers", "2", "--max-batch", "1", "--shard-timeout", f"{SHARD_TIMEOUT:g}")


def test_a_hung_shard_is_retried_once_then_fails_only_its_own_request(hanging: ServerProcess) -> None:
    """A pipeline that never returns: the worker is replaced after --shard-timeout, the shard is
    retried once on another worker, then its request fails with a detail that says so; a request
    running beside it gets every image, and /health shows what happened."""
    seen: list[dict] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            try:
                seen.append(requests.get(hanging.url + "/health", timeout=5).json())
            except requests.RequestException:
                pass
            time.sleep(0.2)

    # The server is healthy once one worker is: wait for the second, whose first start is no part of the path below.
    hanging.wait_for(lambda h: all(w["state"] == "ready" for w in h["workers"]), timeout=patience(hanging.log()), what="both workers ready")
    # The hung request's longest path: the innocent request's shards ahead of it (6 single-image
    # shards on 2 workers), each of its two holders past the timeout (or killed KILL_GRACE_SECONDS
    # later), and between the two a worker with room: the other one after the two shards it holds,
    # or the replacement after its restart delay and start-up. Twice that, for the polls and messages
    # between the steps. Measured here: one shard's round trip and the slowest worker start-up this
    # server logged. (A quiet machine: some 45 s, the 90 s this limit was before halved.)
    one_shard = seconds(lambda: post(hanging, {"prompts": ["the pace of one shard"]}))
    start_up = longest_worker_start(hanging.log())
    ahead = INNOCENT_IMAGES / 2 * one_shard
    holders = MAX_SHARD_LOSSES * (SHARD_TIMEOUT + KILL_GRACE_SECONDS)
    hang_limit = 2 * (ahead + holders + max(2 * one_shard, FIRST_RESTART_DELAY + start_up))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    innocent = in_background(post, hanging, {"prompts": [f"fine {i}" for i in range(INNOCENT_IMAGES)], "seed": 1})
    started = time.monotonic()
    stuck = post(hanging, {"prompts": [f"{HANG} forever"]}, max(180, 2 * hang_limit))
    took = time.monotonic() - started
    innocent["thread"].join(180)
    watching.set()
    watcher.join(10)
    body = stuck.json()
    if stuck.status_code == 200:  # heartbeats may have started before the second timeout
        assert body["success"] is False
    else:
        assert stuck.status_code == 500
    assert "ran past the shard timeout on 2 workers" in body["detail"] and "3 s" in body["detail"]
    print(f"hung request ended in {took:.1f} s; limit {hang_limit:.1f} s (one shard {one_shard:.1f} s, a worker start-up {start_up:.1f} s)")
    assert took < hang_limit, f"the hung request took {took:.0f} s to end; the limit here: {hang_limit:.0f} s (one shard {one_shard:.1f} s, a worker start-up {start_up:.1f} s)"
    good = innocent["result"].json()
    assert good["success"] is True and good["count"] == INNOCENT_IMAGES
    rows = [w for h in seen for w in h["workers"]]
    assert any(w["state"] in ("stalled", "dead") and "shard timeout" in (w["error"] or "") for w in rows), "/health showed the replacement"
    health = hanging.wait_for(lambda h: all(w["state"] in ("ready", "busy") for w in h["workers"]), timeout=patience(hanging.log()), what="recovery")
    assert sum(w["restarts"] for w in health["workers"]) == 2
    assert all(w["error"] is None for w in health["workers"])
    assert "ran past the shard timeout" in hanging.log()
    assert post(hanging, {"prompts": ["after the hang"]}).json()["success"] is True


@pytest.fixture(scope="module")
def small_gpu(start_server) -> ServerProcess:
    return start_server("--model", "tests.pipelines:small_gpu_tiny", "--workers", "1", "--max-batch", "4")


def test_oom_splits_down_to_single_images_keeping_order_and_seeds(small_gpu: ServerProcess) -> None:
    body = post(small_gpu, {"prompts": ["red", "green", "blue"], "num_images_per_prompt": 2, "seed": 40}).json()
    assert body["success"] is True
    assert body["count"] == 6
    assert body["seeds"] == [40, 41, 42, 43, 44, 45]
    prompts = ["red", "red", "green", "green", "blue", "blue"]
    singles = [post(small_gpu, {"prompts": [p], "seed": 40 + i}).json()["images"][0] for i, p in enumerate(prompts)]
    assert body["images"] == singles  # each image is exactly its own seed's, in request order
    assert small_gpu.health()["workers"][0]["restarts"] == 0


def test_single_image_that_does_not_fit_fails_with_the_oom_detail(small_gpu: ServerProcess) -> None:
    response = post(small_gpu, {"prompts": [f"{HUGE} cathedral"]})
    assert response.status_code == 500
    assert response.json() == {"detail": "Image generation failed: CUDA out of memory", "job_id": response.headers["X-Job-Id"]}
    assert post(small_gpu, {"prompts": ["small chapel"]}).json()["success"] is True
    assert small_gpu.health()["workers"][0]["restarts"] == 0


# ----- overload --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded(start_server) -> ServerProcess:
    return start_server("--model", "tiny", "--workers", "1", "--max-batch", "2", "--max-queued-images", "8")


def test_burst_past_the_queue_bound_gets_503_with_retry_after_at_once(bounded: ServerProcess) -> None:
    first = in_background(post, bounded, {"prompts": ["one", "two", "three"], "num_images_per_prompt": 2})
    bounded.wait_for(lambda h: h["active_requests"] == 1, what="the first request admitted")
    # A second, or 10 /health round trips of this server now: the work ahead is 6 images.
    refused_within = scaled(1.0, median_seconds(bounded.health), 10)
    started = time.monotonic()
    refused = post(bounded, {"prompts": ["four", "five", "six"]})
    refused_after = time.monotonic() - started
    print(f"refused in {refused_after:.2f} s; limit {refused_within:.2f} s")
    assert refused_after < refused_within, f"a refusal must come before any work; {refused_after:.2f} s (limit {refused_within:.2f} s)"
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "limit of 8" in refused.json()["detail"]
    fits = post(bounded, {"prompts": ["seven", "eight"]})
    assert fits.status_code == 200 and fits.json()["count"] == 2
    first["thread"].join(180)
    assert first["result"].json()["count"] == 6


def test_small_request_is_not_starved_by_an_earlier_large_one(server: ServerProcess) -> None:
    big = in_background(post, server, {"prompts": [f"scene {i}" for i in range(16)], "seed": 5})
    server.wait_for(lambda h: h["active_requests"] >= 1 and h["queued_images"] > 0, what="the big request queued")
    small = post(server, {"prompts": ["a quick one"], "seed": 6})
    big["thread"].join(180)
    assert small.json()["count"] == 1
    assert big["result"].json()["count"] == 16
    # Round-robin per shard: the small request waits for at most a shard or two of the big one.
    # The server's own times (accepted, ended): on a busy machine the small request's trip through
    # the client and the API before it is accepted took longer than shards did (a CI run beside two
    # busy loops), and that is not the scheduler's.
    small_job, big_job = (requests.get(f"{server.url}/jobs/{answer.json()['job_id']}", timeout=30).json() for answer in (small, big["result"]))
    assert big_job["finished_at"] - small_job["finished_at"] > 0.5 * (big_job["finished_at"] - small_job["created_at"]), (small_job, big_job)


# ----- client hang-ups -------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def accepted_jobs(server: ServerProcess) -> int:
    """Jobs the server logged as accepted ("job ID: N image(s) ...")."""
    return len(ACCEPTED.findall(server.log()))


def hang_up_after(server: ServerProcess, body: dict, seconds: float) -> None:
    """Send the request, hang up ``seconds`` later; on a machine so busy that the server has not
    accepted the job by then, once it has (else the job would never exist: not what is tested)."""
    payload = json.dumps(body).encode()
    accepted_before = accepted_jobs(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        time.sleep(seconds)
        give_up = time.monotonic() + patience(server.log())
        while accepted_jobs(server) == accepted_before and time.monotonic() < give_up:
            time.sleep(0.05)


def test_hang_ups_leave_their_jobs_running_and_leak_nothing(server: ServerProcess) -> None:
    assert server.process is not None
    post(server, {"prompts": ["warm"]})
    done_before = server.health()["workers"][0]["images_done"]
    fds_before = open_fds(server.process.pid)
    rss_before = rss_mib(server.process.pid)
    for round_ in range(4):
        hang_up_after(server, {"prompts": [f"left behind {round_} {i}" for i in range(3)]}, 0.3)
    health = server.wait_for(
        lambda h: h["active_requests"] == 0 and h["active_jobs"] == 0 and h["queued_images"] == 0,
        timeout=patience(server.log()),
        what="every job of a client that left finished",
    )
    # Every accepted batch is a job: the clients left, their 12 images were made and stored all the same.
    assert health["workers"][0]["images_done"] - done_before == 12
    assert open_fds(server.process.pid) <= fds_before + 2
    # Nothing keeps the PNGs of a client that left in memory: they are on disk, for GET /jobs/{id}.
    assert rss_mib(server.process.pid) - rss_before < 40
    assert server.log().count("the client went away; the job goes on") >= 4
    after = post(server, {"prompts": ["still fine"]})
    assert after.json()["success"] is True


def test_url_images_of_a_client_that_left_are_all_stored(server: ServerProcess) -> None:
    images = server.workdir / "images"
    before = set(images.glob("*.png"))
    hang_up_after(server, {"prompts": [f"keep {i}" for i in range(6)], "return_format": "url"}, 0.4)
    server.wait_for(lambda h: h["active_jobs"] == 0, timeout=patience(server.log()), what="the job of the client that left finished")
    kept = set(images.glob("*.png")) - before
    assert len(kept) == 6, "the job runs to its end without its client and stores every image"


# ----- start failures --------------------------------------------------------------------------


def test_bad_model_path_is_reported_with_its_fix(start_server, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    server = start_server("--model", str(missing), "--workers", "1", healthy=False)
    health = server.wait_for(lambda h: h["workers"][0]["state"] == "failed", what="the start failure")
    assert requests.get(server.url + "/health", timeout=10).status_code == 503
    error = health["workers"][0]["error"]
    assert str(missing) in error and "--model tiny" in error
    refused = post(server, {"prompts": ["x"]})
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert str(missing) in refused.json()["detail"]
    time.sleep(2)
    assert server.health()["workers"][0]["restarts"] == 0, "a start failure must not restart in a loop"
    assert str(missing) in server.log()
