"""Workers on other boxes through Redis Streams, with a real redis-server and real processes.

The API runs with ``--broker URL --workers 0``; each worker is ``python -m gpu_workers`` started
from a directory of its own (no shared files: images travel as PNG bytes through Redis). What the
local pool promises must hold here too: every image, the same bytes for the same seed, a killed
worker costing nothing but time, and Redis going away ending in a clear error, never a hang.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from benchmarks.harness.launch import WorkerBox
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess
from tests.test_faults import in_background, post

VISIBILITY_TIMEOUT = "3"


class RemoteWorker(WorkerBox):
    """``python -m gpu_workers`` in a directory of its own, as on another box: one worker, started."""

    def __init__(self, workdir: Path, broker: str, model_cache: Path, *args: str) -> None:
        super().__init__(
            workdir, ["--broker", broker, "--workers", "1", "--model-cache", str(model_cache), "--visibility-timeout", VISIBILITY_TIMEOUT, *args],
            name=f"worker box in {workdir.name}",
        )
        self.launch()


@pytest.fixture(scope="module")
def remote(redis_server: RedisServer, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """Start remote workers; every one is stopped at the end of the module."""
    started: list[RemoteWorker] = []

    def start(*args: str) -> RemoteWorker:
        worker = RemoteWorker(tmp_path_factory.mktemp("worker-box"), redis_server.url, model_cache, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def ready(health: dict) -> list[dict]:
    return [w for w in health["workers"] if w["state"] in ("ready", "busy")]


@pytest.fixture(scope="module")
def api(start_server, redis_server: RedisServer, remote) -> ServerProcess:
    server = start_server(
        "--broker", redis_server.url, "--workers", "0", "--model", "tiny", "--max-batch", "2", "--heartbeat-interval", "1",
        healthy=False,
    )
    remote("--model", "tiny")
    remote()  # without --model: serves what the API serves
    server.wait_for(lambda h: len(ready(h)) == 2 and h["status"] == "healthy", timeout=180, what="two remote workers ready")
    return server


REQUEST = {"prompts": [f"far away {i}" for i in range(6)], "num_images_per_prompt": 2, "seed": 4242}


def test_two_remote_workers_give_every_image_byte_identical_to_the_local_pool(api: ServerProcess, server: ServerProcess) -> None:
    local = post(server, REQUEST).json()
    remote_answer = post(api, REQUEST)
    body = remote_answer.json()
    assert body["success"] is True and body["count"] == 12
    assert body["images"] == local["images"]
    assert body["seeds"] == local["seeds"]
    # Heartbeats come every 2 s: the counts catch up within one.
    health = api.wait_for(lambda h: sum(w["images_done"] for w in h["workers"]) >= 12, timeout=10, what="images done in /health")
    assert health["status"] == "healthy" and health["problem"] is None
    assert len(ready(health)) == 2
    assert all("/cpu" in w["device"] for w in health["workers"]), "each row names the worker's box and device"
    assert len({w["pid"] for w in health["workers"]}) == 2


def test_an_api_box_without_local_workers_never_loads_torch(api: ServerProcess) -> None:
    """The API process of ``--workers 0 --broker`` serves requests (the test above) without the
    ~1 GB of torch and CUDA libraries it would never use: none of them is mapped into it."""
    assert api.process is not None
    maps = Path(f"/proc/{api.process.pid}/maps").read_text()
    assert "python" in maps, "the maps of the API process itself"
    assert "libtorch" not in maps and "torch/_C" not in maps
    health = requests.get(api.url + "/health", timeout=10).json()
    assert health["cuda_available"] is False and health["cuda_device"] is None  # CPU workers, told by the workers


def test_a_worker_killed_mid_request_loses_nothing(api: ServerProcess, server: ServerProcess, remote) -> None:
    local = post(server, REQUEST).json()
    call = in_background(post, api, REQUEST)
    busy = api.wait_for(lambda h: any(w["state"] == "busy" for w in h["workers"]), what="a busy remote worker")
    victim = next(w for w in busy["workers"] if w["state"] == "busy")
    os.kill(victim["pid"], signal.SIGKILL)  # the worker process itself, mid-shard
    call["thread"].join(180)
    body = call["result"].json()
    assert body["success"] is True and body["count"] == 12
    assert body["images"] == local["images"], "the shard taken over after the visibility timeout gives the same bytes"
    api.wait_for(lambda h: len(ready(h)) == 2, timeout=120, what="the killed worker replaced by its box's supervisor")


def test_redis_restarted_mid_request_ends_in_a_clear_error_then_works_again(api: ServerProcess, redis_server: RedisServer) -> None:
    call = in_background(post, api, {"prompts": [f"interrupted {i}" for i in range(8)], "seed": 9})
    api.wait_for(lambda h: any(w["state"] == "busy" for w in h["workers"]), what="work under way")
    started = time.monotonic()
    redis_server.kill()
    call["thread"].join(60)
    assert not call["thread"].is_alive(), "a lost Redis must end the request, not hang it"
    answer = call["result"]
    body = answer.json()
    if answer.status_code == 200:
        assert body["success"] is False
    else:
        assert answer.status_code == 503 and "Retry-After" in answer.headers
    assert "Redis" in body["detail"]
    assert time.monotonic() - started < 30
    down = requests.get(api.url + "/health", timeout=10)
    assert down.status_code == 503 and "Redis" in (down.json()["problem"] or "")
    refused = post(api, {"prompts": ["while redis is down"]})
    assert refused.status_code == 503 and "Redis" in refused.json()["detail"]
    redis_server.start()  # same port, empty: the API and the workers reconnect and recreate the group
    api.wait_for(lambda h: len(ready(h)) == 2 and h["status"] == "healthy", timeout=120, what="recovery after Redis is back")
    after = post(api, {"prompts": ["after the outage"], "seed": 1})
    assert after.status_code == 200 and after.json()["success"] is True


def test_a_worker_with_another_model_is_refused_with_a_clear_line(api: ServerProcess, remote) -> None:
    stranger = remote("--model", "sdxl-synthetic")
    assert stranger.process.wait(120) == 2
    assert "refused" in stranger.log() and "tiny" in stranger.log()
