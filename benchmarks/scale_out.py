"""Scale-out: remote workers through Redis Streams against the local pool, measured in one run.

``--broker redis://...`` moves the workers to other boxes (``python -m gpu_workers``): shards go
through a Redis stream and its consumer group, PNGs come back through a result stream. This script
answers three questions on one machine, in one run, side by side:

1. **Throughput.** The same request (``--images`` images, one prompt each, fixed seed, base64)
   through the local pool with one worker (``python -m service --workers 1``), through the broker
   with one remote worker, and through the broker with two (each remote worker is a
   ``python -m gpu_workers --workers 1`` started from a directory of its own, as on another box).
   Every worker runs one torch thread (``--cpu-threads 1``). The three setups run at the same time
   (idle ones cost nothing but memory), the requests are interleaved round by round (the order
   rotates), and the figure is the median wall time of ``--rounds`` runs, as images/s, with the
   ratios 2-remote / 1-remote and 1-remote / local. The images of every run are compared byte for
   byte. For each run the CPU time of every process involved (workers, API, redis-server; from
   ``psutil``) is divided by the wall time: the cores each process actually got. On a 2-core box
   two workers cannot get two full cores while the API process and redis-server also need some.
2. **Broker overhead per shard**: (median wall of broker-1-worker - median wall of
   local-1-worker) / number of shards, in ms per shard and as % of the local time: what the
   Redis round trips (XAUTOCLAIM, XREADGROUP, XADD of ShardStarted and ShardDone with the PNGs,
   XACK+XDEL, and the API's XREAD/XDEL) cost against the local pool's pipes.
3. **A worker's death.** Two remote workers with ``--visibility-timeout`` (3 s): a request
   starts, ``/health`` is polled until a worker is busy, that worker process (the pid in
   ``/health`` is the worker itself, a child of its box's ``python -m gpu_workers``) is SIGKILLed.
   Its shard stays pending under the dead consumer in Redis until it has been idle for the
   visibility timeout; only then can another worker take it over with ``XAUTOCLAIM``, so the
   visibility timeout (less the time the shard had already been held at the kill) is the floor of
   "kill -> lost shard taken over". The script watches that entry in the stream's pending list
   (``XPENDING``, every 20 ms) and prints kill -> taken over -> done, then kill -> response
   complete, and the extra seconds of the whole request against an undisturbed run of the same
   request made just before (disturbed - undisturbed). The request's extra time also contains the
   work the dead worker would have done: the survivor runs alone until the box's supervisor has
   restarted the killed worker (1 s backoff, then loading the model), so the script also prints
   when the replacement showed up ready in ``/health`` and how many of the request's images it ran.

    python -m benchmarks.scale_out [--images 24] [--max-batch 2] [--rounds 3] [--kills 2]

It starts everything itself on free loopback ports: one ``redis-server`` (``benchmarks.harness.redis_server``,
nothing persisted), the three API servers (``benchmarks.harness.launch``; the two broker ones with
``--workers 0 --broker URL --broker-prefix P``, a prefix each, so they share the Redis) and three
worker boxes; every command is printed. Everything is stopped and every temp dir removed at the
end, also on Ctrl-C or an error (``--keep-logs`` keeps the logs). Not part of the test suite: it
takes about four minutes on a 2-core machine with the tiny model. Exit status 0 when every request
succeeded and all images were byte-identical, 1 otherwise, 2 when the setup could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from benchmarks.harness.launch import ApiServer, Launched, WorkerBox, bench_server, ready_rows
from benchmarks.harness.redis_server import RedisServer
from benchmarks.harness.report import JsonOut, Column, Ratio, load_line, machine_description, report
from benchmarks.harness.sampling import cpu_seconds
from benchmarks.soak import get_health
from gpu_workers import wire
from gpu_workers.messages import ShardTask
from gpu_workers.redis_protocol import GROUP, TASK_FIELD, Keys

CLIENT_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 180.0
BOX_STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 20  # of a log printed when a process failed
PENDING_POLL_S = 0.02
HEALTH_POLL_S = 0.05
WATCH_GRACE_S = 5.0
SEED = 20251124
PROMPT = "a lighthouse in a winter storm, fog, lantern light, variation {}"


# --------------------------------------------------------------------------------------------------
# The processes under test


def quoted(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


@dataclass
class Setup:
    key: str
    label: str
    server: ApiServer
    boxes: list[WorkerBox] = field(default_factory=list)
    prefix: str | None = None

    @property
    def workers(self) -> int:
        return max(1, len(self.boxes))

    @property
    def url(self) -> str:
        return self.server.url


# --------------------------------------------------------------------------------------------------
# One request, with the CPU every process involved used meanwhile


@dataclass
class Run:
    setup: str
    wall: float
    ok: bool
    detail: str
    images: list[str]
    seeds: list[int]
    cores: dict[str, float]  # process label -> CPU seconds / wall seconds


def request_body(images: int, seed: int = SEED) -> dict[str, Any]:
    return {"prompts": [PROMPT.format(i) for i in range(images)], "num_images_per_prompt": 1, "seed": seed, "return_format": "base64"}


def post(session: requests.Session, url: str, body: dict[str, Any]) -> tuple[float, bool, str, list[str], list[int]]:
    started = time.monotonic()
    try:
        response = session.post(url + "/generate", json=body, timeout=CLIENT_TIMEOUT_S)
        wall = time.monotonic() - started
        data = response.json()
    except (requests.RequestException, ValueError) as exc:
        return time.monotonic() - started, False, f"{type(exc).__name__}: {exc}", [], []
    want = len(body["prompts"]) * body["num_images_per_prompt"]
    ok = response.status_code == 200 and data.get("success") is True and data.get("count") == want
    detail = "" if ok else f"HTTP {response.status_code}: {str(data.get('detail'))[:300]}"
    return wall, ok, detail, list(data.get("images") or []), list(data.get("seeds") or [])


def post_alone(url: str, body: dict[str, Any]) -> tuple[float, bool, str, list[str], list[int]]:
    """``post`` from another thread, with a session of its own."""
    with requests.Session() as session:
        return post(session, url, body)


def processes_of(setup: Setup, session: requests.Session, redis_pid: int | None) -> dict[str, int]:
    """label -> pid of every process that works for a request of this setup."""
    pids: dict[str, int] = {}
    for i, row in enumerate(sorted(ready_rows(get_health(session, setup.url)), key=lambda w: w["pid"] or 0)):
        if row.get("pid"):
            pids[f"worker {i + 1}"] = int(row["pid"])
    if setup.server.pid:
        pids["API"] = setup.server.pid
    if setup.prefix is not None and redis_pid:
        pids["redis"] = redis_pid
    return pids


def timed_run(setup: Setup, session: requests.Session, body: dict[str, Any], redis_pid: int | None) -> Run:
    pids = processes_of(setup, session, redis_pid)
    before = {label: cpu_seconds(pid) for label, pid in pids.items()}
    wall, ok, detail, images, seeds = post(session, setup.url, body)
    cores = {label: (cpu_seconds(pid) - before[label]) / wall for label, pid in pids.items()}
    return Run(setup.key, wall, ok, detail, images, seeds, cores)


def describe_cores(cores: dict[str, float]) -> str:
    return ", ".join(f"{label} {value:.2f}" for label, value in cores.items())


# --------------------------------------------------------------------------------------------------
# Part 3: the lost shard, watched in Redis


@dataclass
class LostShard:
    entry: str | None = None
    label: str = ""
    held_at_query: float = 0.0  # seconds since its delivery, when held_by asked
    queried_at: float = 0.0
    idle_at_kill: float = 0.0
    taken_over: float | None = None  # seconds after the kill
    done: float | None = None
    taker: str = ""


def held_by(client: redis.Redis, stream: str, pid: int) -> LostShard | None:
    """The shard the worker with this pid holds now (its consumer name ends in ``-{pid}``): entry id,
    which shard, and how long it has held it; None when it holds none (between two shards)."""
    suffix = f"-{pid}".encode()
    asked = time.monotonic()
    rows = client.xpending_range(stream, GROUP, min="-", max="+", count=100)
    mine = [row for row in rows if bytes(row["consumer"]).endswith(suffix)]
    if not mine:
        return None
    entry = mine[0]["message_id"]
    found = LostShard(entry=entry.decode(), held_at_query=int(mine[0]["time_since_delivered"]) / 1000, queried_at=asked)
    for _id, fields in client.xrange(stream, min=entry, max=entry, count=1):
        task = wire.decode(fields[TASK_FIELD])
        if isinstance(task, ShardTask):
            found.label = f"shard {task.shard_id} (images {task.first_index}-{task.first_index + task.size - 1})"
    return found


def watch_lost_shard(client: redis.Redis, stream: str, victim: int, found: LostShard, killed_at: float, stop: threading.Event) -> LostShard:
    """Poll the dead worker's entry in the pending list until another consumer has claimed it
    (XAUTOCLAIM) and acknowledged it (gone from the list)."""
    assert found.entry is not None
    suffix = f"-{victim}".encode()
    entry = found.entry.encode()
    found.idle_at_kill = found.held_at_query + (killed_at - found.queried_at)
    stopped_at: float | None = None
    while True:
        rows = client.xpending_range(stream, GROUP, min=entry, max=entry, count=1)
        now = time.monotonic() - killed_at
        if not rows:  # acknowledged: its result is already on the API's result stream
            found.done = now
            if found.taken_over is None:
                found.taken_over = now
            return found
        consumer = bytes(rows[0]["consumer"])
        if found.taken_over is None and not consumer.endswith(suffix):
            found.taken_over, found.taker = now, consumer.decode()
        if stop.is_set():  # the response is complete: the acknowledgement follows within moments
            stopped_at = stopped_at or time.monotonic()
            if time.monotonic() - stopped_at > WATCH_GRACE_S:
                return found
        time.sleep(PENDING_POLL_S)


def watch_replacement(url: str, known: set[int], killed_at: float, timeout: float = READY_TIMEOUT_S) -> float | None:
    """Seconds from the kill until /health shows a worker with a new pid ready (or busy): the box's
    supervisor restarted the killed one (1 s backoff, then loading the model). /health lags up to
    a second (the API reads the heartbeat keys once a second)."""
    with requests.Session() as session:
        while time.monotonic() - killed_at < timeout:
            if any(w.get("pid") not in known for w in ready_rows(get_health(session, url))):
                return time.monotonic() - killed_at
            time.sleep(HEALTH_POLL_S)
    return None


def in_background(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        box["result"] = target()
        box["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def our_worker(pid: int, boxes: list[WorkerBox]) -> bool:
    """Only SIGKILL a process that is a child of one of our boxes."""
    try:
        return psutil.Process(pid).ppid() in {box.pid for box in boxes}
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_out",
        description="Local pool vs remote workers through Redis Streams: images/s, broker overhead per shard, "
        "and the time a killed worker costs. Starts its own redis-server, API servers and worker boxes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=24, help="images per request (one prompt each)")
    parser.add_argument("--max-batch", type=int, default=2, help="--max-batch of the API servers (images per shard)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of part 1 (medians)")
    parser.add_argument("--kills", type=int, default=2, help="disturbed runs of part 3")
    parser.add_argument("--visibility-timeout", type=float, default=3.0, help="--visibility-timeout of the remote workers")
    parser.add_argument(
        "--model-cache", default=str(Path.home() / ".cache" / "sdxl-lightning-server"), help="where the tiny model is built"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dirs with the servers' and workers' logs")
    parser.add_argument("--json", help="also write the throughput table, the broker overhead and the kills as JSON here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.max_batch < 1 or args.rounds < 1 or args.kills < 0 or args.visibility_timeout <= 0:
        parser.error("--images, --max-batch and --rounds must be at least 1, --kills not negative, --visibility-timeout positive")
    return args


def start_everything(args: argparse.Namespace, stack: contextlib.ExitStack, launched: list[Launched]) -> tuple[RedisServer, list[Setup]]:
    """Redis, the three API servers and the three worker boxes; each registered for cleanup (and in
    ``launched``, whose logs a failed start prints) before it starts."""
    redis_server = RedisServer()
    stack.callback(redis_server.close)
    print(f"$ {quoted(redis_server.args)}", flush=True)
    redis_server.start()

    def server(workers: int, extra: list[str]) -> ApiServer:
        own = bench_server(workers, args.max_batch, args.model_cache, "--cpu-threads", "1", *extra, prefix="sdxl-scale-out-")
        stack.callback(stop_and_clean, own, args.keep_logs)
        launched.append(own)
        return own

    def box(name: str, prefix: str) -> WorkerBox:
        worker_box = WorkerBox(
            Path(tempfile.mkdtemp(prefix=f"sdxl-scale-out-{name}-")),
            ["--broker", redis_server.url, "--broker-prefix", prefix, "--workers", "1", "--model", "tiny", "--cpu-threads", "1",
             "--model-cache", args.model_cache, "--visibility-timeout", f"{args.visibility_timeout:g}"],
            name=f"worker box {name}",
        )  # fmt: skip
        worker_box.stop_timeout = BOX_STOP_TIMEOUT_S
        stack.callback(stop_and_clean, worker_box, args.keep_logs)
        launched.append(worker_box)
        return worker_box

    local = Setup("local-1", "local pool, 1 worker", server(1, []))
    one = Setup("remote-1", "broker, 1 remote worker", server(0, ["--broker", redis_server.url, "--broker-prefix", "bench1"]), prefix="bench1")
    two = Setup("remote-2", "broker, 2 remote workers", server(0, ["--broker", redis_server.url, "--broker-prefix", "bench2"]), prefix="bench2")
    one.boxes = [box("box1", "bench1")]
    two.boxes = [box("box2a", "bench2"), box("box2b", "bench2")]
    setups = [local, one, two]

    # The boxes first: they wait for their API's config in Redis (and import torch meanwhile).
    for setup in setups:
        for worker_box in setup.boxes:
            print(f"$ (cd {worker_box.workdir} && {quoted(worker_box.args)})", flush=True)
            worker_box.launch()
    started = time.monotonic()
    for setup in setups:
        print(f"$ (cd {setup.server.workdir} && {quoted(setup.server.args)})", flush=True)
        setup.server.start(READY_TIMEOUT_S)  # returns at the first 200 from /health: one worker ready
        setup.server.wait_workers(setup.workers, READY_TIMEOUT_S)
    print(f"   all three setups ready {time.monotonic() - started:.1f} s after the first API start; {load_line()}", flush=True)
    return redis_server, setups


def stop_and_clean(process: Launched, keep: bool) -> None:
    """Stop an API server or a worker box, say so if it did not exit cleanly, remove its folder."""
    code = process.stop()
    if code not in (0, None):
        print(f"{process.name} stopped with exit code {code}; log tail:\n{process.log_tail(LOG_TAIL_LINES)}", file=sys.stderr)
    if not keep:
        shutil.rmtree(process.cwd, ignore_errors=True)


def part_one(args: argparse.Namespace, setups: list[Setup], redis_pid: int | None, session: requests.Session) -> list[Run]:
    body = request_body(args.images)
    shards = -(-args.images // args.max_batch)
    print(
        f"\n== 1. images/s: {args.images} images ({args.images} prompts x 1, seed {SEED}, base64, {shards} shards of "
        f"<= {args.max_batch}), {args.rounds} interleaved rounds ==",
        flush=True,
    )
    for setup in setups:  # not timed: the first request of a server pays for lazy set-up
        warm = post(session, setup.url, request_body(args.max_batch * setup.workers * 2, seed=1))
        if not warm[1]:
            raise RuntimeError(f"warm-up request to {setup.label} failed: {warm[2]}")
    print(f"   warm-up requests done; {load_line()}")
    runs: list[Run] = []
    for round_index in range(args.rounds):
        shift = round_index % len(setups)
        for setup in setups[shift:] + setups[:shift]:
            run = timed_run(setup, session, body, redis_pid)
            runs.append(run)
            state = "ok" if run.ok else f"FAILED {run.detail}"
            print(
                f"   round {round_index + 1}  {setup.label:<25} {run.wall:6.2f} s  {args.images / run.wall:5.2f} img/s  "
                f"cores used: {describe_cores(run.cores)}  {state}  ({load_line()})",
                flush=True,
            )
    return runs


def summarize_part_one(args: argparse.Namespace, setups: list[Setup], runs: list[Run]) -> dict[str, float]:
    shards = -(-args.images // args.max_batch)
    medians = {s.key: statistics.median(r.wall for r in runs if r.setup == s.key) for s in setups}
    rows = []
    for setup in setups:
        mine = [r for r in runs if r.setup == setup.key]
        cores = {label: statistics.median(r.cores.get(label, float("nan")) for r in mine) for label in mine[0].cores}
        wall = medians[setup.key]
        rows.append({"setup": setup.label, "median_wall_s": wall, "images_per_s": args.images / wall, "ms_per_image": 1000 * wall / args.images,
                     "cores": cores, "walls": [r.wall for r in mine]})  # fmt: skip
    local, one, two = medians["local-1"], medians["remote-1"], medians["remote-2"]
    print()
    report(rows, [
        Column("setup", align="<"), Column("median_wall_s", "median wall", lambda v: f"{v:.2f}s"), Column("images_per_s", "images/s", ".2f"),
        Column("ms_per_image", "ms/image", ".0f"), Column("cores", "cores used (medians)", describe_cores, align="<"),
        Column("walls", "wall of each run", lambda v: " ".join(f"{w:.2f}" for w in v), align="<"),
    ], ratios=[Ratio("2 remote / 1 remote workers, images/s", one / two, 2.0), Ratio("1 remote worker / local pool, images/s", local / one, 1.0)],
       indent="   ", json_out=args.json_out, name="throughput")  # fmt: skip
    per_shard = (one - local) / shards
    print(
        f"\n== 2. broker overhead per shard against the local pool ==\n"
        f"   (median broker-1 {one:.2f} s - median local-1 {local:.2f} s) / {shards} shards = "
        f"{1000 * per_shard:+.0f} ms per shard = {100 * (one - local) / local:+.1f} % of the local time"
    )
    return {"local": local, "one": one, "two": two, "per_shard_ms": 1000 * per_shard, "percent": 100 * (one - local) / local}


def wait_two_ready(session: requests.Session, setup: Setup, victims: set[int]) -> dict[str, Any]:
    """Exactly two rows, both ready, neither a killed pid (a dead worker's heartbeat lingers <= 10 s)."""
    return setup.server.wait_for(
        lambda h: len(h["workers"]) == 2 and all(w["state"] == "ready" and w["pid"] not in victims for w in h["workers"]),
        READY_TIMEOUT_S, "two ready remote workers",
    )  # fmt: skip


def part_three(
    args: argparse.Namespace, setup: Setup, client: redis.Redis, session: requests.Session, runs: list[Run]
) -> list[dict[str, Any]]:
    assert setup.prefix is not None
    stream = Keys(setup.prefix).shards
    body = request_body(args.images)
    print(
        f"\n== 3. a worker SIGKILLed mid-request: {setup.label}, --visibility-timeout {args.visibility_timeout:g} s, "
        f"{args.kills} kill(s) ==",
        flush=True,
    )
    victims: set[int] = set()
    results = []
    for index in range(args.kills):
        wait_two_ready(session, setup, victims)
        undisturbed = timed_run(setup, session, body, None)
        runs.append(undisturbed)
        # The disturbed run: the request in the background, the kill from here, once /health shows
        # a busy worker (it lags up to a second: the shard it holds is checked in Redis first).
        before = wait_two_ready(session, setup, victims)
        known = {int(w["pid"]) for w in before["workers"]}
        sent = time.monotonic()
        thread, box = in_background(lambda: post_alone(setup.url, body))
        victim, killed_at, held = None, 0.0, None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline and thread.is_alive():
            busy = [w for w in (get_health(session, setup.url) or {}).get("workers", []) if w.get("state") == "busy"]
            for row in busy:
                pid = int(row["pid"])
                held = held_by(client, stream, pid) if our_worker(pid, setup.boxes) else None
                if held is not None:
                    killed_at = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    victim = pid
                    break
            else:
                time.sleep(HEALTH_POLL_S)
        if victim is None or held is None:
            thread.join(CLIENT_TIMEOUT_S)
            print(f"   kill {index + 1}: no busy worker holding a shard seen before the request ended; skipped")
            continue
        victims.add(victim)
        stop = threading.Event()
        watcher, lost_box = in_background(
            lambda pid=victim, lost=held, at=killed_at, done=stop: watch_lost_shard(client, stream, pid, lost, at, done)
        )
        restarter, restart_box = in_background(lambda pids=known, at=killed_at: watch_replacement(setup.url, pids, at))
        thread.join(CLIENT_TIMEOUT_S)
        stop.set()
        watcher.join(30)
        restarter.join(READY_TIMEOUT_S)
        wall, ok, detail, images, seeds = box["result"]
        runs.append(Run(setup.key + "-killed", wall, ok, detail, images, seeds, {}))
        lost: LostShard = lost_box.get("result") or held
        to_response = box["ended"] - killed_at
        replaced = wait_two_ready(session, setup, victims)
        rows_back = time.monotonic() - killed_at
        new_rows = [w for w in replaced["workers"] if w["pid"] not in known]
        replacement_ready = restart_box.get("result")
        # Its images_done after the request (and the idle wait above): what it ran of this request.
        replacement_images = sum(int(w["images_done"]) for w in new_rows)
        extra = wall - undisturbed.wall
        print(f"   kill {index + 1}: undisturbed run {undisturbed.wall:.2f} s" + ("" if undisturbed.ok else f" FAILED {undisturbed.detail}"))
        print(f"      disturbed run: worker pid {victim} busy in /health and SIGKILLed {killed_at - sent:.2f} s after the request was sent")
        if lost.entry is None:
            print("      the worker held no shard in Redis when it died (between two shards): nothing to take over")
            floor = None
        else:
            floor = max(0.0, args.visibility_timeout - lost.idle_at_kill)
            taken = "n/a" if lost.taken_over is None else f"{lost.taken_over:.2f} s"
            done = "n/a" if lost.done is None else f"{lost.done:.2f} s"
            print(
                f"      lost {lost.label}: held {lost.idle_at_kill:.2f} s when the worker died; kill -> taken over "
                f"{taken} (floor: visibility timeout {args.visibility_timeout:g} - {lost.idle_at_kill:.2f} = {floor:.2f} s)"
                f" by {lost.taker or '?'}; kill -> its images done {done} (acknowledged: its PNGs were on the API's result stream)"
            )
        print(
            f"      kill -> response complete {to_response:.2f} s; whole request {wall:.2f} s vs undisturbed "
            f"{undisturbed.wall:.2f} s = {extra:+.2f} s extra" + ("" if ok else f"   FAILED {detail}")
        )
        ready_text = "not seen" if replacement_ready is None else f"{replacement_ready:.1f} s after the kill"
        in_time = replacement_ready is not None and replacement_ready < to_response
        print(
            f"      replacement worker (pid {', '.join(str(w['pid']) for w in new_rows) or '?'}, restarted by its box) ready in /health "
            f"{ready_text}, {'before' if in_time else 'after'} the response: it ran {replacement_images} of the {args.images} images; "
            f"/health back to two rows {rows_back:.1f} s after the kill (the dead worker's heartbeat key expires by itself); "
            f"{load_line()}",
            flush=True,
        )
        results.append(
            {"undisturbed": undisturbed.wall, "disturbed": wall, "extra": extra, "to_response": to_response,
             "taken_over": lost.taken_over, "done": lost.done, "idle_at_kill": lost.idle_at_kill, "floor": floor,
             "replacement_ready": replacement_ready, "replacement_images": replacement_images, "ok": ok and undisturbed.ok}
        )  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    cores = os.cpu_count() or 0
    affinity = len(os.sched_getaffinity(0))
    print("== scale-out: the local pool against remote workers through Redis Streams, tiny model on CPU ==")
    print(f"   {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine_description()}")
    print(f"   at start: {load_line()}")
    print(
        f"   cores: os.cpu_count() = {cores}, os.sched_getaffinity(0) = {affinity} usable by this script and its children "
        f"(no process is pinned); every worker runs 1 torch thread (--cpu-threads 1), so a worker can use at most 1 core, "
        f"and 2 remote workers get at most {min(2, affinity)} of the {affinity} cores, shared with the API process and redis-server "
        f"(the 'cores used' columns are each process's CPU seconds / wall seconds of the run)"
    )
    try:
        return measure(args, began)
    except KeyboardInterrupt:
        print("interrupted: everything was stopped and removed", file=sys.stderr)
        return 130


def measure(args: argparse.Namespace, began: float) -> int:
    code = 0
    args.json_out = JsonOut(args.json, "benchmarks.scale_out")
    launched: list[Launched] = []
    with contextlib.ExitStack() as stack:
        try:
            redis_server, setups = start_everything(args, stack, launched)
        except (RuntimeError, OSError) as exc:
            print(f"error: the setup did not start: {exc}", file=sys.stderr)
            for process in launched:
                print(f"--- {process.log_path}\n{process.log_tail(LOG_TAIL_LINES)}", file=sys.stderr)
            return 2
        client = redis.Redis.from_url(redis_server.url)
        stack.callback(client.close)
        session = stack.enter_context(requests.Session())
        redis_pid = redis_server.process.pid if redis_server.process else None
        try:
            runs = part_one(args, setups, redis_pid, session)
            takeovers_before = sum(box.log().count("took over") for s in setups for box in s.boxes)
            summary = summarize_part_one(args, setups, runs)
            kills = part_three(args, setups[2], client, session, runs) if args.kills else []
        except (RuntimeError, OSError, redis.RedisError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            for setup in setups:
                print(f"--- {setup.label}: API log tail\n{setup.server.log_tail(LOG_TAIL_LINES)}", file=sys.stderr)
                for box in setup.boxes:
                    print(f"--- {box.name} log tail\n{box.log_tail(LOG_TAIL_LINES)}", file=sys.stderr)
            return 1

        print("\n== summary ==")
        reference = runs[0]
        same = all(r.ok and r.images == reference.images and r.seeds == reference.seeds for r in runs)
        failed = [r for r in runs if not r.ok]
        print(f"   images byte-identical across all {len(runs)} runs (every setup, the disturbed runs too): {'yes' if same else 'NO'}")
        if failed:
            print(f"   failed requests: {len(failed)}: " + "; ".join(f"{r.setup}: {r.detail}" for r in failed[:3]))
        print(
            f"   shards taken over during part 1 (spurious, with the {args.visibility_timeout:g} s visibility timeout): "
            f"{takeovers_before}"
        )
        print(
            f"   images/s (medians): local 1 worker {args.images / summary['local']:.2f}, remote 1 worker "
            f"{args.images / summary['one']:.2f}, remote 2 workers {args.images / summary['two']:.2f}; "
            f"2-remote/1-remote {summary['one'] / summary['two']:.2f}x, 1-remote/local {summary['local'] / summary['one']:.2f}x"
        )
        print(f"   broker overhead: {summary['per_shard_ms']:+.0f} ms per shard, {summary['percent']:+.1f} % of the local time")
        for i, kill in enumerate(kills, 1):
            taken = "n/a" if kill["taken_over"] is None else f"{kill['taken_over']:.2f}"
            done = "n/a" if kill["done"] is None else f"{kill['done']:.2f}"
            floor = "" if kill["floor"] is None else f" (floor {kill['floor']:.2f} s: held {kill['idle_at_kill']:.2f} s at the kill)"
            print(
                f"   kill {i}: kill -> lost shard taken over {taken} s{floor}, -> its images done {done} s, -> response {kill['to_response']:.2f} s; "
                f"request {kill['disturbed']:.2f} s vs {kill['undisturbed']:.2f} s undisturbed = {kill['extra']:+.2f} s "
                f"(visibility timeout {args.visibility_timeout:g} s); replacement ready {'n/a' if kill['replacement_ready'] is None else format(kill['replacement_ready'], '.1f')} s "
                f"after the kill, ran {kill['replacement_images']} images"
            )
        args.json_out.add("broker_overhead", {key: summary[key] for key in ("per_shard_ms", "percent")})
        args.json_out.add("kills", kills)
        args.json_out.add("checks", {"byte_identical": same, "failed_requests": len(failed), "spurious_takeovers": takeovers_before})
        if not same or failed or not all(k["ok"] for k in kills):
            code = 1
        print(f"   at the end: {load_line()}; the run took {time.monotonic() - began:.0f} s; stopping everything", flush=True)
    print(f"stopped and removed; total {time.monotonic() - began:.0f} s")
    args.json_out.announce()
    return code


if __name__ == "__main__":
    sys.exit(main())
