"""Remote workers (``python -m gpu_workers --broker ...``) against a real redis-server.

The test plays the API server's part itself with a plain sync client, exactly as
``gpu_workers.redis_protocol`` says (config key, shard entries, result streams), so these tests
pin the worker side of the protocol independently of ``gpu_workers.redis_broker``. The worker is a
real subprocess started from a temporary folder (nothing shared with the checkout but the code on
PYTHONPATH); one worker serves the whole module and the tests run in file order, the one that
stops it last.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from benchmarks.harness.launch import WorkerBox
from gpu_workers import wire
from gpu_workers.messages import ShardDone, ShardFailed, ShardStarted, ShardTask
from gpu_workers.redis_protocol import (
    GROUP,
    MESSAGE_FIELD,
    MODEL_FIELD,
    PROTOCOL,
    REPLY_TO_FIELD,
    TASK_FIELD,
    Keys,
    WorkerHeartbeat,
    config_json,
)
from gpu_workers.shard_rules import MAX_SHARD_LOSSES
from tests.redis_server import RedisServer, find_redis_server
from tests.timing import scaled

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"
VISIBILITY_TIMEOUT = 2.0
KEYS = Keys()

try:
    find_redis_server()
except RuntimeError as missing:  # the CI script installs it; say so rather than fail obscurely
    pytest.skip(str(missing), allow_module_level=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
    return {**env, "PYTHONPATH": str(REPO)}


@dataclass
class Worker:
    """The module's worker command (the benchmarks' worker box, without our ``SDXL_*``) and how
    long it took to start."""

    box: WorkerBox
    start_s: float = 0.0  # from the command to a ready heartbeat, measured when it started

    @classmethod
    def launch(cls, workdir: Path, url: str, model_cache: Path, *extra: str) -> Worker:
        box = WorkerBox(workdir, ["--broker", url, "--model-cache", str(model_cache), *extra], env=_env(), name="remote worker")
        box.launch()
        return cls(box)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.box.process is not None
        return self.box.process

    def log(self) -> str:
        return self.box.log()

    def patience(self, quiet_s: float, start_ups: float = 1) -> float:
        """A give-up for a wait on this worker: ``quiet_s``, or ``start_ups`` of its measured start-up
        where the machine is busy enough for that to be longer. What is waited for (a shard of a few
        images, an acknowledgement, a heartbeat every 2 s) is less than a start-up, loaded or not."""
        return scaled(quiet_s, self.start_s, start_ups)


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The API server's side: its config is written before any worker starts."""
    # With retries, as the API's client has: a pooled connection that Redis's restart broke is
    # reconnected instead of failing the next command.
    client = redis.Redis.from_url(redis_server.url, decode_responses=False, retry=Retry(ExponentialBackoff(), 3))
    client.set(KEYS.config, config_json(MODEL))
    yield client
    client.close()


def _heartbeats(api: redis.Redis) -> list[WorkerHeartbeat]:
    keys = list(api.scan_iter(match=KEYS.worker_pattern))
    return [WorkerHeartbeat.from_json(value) for value in api.mget(keys) if value is not None] if keys else []


def _wait_until(predicate: Any, timeout: float, what: str, worker: Worker | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.process.poll() is not None:
            pytest.fail(f"the worker exited with {worker.process.returncode} while waiting for {what}:\n{worker.log()}")
        time.sleep(0.05)
    tail = f":\n{worker.log()[-3000:]}" if worker is not None else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}{tail}")


