"""Jobs with real servers: a dropped connection, a killed server, NDJSON progress, cancel, expiry.

Every accepted batch is a durable job; these tests take away whatever the job could lean on
(the client's connection, the server process itself) and check that every image still arrives,
byte for byte the same as in an undisturbed run with the same seed.
"""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from tests.server_process import ServerProcess
from tests.test_faults import post
from tests.timing import median_seconds, scaled


@pytest.fixture(scope="module")
def jobs_server(start_server) -> ServerProcess:
    """One worker, one image per shard, a heartbeat every second: jobs of a few images take
    seconds, and a generate request sends its status line (with X-Job-Id) after one second."""
    return start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--heartbeat-interval", "1")


def post_job(server: ServerProcess, body: dict) -> requests.Response:
    return requests.post(server.url + "/jobs", json=body, timeout=30)


def get_job(server: ServerProcess, job_id: str) -> dict:
    response = requests.get(f"{server.url}/jobs/{job_id}", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(server: ServerProcess, job_id: str, predicate, timeout: float = 120, what: str = "the job") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = get_job(server, job_id)
        if predicate(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout} s; last status: {status}\n{server.log_tail()}")


def done(status: dict) -> bool:
    return status["state"] == "done"


# ----- a dropped connection --------------------------------------------------------------------


def generate_and_hang_up(server: ServerProcess, body: dict) -> tuple[str, bytes]:
    """Send /generate over a raw socket, read the status line and headers, then drop the
    connection mid-batch, as a tunnel does. Returns the job id and the status line."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "the server closed before the status line"
            head += chunk
    lines = head.split(b"\r\n")
    headers = dict(line.decode().split(": ", 1) for line in lines[1:] if b": " in line)
    return headers["X-Job-Id"], lines[0]


def test_client_that_drops_mid_batch_fetches_the_full_result_later(jobs_server: ServerProcess) -> None:
    body = {"prompts": [f"dropped {i}" for i in range(6)], "seed": 300}
    undisturbed = post(jobs_server, body).json()
    job_id, status_line = generate_and_hang_up(jobs_server, body)
    assert status_line == b"HTTP/1.1 200 OK"
    dropped_at = get_job(jobs_server, job_id)
    assert dropped_at["images_done"] < 6, "the connection must drop mid-batch for this test to mean anything"
    finished = wait_for_job(jobs_server, job_id, done)
    assert finished["success"] is True
    assert finished["images_done"] == finished["images_total"] == finished["count"] == 6
    assert finished["images"] == undisturbed["images"]
    assert finished["seeds"] == undisturbed["seeds"] == list(range(300, 306))
    assert finished["job_id"] == job_id
    assert "the job goes on" in jobs_server.log()


def test_post_jobs_answers_202_at_once_and_get_shows_progress(jobs_server: ServerProcess) -> None:
    body = {"prompts": [f"polled {i}" for i in range(4)], "seed": 310, "return_format": "url"}
    within = scaled(2.0, median_seconds(jobs_server.health), 20)  # 2 s, or 20 /health round trips now
    started = time.monotonic()
    created = post_job(jobs_server, body)
    assert time.monotonic() - started < within, "POST /jobs must not wait for the images"
    assert created.status_code == 202
    job = created.json()
    assert created.headers["Location"] == job["location"] == f"/jobs/{job['job_id']}"
    assert created.headers["X-Job-Id"] == job["job_id"]
    assert job["state"] == "queued" and job["images_total"] == 4 and job["seeds"] == [310, 311, 312, 313]
    seen = set()
    while True:
        status = get_job(jobs_server, job["job_id"])
        seen.add(status["images_done"])
        if status["state"] == "done":
            break
        assert "images" not in status, "a running job's status stays small"
        time.sleep(0.05)
    assert len(seen) >= 3, f"progress must be visible image by image, saw {sorted(seen)}"
    urls = status["images"]
    assert len(urls) == 4 and all(url.startswith(jobs_server.url + "/images/") for url in urls)
    pngs = [requests.get(url, timeout=10).content for url in urls]
    direct = post(jobs_server, {**body, "return_format": "base64"}).json()["images"]
    assert [base64.b64encode(png).decode() for png in pngs] == direct


def test_unknown_job_is_404_and_a_finished_one_cannot_be_cancelled(jobs_server: ServerProcess) -> None:
    assert requests.get(jobs_server.url + "/jobs/0123456789abcdef0123456789abcdef", timeout=10).status_code == 404
    assert requests.delete(jobs_server.url + "/jobs/../../etc/passwd", timeout=10).status_code == 404
    job_id = post(jobs_server, {"prompts": ["finished"]}).headers["X-Job-Id"]
    refused = requests.delete(f"{jobs_server.url}/jobs/{job_id}", timeout=10)
    assert refused.status_code == 409
    assert "already ended (done)" in refused.json()["detail"]


def test_done_job_whose_images_were_evicted_says_so(jobs_server: ServerProcess) -> None:
    response = post(jobs_server, {"prompts": ["soon gone"], "return_format": "url"})
    image_id = response.json()["images"][0].rsplit("/", 1)[1].removesuffix(".png")
    (jobs_server.workdir / "images" / f"{image_id}.png").unlink()  # what the disk budget does
    gone = requests.get(f"{jobs_server.url}/jobs/{response.headers['X-Job-Id']}", timeout=10)
    assert gone.status_code == 410
    assert "1 of its images were removed" in gone.json()["detail"]


# ----- NDJSON progress -------------------------------------------------------------------------


def test_ndjson_lines_arrive_as_images_finish(jobs_server: ServerProcess) -> None:
    body = {"prompts": [f"streamed {i}" for i in range(6)], "seed": 320}
    started = time.monotonic()
    arrivals: list[tuple[float, dict]] = []
    with requests.post(
        jobs_server.url + "/generate", json=body, headers={"Accept": "application/x-ndjson"}, stream=True, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        job_id = response.headers["X-Job-Id"]
        for line in response.iter_lines():
            if line:
                arrivals.append((time.monotonic() - started, json.loads(line)))
    kinds = [line["type"] for _, line in arrivals]
    assert kinds[0] == "job" and kinds[-1] == "summary"
    assert arrivals[0][1]["job_id"] == job_id and arrivals[0][1]["images_total"] == 6
    images = [(at, line) for at, line in arrivals if line["type"] == "image"]
    assert sorted(line["index"] for _, line in images) == list(range(6))
    assert all(line["seed"] == 320 + line["index"] for _, line in images)
    summary_at, summary = arrivals[-1]
    assert summary["success"] is True and summary["count"] == 6 and summary["job_id"] == job_id
    # Spread over the job, not all at the end: the first image comes in the first half.
    first_at = images[0][0]
    assert first_at < 0.5 * summary_at, f"first image at {first_at:.2f} s of {summary_at:.2f} s"
    assert images[-1][0] - first_at > 0.4 * summary_at
    by_index = {line["index"]: line["base64"] for _, line in images}
    direct = post(jobs_server, body).json()["images"]
    assert [by_index[i] for i in range(6)] == direct


def test_ndjson_sends_progress_lines_every_heartbeat_interval(jobs_server: ServerProcess) -> None:
    with requests.post(
        jobs_server.url + "/generate",
        json={"prompts": [f"linked {i}" for i in range(6)], "return_format": "url"},
        headers={"Accept": "application/x-ndjson"},
        stream=True,
        timeout=120,
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    progress = [line for line in lines if line["type"] == "progress"]
    assert progress, "a job longer than the heartbeat interval must send progress lines"
    assert all(line["images_total"] == 6 for line in progress)
    done_counts = [line["images_done"] for line in progress]
    assert done_counts == sorted(done_counts)
    urls = [line["url"] for line in lines if line["type"] == "image"]
    assert len(urls) == 6 and all(url.startswith(jobs_server.url + "/images/") for url in urls)


# ----- cancel ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_jobs(start_server) -> ServerProcess:
    return start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--max-queued-images", "8")


def test_cancel_frees_the_queue(bounded_jobs: ServerProcess) -> None:
    first = post_job(bounded_jobs, {"prompts": [f"to cancel {i}" for i in range(8)]}).json()
    refused = post_job(bounded_jobs, {"prompts": ["no room"]})
    assert refused.status_code == 503 and "limit of 8" in refused.json()["detail"]
    cancelled = requests.delete(f"{bounded_jobs.url}/jobs/{first['job_id']}", timeout=10)
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    health = bounded_jobs.wait_for(lambda h: h["active_jobs"] == 0, timeout=30, what="the cancelled job gone")
    assert health["queued_images"] == 0
    status = get_job(bounded_jobs, first["job_id"])
    assert status["state"] == "cancelled" and status["success"] is False
    assert status["images_done"] < 8, "queued images of a cancelled job never run"
    assert "cancelled" in status["detail"]
    room = post_job(bounded_jobs, {"prompts": [f"now fits {i}" for i in range(8)]})
    assert room.status_code == 202
    wait_for_job(bounded_jobs, room.json()["job_id"], done)


def test_generate_of_a_cancelled_job_ends_with_the_cancel(bounded_jobs: ServerProcess) -> None:
    with requests.post(
        bounded_jobs.url + "/generate",
        json={"prompts": [f"cut short {i}" for i in range(6)]},
        headers={"Accept": "application/x-ndjson"},
        stream=True,
        timeout=60,
    ) as response:
        lines = response.iter_lines()
        job = json.loads(next(lines))
        assert requests.delete(f"{bounded_jobs.url}/jobs/{job['job_id']}", timeout=10).status_code == 200
        rest = [json.loads(line) for line in lines if line]
    summary = rest[-1]
    assert summary["type"] == "summary" and summary["success"] is False and summary["state"] == "cancelled"
    assert sum(line["type"] == "image" for line in rest) < 6


# ----- a killed server -------------------------------------------------------------------------


def test_server_killed_mid_batch_resumes_the_job_with_identical_images(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--max-batch", "1")
    body = {"prompts": [f"survivor {i}" for i in range(4)], "num_images_per_prompt": 2, "seed": 330}
    undisturbed = post(server, body).json()
    job = post_job(server, body).json()
    before_kill = wait_for_job(server, job["job_id"], lambda s: s["images_done"] >= 2, what="two images done")
    server.kill()
    assert before_kill["images_done"] < 8, "the kill must come mid-batch"
    server.start()
    finished = wait_for_job(server, job["job_id"], done)
    assert finished["images"] == undisturbed["images"]
    assert finished["seeds"] == undisturbed["seeds"]
    resumed = [line for line in server.log().splitlines() if f"job {job['job_id']} resumes" in line]
    assert resumed, "the job must be resumed from the database"
    done_at_restart = int(resumed[0].split(": ")[-1].split(" of ")[0])
    assert done_at_restart >= before_kill["images_done"], "images finished before the kill are kept, not made again"


# ----- expiry ----------------------------------------------------------------------------------


def test_expired_jobs_and_their_files_are_gone(start_server) -> None:
    server = start_server("--model", "tiny", "--workers", "1", "--image-retention", "2")
    response = post(server, {"prompts": ["short-lived", "also short-lived"], "return_format": "url"})
    job_id = response.headers["X-Job-Id"]
    urls = response.json()["images"]
    files = [server.workdir / "images" / url.rsplit("/", 1)[1] for url in urls]
    assert all(path.is_file() for path in files)
    assert get_job(server, job_id)["expires_at"] is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and requests.get(f"{server.url}/jobs/{job_id}", timeout=10).status_code != 404:
        time.sleep(0.2)
    assert requests.get(f"{server.url}/jobs/{job_id}", timeout=10).status_code == 404
    assert all(requests.get(url, timeout=10).status_code == 404 for url in urls)
    assert not any(path.exists() for path in files)
    with sqlite3.connect(server.workdir / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM job_images WHERE job_id = ?", (job_id,)).fetchone()[0] == 0
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_job_database_path_is_a_setting(tmp_path: Path) -> None:
    from service.settings import load_settings

    assert load_settings(["--job-db", str(tmp_path / "j.sqlite3")], environ={}).job_db_path == tmp_path / "j.sqlite3"
    assert load_settings([], environ={"SDXL_JOB_DB": "/x/jobs.db"}).job_db == "/x/jobs.db"


def test_jobs_and_ndjson_are_in_the_openapi_spec(jobs_server: ServerProcess) -> None:
    spec = requests.get(jobs_server.url + "/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert set(paths["/jobs"]) == {"get", "post"} and {"get", "delete"} <= set(paths["/jobs/{job_id}"])
    assert set(paths["/jobs"]["post"]["responses"]) >= {"202", "400", "503"}
    assert set(paths["/jobs/{job_id}"]["get"]["responses"]) >= {"200", "404", "410"}
    assert "409" in paths["/jobs/{job_id}"]["delete"]["responses"]
    generate_ok = paths["/generate"]["post"]["responses"]["200"]["content"]
    assert generate_ok["application/x-ndjson"]["schema"] == {"$ref": "#/components/schemas/ProgressLine"}
    schemas = spec["components"]["schemas"]
    assert {"job", "image", "progress", "summary"} <= set(schemas["ProgressLine"]["properties"]["type"]["enum"])
    assert "job_id" in schemas["GenerateResponse"]["properties"]
    assert {"queued", "running", "done", "failed", "cancelled"} == set(schemas["JobStatus"]["properties"]["state"]["enum"])