@pytest.fixture(scope="module")
def worker(api: redis.Redis, redis_server: RedisServer, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = Worker.launch(
        tmp_path_factory.mktemp("remote-worker"), redis_server.url, model_cache, "--model", MODEL, "--visibility-timeout", str(VISIBILITY_TIMEOUT)
    )
    launched = time.monotonic()
    try:
        _wait_until(lambda: any(b.state == "ready" for b in _heartbeats(api)), 120, "a ready heartbeat", started)
        started.start_s = time.monotonic() - launched
        yield started
    finally:
        started.box.stop()


def _task(prompts: tuple[str, ...], seeds: tuple[int, ...], request_id: str | None = None) -> ShardTask:
    return ShardTask(request_id or uuid.uuid4().hex, 0, 0, prompts, seeds, None, 0.0)


def _fields(task: ShardTask, reply_to: str, model: str = MODEL) -> dict[bytes, bytes]:
    return {TASK_FIELD: wire.encode(task), REPLY_TO_FIELD: reply_to.encode(), MODEL_FIELD: model.encode()}


def _results(api: redis.Redis, reply_to: str, count: int, timeout: float = 30.0) -> list[Any]:
    """The next ``count`` messages on a result stream, decoded, in order."""
    messages: list[Any] = []
    last = b"0"
    deadline = time.monotonic() + timeout
    while len(messages) < count and time.monotonic() < deadline:
        for _stream, entries in api.xread({reply_to: last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                messages.append(wire.decode(fields[MESSAGE_FIELD]))
    assert len(messages) >= count, f"got {messages!r} on {reply_to} after {timeout} s"
    return messages


def _deliver_to_ghost(api: redis.Redis, fields: dict[bytes, bytes], keys: Keys = KEYS) -> bytes:
    """Add a shard and have a consumer 'ghost' take it in the same transaction, so the worker
    (blocked on new entries) never sees it new: it sits in ghost's pending list, as when a worker
    died holding it."""
    pipe = api.pipeline(transaction=True)
    pipe.xadd(keys.shards, fields)
    pipe.xreadgroup(GROUP, "ghost", {keys.shards: ">"}, count=1)
    entry_id, answer = pipe.execute()
    [[_stream, [(delivered, _)]]] = answer
    assert delivered == entry_id
    return bytes(entry_id)


def _delivered(api: redis.Redis, entry_id: bytes, keys: Keys = KEYS) -> tuple[bytes, int] | None:
    rows = api.xpending_range(keys.shards, GROUP, min=entry_id, max=entry_id, count=1)
    return (rows[0]["consumer"], rows[0]["times_delivered"]) if rows else None


def _gone(api: redis.Redis, entry_id: bytes, keys: Keys = KEYS) -> bool:
    """Acknowledged and deleted: no longer pending, no longer in the stream."""
    return _delivered(api, entry_id, keys) is None and api.xrange(keys.shards, entry_id, entry_id) == []


# ----- (a) a shard round trip gives the same bytes as generating in-process ------------------------


def test_shard_result_matches_in_process_generation(api: redis.Redis, worker: Worker, model_cache: Path) -> None:
    import torch

    from gpu_workers.generation import generate_shard
    from gpu_workers.loading import load_pipeline
    from gpu_workers.receipts import worker_facts

    task = _task(("a lighthouse at dusk", "a red fox in snow"), (11, 12))
    reply_to = KEYS.results("test-a")
    entry_id = api.xadd(KEYS.shards, _fields(task, reply_to))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's --cpu-threads: the thread count changes the bytes
    try:
        facts = worker_facts(MODEL, model_cache, "cpu")
        expected = generate_shard(load_pipeline(MODEL, "cpu", model_cache), task, facts)
    finally:
        torch.set_num_threads(threads)

    started, done = _results(api, reply_to, 2, worker.patience(30, 3))
    assert isinstance(started, ShardStarted) and (started.request_id, started.shard_id) == (task.request_id, 0)
    assert isinstance(done, ShardDone), done
    assert (done.request_id, done.shard_id) == (task.request_id, 0)
    assert done.worker_id == worker_pid(api)  # worker_id is the worker process's pid
    assert len(done.images) == 2
    for png in done.images:
        with Image.open(io.BytesIO(png)) as image:
            assert (image.format, image.size) == ("PNG", (1024, 576))
    assert list(done.images) == expected

    _wait_until(lambda: _gone(api, entry_id), worker.patience(5), "the shard to be acknowledged and deleted")
    assert api.xpending(KEYS.shards, GROUP)["pending"] == 0
    [beat] = _wait_until(lambda: [b for b in _heartbeats(api) if b.images_done >= 2] or None, worker.patience(5), "images_done in the heartbeat")
    assert (beat.state, beat.model, beat.device, beat.error) == ("ready", MODEL, "cpu", None)
    assert 0 < api.ttl(KEYS.worker(beat.name)) <= 10


def worker_pid(api: redis.Redis) -> int:
    [beat] = _heartbeats(api)
    return beat.pid


# ----- (b) a worker for another model (or protocol) is refused ------------------------------------


def test_worker_for_another_model_is_refused(model_cache: Path, tmp_path: Path) -> None:
    """Exit 2 and one line that says what to change; the password never reaches the log."""
    with RedisServer(password="p@ss:w/rd") as server:
        client = redis.Redis.from_url(server.url)
        client.set(KEYS.config, config_json(MODEL))
        result = subprocess.run(
            [sys.executable, "-m", "gpu_workers", "--broker", server.url, "--model-cache", str(model_cache), "--model", "sdxl-lightning-8step"],
            check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )
        # The same check inside a worker process (the API server may change its config later):
        client.set("other:config", '{"protocol": 999, "model": "tiny"}')
        code = (
            "from gpu_workers.messages import WorkerConfig\n"
            "from gpu_workers.remote_worker import remote_worker_main\n"
            f"remote_worker_main(WorkerConfig(0, 'cpu', 'tiny', {str(model_cache)!r}, 1), {server.url!r}, 'other', 2.0)"
        )
        child = subprocess.run(
            [sys.executable, "-c", code],
            check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )
        client.close()
    assert result.returncode == 2, result.stderr
    redacted_url = f"redis://:***@127.0.0.1:{server.port}/0"
    assert (
        f"refused: this worker was started with --model sdxl-lightning-8step but the API server at {redacted_url} "
        "serves model tiny; start it with --model tiny"
    ) in result.stderr
    assert next(line for line in result.stderr.splitlines() if "refused" in line).split()[3] == "ERROR"
    assert child.returncode == 2, child.stderr
    assert f"speaks Redis protocol 999 but this worker speaks protocol {PROTOCOL}" in child.stderr
    for output in (result.stderr, child.stderr):
        assert "p@ss" not in output and "p%40ss" not in output


def test_worker_whose_model_does_not_load_reports_it_and_exits_1(
    api: redis.Redis, redis_server: RedisServer, model_cache: Path, tmp_path: Path
) -> None:
    """The heartbeat says failed, with the loader's message, and stays until it expires so that
    the API's /health can show why; the launcher restarts such a worker after a backoff."""
    keys = Keys("broken")
    api.set(keys.config, config_json("no-such-model"))
    code = (
        "from gpu_workers.messages import WorkerConfig\n"
        "from gpu_workers.remote_worker import remote_worker_main\n"
        f"remote_worker_main(WorkerConfig(0, 'cpu', 'no-such-model', {str(model_cache)!r}, 1), {redis_server.url!r}, 'broken', 2.0)"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 1, child.stderr
    [key] = api.scan_iter(match=keys.worker_pattern)
    beat = WorkerHeartbeat.from_json(api.get(key))
    assert (beat.state, beat.model, beat.images_done) == ("failed", "no-such-model", 0)
    assert beat.error and "no-such-model" in beat.error
    assert 0 < api.ttl(key) <= 10


# ----- (c) a shard held by a dead worker is taken over after the visibility timeout ----------------


def test_shard_of_a_dead_worker_is_taken_over(api: redis.Redis, worker: Worker) -> None:
    task = _task(("a sailing boat",), (21,))
    reply_to = KEYS.results("test-c")
    entry_id = _deliver_to_ghost(api, _fields(task, reply_to))
    assert _delivered(api, entry_id) == (b"ghost", 1)
    took_at = time.monotonic()

    started, done = _results(api, reply_to, 2, worker.patience(30, 3))
    assert time.monotonic() - took_at >= VISIBILITY_TIMEOUT - 0.1, "taken before the visibility timeout"
    assert isinstance(started, ShardStarted)
    assert isinstance(done, ShardDone) and len(done.images) == 1 and done.request_id == task.request_id
    _wait_until(lambda: _gone(api, entry_id), worker.patience(5), "the taken-over shard to be acknowledged")
    assert "took over shard" in worker.log()


# ----- (d) a shard that lost MAX_SHARD_LOSSES holders is failed, not run again -------------------


def test_shard_that_killed_its_holders_fails(api: redis.Redis, worker: Worker) -> None:
    task = ShardTask(uuid.uuid4().hex, 3, 8, ("poison", "poison"), (31, 32), None, 0.0)
    reply_to = KEYS.results("test-d")
    entry_id = _deliver_to_ghost(api, _fields(task, reply_to))
    # A second holder takes it over and dies too: two deliveries, two dead holders.
    api.xclaim(KEYS.shards, GROUP, "ghost-2", min_idle_time=0, message_ids=[entry_id])
    assert _delivered(api, entry_id) == (b"ghost-2", MAX_SHARD_LOSSES)

    [failed] = _results(api, reply_to, 1, worker.patience(30, 3))
    assert isinstance(failed, ShardFailed), failed
    assert (failed.request_id, failed.shard_id) == (task.request_id, 3)
    assert failed.error == (
        f"Image generation failed: images 8-9 crashed {MAX_SHARD_LOSSES} workers (the workers holding them died, "
        "stalled or ran past the shard timeout); the rest of the server is unaffected."
    )
    _wait_until(lambda: _gone(api, entry_id), worker.patience(5), "the failed shard to be acknowledged")
    assert api.xlen(reply_to) == 1, "a ShardStarted was sent for a shard that never ran"


# ----- entries that can never succeed ------------------------------------------------------------


def test_unreadable_entry_is_dropped_and_wrong_model_fails(api: redis.Redis, worker: Worker) -> None:
    garbage = api.xadd(KEYS.shards, {TASK_FIELD: b"\xc1 not msgpack", REPLY_TO_FIELD: b"test-garbage", MODEL_FIELD: MODEL.encode()})
    _wait_until(lambda: _gone(api, garbage), worker.patience(10, 2), "the unreadable entry to be dropped", worker)
    assert "is not a valid shard" in worker.log()
    assert api.exists(b"test-garbage") == 0

    task = _task(("a castle",), (41,))
    reply_to = KEYS.results("test-model")
    entry_id = api.xadd(KEYS.shards, _fields(task, reply_to, model="sdxl-lightning-8step"))
    [failed] = _results(api, reply_to, 1, worker.patience(30, 3))
    assert isinstance(failed, ShardFailed) and failed.request_id == task.request_id
    assert "for model sdxl-lightning-8step but worker" in failed.error and "serves model tiny" in failed.error
    _wait_until(lambda: _gone(api, entry_id), worker.patience(5), "the wrong-model shard to be acknowledged")


# ----- Redis going away is survived -----------------------------------------------------------------


def test_worker_survives_a_redis_restart(api: redis.Redis, redis_server: RedisServer, worker: Worker) -> None:
    """Redis is down for longer than the client's own retries ride over, then restarts empty (no
    stream, no group, no keys): the worker logs the outage once and its end, recreates the group
    and its heartbeat, and takes the next shard."""
    redis_server.kill()
    time.sleep(3.0)
    redis_server.start()
    api.set(KEYS.config, config_json(MODEL))
    task = _task(("after the storm",), (51,))
    reply_to = KEYS.results("test-restart")
    api.xadd(KEYS.shards, _fields(task, reply_to))  # no group yet: the worker makes it (id 0)

    started, done = _results(api, reply_to, 2, worker.patience(40, 4))
    assert isinstance(started, ShardStarted) and isinstance(done, ShardDone)
    _wait_until(lambda: _heartbeats(api), worker.patience(5), "the heartbeat to come back", worker)
    lines = worker.log().splitlines()
    main_lost = [line for line in lines if " ERROR lost Redis at" in line]
    main_back = [line for line in lines if " INFO Redis is back at" in line]
    beat_lost = [line for line in lines if "heartbeat: lost Redis at" in line]
    beat_back = [line for line in lines if "heartbeat: Redis is back at" in line]
    # Logged once per outage, never once per retry; the heartbeat thread may have ridden the
    # outage out on the client's own retries (it writes every 2 s).
    assert (len(main_lost), len(main_back)) == (1, 1), lines
    assert len(beat_lost) == len(beat_back) <= 1, lines


# ----- (e) SIGTERM: finish the shard in hand, then exit 0 and leave no heartbeat ---------------


def test_sigterm_finishes_the_shard_then_exits_cleanly(api: redis.Redis, worker: Worker) -> None:
    task = _task(("last light", "last boat", "last gull", "last wave"), (61, 62, 63, 64))
    reply_to = KEYS.results("test-e")
    entry_id = api.xadd(KEYS.shards, _fields(task, reply_to))
    [started] = _results(api, reply_to, 1, worker.patience(30, 3))
    assert isinstance(started, ShardStarted)
    # The heartbeat thread beats on while the shard generates (about a second for four images).
    _wait_until(lambda: [b for b in _heartbeats(api) if b.state == "busy"], worker.patience(5), "a busy heartbeat", worker)
    worker.process.send_signal(signal.SIGTERM)  # while the shard generates

    assert worker.process.wait(worker.patience(30, 3)) == 0, worker.log()
    messages = _results(api, reply_to, 2, worker.patience(30, 3))
    assert isinstance(messages[1], ShardDone) and len(messages[1].images) == 4
    assert _gone(api, entry_id)
    assert list(api.scan_iter(match=KEYS.worker_pattern)) == []
    assert "stopping after the shard in hand" in worker.log()


# ----- the shard timeout: a living worker keeps a long shard, a hung one loses it -------------------


def test_a_hung_shard_is_kept_while_its_worker_lives_then_given_up_after_two_timeouts(
    api: redis.Redis, redis_server: RedisServer, model_cache: Path, tmp_path: Path
) -> None:
    """A pipeline that never returns, on a box whose worker has --shard-timeout 3 and a visibility
    timeout of 1 s. The shard's first holder (a ghost) died: the worker takes it over and it hangs.
    While it hangs, the worker's heartbeat re-claims it, so it is not delivered again though it is
    held twice the visibility timeout. At 3 s the worker ends itself (exit 3), its launcher restarts
    it, and having lost two holders the shard is failed by the shared retry rule instead of run."""
    keys = Keys("hang")
    model = "tests.pipelines:hanging_tiny"
    api.set(keys.config, config_json(model))
    worker = Worker.launch(tmp_path, redis_server.url, model_cache, "--broker-prefix", "hang", "--shard-timeout", "3", "--visibility-timeout", "1")
    launched = time.monotonic()
    try:
        try:
            api.xgroup_create(keys.shards, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:  # the worker made it first
            assert "BUSYGROUP" in str(exc)
        task = ShardTask(uuid.uuid4().hex, 5, 4, ("HANG here",), (7,), None, 0.0)
        reply_to = keys.results("test-hang")
        entry_id = _deliver_to_ghost(api, {TASK_FIELD: wire.encode(task), REPLY_TO_FIELD: reply_to.encode(), MODEL_FIELD: model.encode()}, keys)
        [started] = _results(api, reply_to, 1, timeout=120)
        worker.start_s = time.monotonic() - launched  # its start-up, and the take-over after 1 s
        assert isinstance(started, ShardStarted)
        time.sleep(2)  # twice the visibility timeout, still inside the shard timeout
        held = _delivered(api, entry_id, keys)
        assert held is not None and held[1] == 2, f"a living worker's shard was delivered again: {held}"
        messages = _results(api, reply_to, 2, worker.patience(90, 3))  # 3 s, a restart, a take-over
        failed = messages[-1]
        assert [type(m) for m in messages] == [ShardStarted, ShardFailed], messages
        assert failed.request_id == task.request_id and failed.reason == "worker_crashes"
        assert failed.error.startswith("Image generation failed: images 4-4 crashed 2 workers")
        _wait_until(lambda: _gone(api, entry_id, keys), worker.patience(10, 2), "the failed shard to be acknowledged", worker)
        text = worker.log()
        assert "ran past the shard timeout" in text and "exited with code 3" in text
    finally:
        worker.box.stop()
