"""The server's own cost, measured against the bare pipeline on the same machine in one run.

The GPU (here: the tiny model on one CPU thread) is the expensive part; everything the server adds
around it (HTTP, validation, sharding, pickling PNGs between processes, base64, writing the body,
heartbeats) must be close to free. This script measures that side by side and prints ratios:

1. **Overhead**: the same 16-image batch through the bare pipeline in a process of its own,
   spawned like the worker (``gpu_workers.generation.generate_shard`` on the shards of
   ``split_into_shards``: literally the worker's compute, one torch thread, per-image CPU
   generators, PNG encoding), and through the server over HTTP (base64 and url), interleaved and
   repeated; medians, ms per image, and the ratio. Goal: the server adds under 5 %. On a shared
   machine the wall time of the same compute varies by several percent from run to run, so the
   script also reads the scheduler's accounting of the compute thread
   (``/proc/<pid>/task/<tid>/schedstat``): time on a CPU, time waiting for one, and the rest, in
   which the worker had nothing to do (before its first shard, between shards, after the last).
   The overhead *by accounting* is that idle time, plus the server's work inside the worker
   (sending the PNGs to another process, the prompt-length check; timed in the bare process), plus
   every CPU second of the API process as if it had taken the worker's core: an upper bound that
   does not move with the noise.
2. **Memory**: a 150-image base64 response; peak RSS of the API process (not its worker), sampled
   every 20 ms, minus its idle RSS, against the size of the response body. Goal: under 1.5x the body.
3. **Cheap requests while a job runs**: the p99 latency of ``GET /health`` from a paced probe (50/s,
   open loop, a second process) idle, while the job of part 2 generates and while its body is
   written (goal: p99 under 50 ms while generating); then ``GET /health`` and invalid
   ``POST /generate`` (400) per second from a saturating load generator (a second process, 8
   connections), idle and during another 150-image job, with the CPU that the API process and the
   load generator used and the time the API's loop thread waited for a CPU, so that a slower rate
   can be told apart from a blocked loop.
4. **Heartbeats**: the largest silence a client sees before the JSON starts (request to first
   beat, beat to beat, last beat to JSON), against ``--heartbeat-interval``, in both jobs.
   Goal: never more than 1.5x the interval.

    python -m benchmarks.server_overhead

It starts its own ``python -m service --model tiny --workers 1 --max-batch 4 --heartbeat-interval 1``
(default log level, so an access line per request, as in production) on a free loopback port, with
the model cache shared with the bare pipeline. Not part of the test suite: it takes about six
minutes and its numbers are for a person to read (BENCHMARKS.md). The load average is printed at
each step. Exit status 0 when every goal holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks.harness.launch import ApiServer, bench_server
from benchmarks.harness.report import Check, Column, JsonOut, load_line, machine_description, mib, percentile, report, report_checks
from benchmarks.harness.sampling import TreeSampler, cpu_seconds, schedstat

PNG_B64_MAGIC = b'"iVBORw0KGgo'  # base64 of the PNG signature, after the opening quote
BAD_BODY = b'{"prompts": []}'  # a 400: fails the schema before any work
HEALTH, BAD_POST = 0, 1
CLIENT_TIMEOUT_S = 900.0
TAIL_BYTES = 16384  # enough for the fields after the images (150 seeds and the rest)
PROMPTS = (
    "baroque oil painting, a weathered stone tablet with ancient text",
    "dramatic chiaroscuro lighting, ancient philosopher contemplating mortality",
    "mystical symbols glowing in darkness",
    "a lighthouse in a winter storm, fog, lantern light",
)

# Goals from the issue.
GOAL_OVERHEAD = 0.05
GOAL_MEMORY = 1.5
GOAL_P99_S = 0.050
GOAL_HEARTBEAT = 1.5


# --------------------------------------------------------------------------------------------------
# Small helpers


def batch_body(prompts: Sequence[str], per_prompt: int, seed: int, return_format: str) -> dict[str, Any]:
    return {"prompts": list(prompts), "num_images_per_prompt": per_prompt, "seed": seed, "return_format": return_format}


# --------------------------------------------------------------------------------------------------
# The bare pipeline: the worker's compute, in a process of its own (spawned, like the worker)


class Bare:
    """The tiny pipeline, set up exactly as a CPU worker sets up its own (inside ``bare_main``)."""

    def __init__(self, model_cache: Path, max_batch: int) -> None:
        import torch

        from gpu_workers.generation import generate_shard
        from gpu_workers.loading import load_pipeline
        from gpu_workers.messages import ShardTask
        from gpu_workers.receipts import worker_facts

        torch.set_num_threads(1)  # the server runs its CPU worker with --cpu-threads 1
        self.max_batch = max_batch
        self.pipe = load_pipeline("tiny", "cpu", model_cache)
        self.pipe.set_progress_bar_config(disable=True)
        self.facts = worker_facts("tiny", model_cache, "cpu")
        generate_shard(self.pipe, ShardTask("warm-up", 0, 0, ("warm-up",), (0,), None, 0.0, steps=1), self.facts)  # as the worker does

    def run(self, prompts: Sequence[str], per_prompt: int, seed: int) -> list[bytes]:
        from gpu_workers.generation import generate_shard
        from contract.batch import BatchSpec
        from gpu_workers.sharding import split_into_shards

        spec = BatchSpec(tuple(prompts), per_prompt, seed, None, 0.0, "base64", shard_size=self.max_batch)
        return [png for task in split_into_shards("bare", spec) for png in generate_shard(self.pipe, task, self.facts)]

    def worker_side(self, conn: Any, pngs: Sequence[bytes], prompts: Sequence[str], repeats: int) -> tuple[float, float]:
        """What a worker does per shard that the bare pipeline does not, timed (medians): sending
        ``ShardStarted`` and ``ShardDone`` with the shard's PNGs into a pipe that another process
        reads (as the pool's receiver does), and the prompt-length check for ``warnings``."""
        from gpu_workers.generation import truncation_warnings
        from gpu_workers.messages import ShardDone, ShardStarted

        sends, checks = [], []
        shard = tuple(pngs[: self.max_batch])
        for _ in range(repeats):
            started = time.perf_counter()
            conn.send(ShardStarted(0, "bench", 0))
            conn.send(ShardDone(0, "bench", 0, shard, (), 1.0))
            sends.append(time.perf_counter() - started)
            started = time.perf_counter()
            truncation_warnings(self.pipe, tuple(prompts[: self.max_batch]))
            checks.append(time.perf_counter() - started)
        return statistics.median(sends), statistics.median(checks)


def bare_main(model_cache: str, max_batch: int, conn: Any) -> None:
    """Entry point of the bare process: build the pipeline, then run what the parent asks for."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    bare = Bare(Path(model_cache), max_batch)
    conn.send("ready")
    pid, tid = os.getpid(), threading.get_native_id()
    while True:
        message = conn.recv()
        if message is None:
            break
        if message[0] == "run":
            _, prompts, per_prompt, seed = message
            system0 = os.times().system
            cpu0, wait0 = schedstat(pid, tid)
            started = time.monotonic()
            pngs = bare.run(prompts, per_prompt, seed)
            wall = time.monotonic() - started
            cpu1, wait1 = schedstat(pid, tid)
            conn.send((Run(wall, cpu1 - cpu0, wait1 - wait0, 0.0, os.times().system - system0), pngs))
        elif message[0] == "worker_side":
            _, pngs, prompts, repeats = message
            conn.send(bare.worker_side(conn, pngs, prompts, repeats))
    conn.close()


class BareProcess:
    """The parent's handle on the bare process."""

    def __init__(self, model_cache: str, max_batch: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=bare_main, args=(model_cache, max_batch, child), name="bare-pipeline", daemon=True)
        self.process.start()
        child.close()
        if self._conn.recv() != "ready":
            raise RuntimeError("the bare pipeline process did not start")

    def run(self, prompts: Sequence[str], per_prompt: int, seed: int) -> tuple[Run, list[bytes]]:
        self._conn.send(("run", tuple(prompts), per_prompt, seed))
        return self._conn.recv()

    def worker_side(self, pngs: Sequence[bytes], prompts: Sequence[str], repeats: int = 10) -> tuple[float, float]:
        self._conn.send(("worker_side", list(pngs), list(prompts), repeats))
        while not isinstance(result := self._conn.recv(), tuple):
            pass  # the ShardStarted/ShardDone messages, read as the pool's receiver reads them
        return result

    def close(self) -> None:
        self._conn.send(None)
        self.process.join(10)


# --------------------------------------------------------------------------------------------------
# One /generate call, read as a client sees it


@dataclass
class Reply:
    status: int
    sent: float  # monotonic clock (system-wide on Linux, so comparable with the other processes)
    json_started: float
    ended: float
    body_bytes: int
    beats: list[float]
    body: bytes | None  # kept only when asked
    png_count: int
    tail: bytes

    @property
    def seconds(self) -> float:
        return self.ended - self.sent

    def silences(self) -> list[float]:
        """Gaps with no byte before the JSON starts: request -> first beat -> ... -> first JSON byte."""
        marks = [self.sent, *self.beats, self.json_started]
        return [b - a for a, b in zip(marks, marks[1:])]

    def tail_fields(self) -> dict[str, Any]:
        """The fields after the images array (count, message, seeds, warnings)."""
        start = self.tail.rfind(b'], "count"')
        if start < 0:
            return json.loads(self.tail[self.tail.rfind(b"{") :]) if b"{" in self.tail else {}
        return json.loads(b"{" + self.tail[start + 3 :])


async def _post_generate(url: str, body: dict[str, Any], keep_body: bool) -> Reply:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sent = time.monotonic()
        async with session.post(url + "/generate", json=body) as response:
            beats: list[float] = []
            json_started = 0.0
            size = png_count = 0
            chunks: list[bytes] = []
            carry = tail = b""
            async for data in response.content.iter_any():
                now = time.monotonic()
                if not json_started:
                    stripped = data.lstrip(b" ")
                    if len(stripped) < len(data):
                        beats.append(now)
                    if stripped:
                        json_started = now
                size += len(data)
                window = carry + data
                png_count += window.count(PNG_B64_MAGIC)
                carry = window[-(len(PNG_B64_MAGIC) - 1) :]
                if keep_body:
                    chunks.append(data)
                else:
                    tail = (tail + data)[-TAIL_BYTES:]
            ended = time.monotonic()
            if beats and json_started == beats[-1]:  # the first JSON bytes came in the same read as a beat
                beats.pop()
            text = b"".join(chunks) if keep_body else tail
            return Reply(
                status=response.status,
                sent=sent,
                json_started=json_started or ended,
                ended=ended,
                body_bytes=size,
                beats=beats,
                body=text if keep_body else None,
                png_count=png_count,
                tail=text[-TAIL_BYTES:],
            )


def post_generate(url: str, body: dict[str, Any], keep_body: bool = False) -> Reply:
    return asyncio.run(_post_generate(url, body, keep_body))


# --------------------------------------------------------------------------------------------------
# The load generator and the probe: a second process, so their CPU is not the server's


def load_main(url: str, mode: str, connections: int, rate: float, events: tuple[Any, Any, Any], results: Any) -> None:
    """Entry point of the load process: ``saturate`` (``connections`` closed loops, half /health,
    half invalid POSTs) or ``probe`` (``GET /health`` paced at ``rate`` per second, open loop).
    ``events``: ready (set by us), active (cleared by the parent to pause), stop (set by the parent)."""
    records = asyncio.run(_load(url, mode, connections, rate, *events))
    results.send(records)
    results.close()


async def _load(
    url: str, mode: str, connections: int, rate: float, ready: Any, active: Any, stop: Any
) -> list[tuple[float, float, int, int]]:
    import aiohttp

    records: list[tuple[float, float, int, int]] = []  # (start, seconds, kind, status or -1)
    stopping = False
    running = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=max(64, connections))
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(kind: int) -> None:
            started = time.monotonic()
            try:
                if kind == HEALTH:
                    async with session.get(url + "/health") as response:
                        await response.read()
                else:
                    async with session.post(url + "/generate", data=BAD_BODY, headers=headers) as response:
                        await response.read()
                status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = -1
            records.append((started, time.monotonic() - started, kind, status))

        async def closed_loop(kind: int) -> None:
            while not stopping:
                if not running.is_set():
                    await asyncio.sleep(0.01)
                    continue
                await one(kind)

        async def paced() -> None:
            pending: set[asyncio.Task[None]] = set()
            start, n = time.monotonic(), 0
            while not stopping:
                n += 1
                await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
                task = asyncio.create_task(one(HEALTH))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)

        if mode == "saturate":
            runners = [asyncio.create_task(closed_loop(HEALTH if i % 2 == 0 else BAD_POST)) for i in range(connections)]
        else:
            runners = [asyncio.create_task(paced())]
        ready.set()
        while not stop.is_set():
            if active.is_set():
                running.set()
            else:
                running.clear()
            await asyncio.sleep(0.02)
        stopping = True
        await asyncio.gather(*runners)
    return records


class LoadProcess:
    def __init__(self, url: str, mode: str, connections: int = 1, rate: float = 0.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._active, self._stop = ctx.Event(), ctx.Event(), ctx.Event()
        self._active.set()
        self._receive, send = ctx.Pipe(duplex=False)
        events = (self._ready, self._active, self._stop)
        self.process = ctx.Process(
            target=load_main, args=(url, mode, connections, rate, events, send), name=f"load-{mode}", daemon=True
        )
        self.process.start()
        send.close()
        if not self._ready.wait(60):
            raise RuntimeError("the load process did not start")
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def pause(self) -> None:
        self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def finish(self) -> list[tuple[float, float, int, int]]:
        self._stop.set()
        records = self._receive.recv()
        self.process.join(10)
        return records


# --------------------------------------------------------------------------------------------------
# The parts


def goal_check(name: str, value: str, goal: str, ok: bool | None) -> Check:
    """One line of the goals table (``ok`` None: a figure reported beside them)."""
    return Check(ok, name, value, goal)


@dataclass
class Run:
    wall: float
    on_cpu: float  # the compute thread (the main thread of the bare process, or of the worker)
    waiting: float  # the compute thread was runnable but another process had the CPU
    api_cpu: float = 0.0
    system: float = 0.0  # of the compute process's CPU time, the part in the kernel (page faults, mostly)

    @property
    def undisturbed(self) -> float:
        """Wall time minus the compute thread's wait for a CPU: the run on an idle machine."""
        return self.wall - self.waiting

    @property
    def idle(self) -> float:
        """Wall time in which the compute thread neither ran nor waited to run: it had no work."""
        return self.wall - self.on_cpu - self.waiting


def part_overhead(args: argparse.Namespace, bare: BareProcess, server: ApiServer, worker_pid: int, verdicts: list[Check]) -> None:
    n = args.images
    per_prompt = n // len(PROMPTS) if n % len(PROMPTS) == 0 else 1
    prompts = PROMPTS if per_prompt > 1 else tuple(PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(n))
    seed = 42
    print(f"\n== 1. overhead: the same {n}-image batch, bare pipeline vs server (interleaved, {args.repeats} rounds) ==", flush=True)
    print(f"   {load_line()}")
    kinds = ("bare", "base64", "url")
    runs: dict[str, list[Run]] = {k: [] for k in kinds}
    reference: list[bytes] | None = None
    identical = True
    session = requests.Session()
    # One full shard on both sides first: the first full-size batch of a process pays for its allocations.
    bare.run(prompts[:1], min(per_prompt, args.max_batch), seed)
    post_generate(server.url, batch_body(prompts[:1], min(per_prompt, args.max_batch), seed, "base64"))
    for round_index in range(args.repeats):
        order = kinds[round_index % 3 :] + kinds[: round_index % 3]  # rotate so no kind always goes first
        for kind in order:
            if kind == "bare":
                run, pngs = bare.run(prompts, per_prompt, seed)
            else:
                api0 = cpu_seconds(server.pid or 0)
                system0 = psutil.Process(worker_pid).cpu_times().system
                cpu0, wait0 = schedstat(worker_pid, worker_pid)
                reply = post_generate(server.url, batch_body(prompts, per_prompt, seed, kind), keep_body=True)
                cpu1, wait1 = schedstat(worker_pid, worker_pid)
                system = psutil.Process(worker_pid).cpu_times().system - system0
                run = Run(reply.seconds, cpu1 - cpu0, wait1 - wait0, cpu_seconds(server.pid or 0) - api0, system)
                assert reply.body is not None
                data = json.loads(reply.body)
                if reply.status != 200 or not data.get("success") or data.get("count") != n:
                    raise RuntimeError(f"server run failed: HTTP {reply.status}: {reply.body[:300]!r}")
                if kind == "base64":
                    pngs = [base64.b64decode(item) for item in data["images"]]
                else:
                    pngs = [session.get(item, timeout=60).content for item in data["images"]]
            if reference is None:
                reference = pngs
            identical &= pngs == reference
            runs[kind].append(run)
            print(
                f"   round {round_index + 1}  {kind:<6} {run.wall:6.2f} s wall, {run.on_cpu:5.2f} s on CPU ({run.system:4.2f} in the kernel), "
                f"{run.waiting:5.2f} s waiting for a CPU, {run.idle:5.2f} s idle   ({load_line()})",
                flush=True,
            )
    session.close()

    def med(kind: str, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in runs[kind])

    base, base_undisturbed = med("bare", "wall"), med("bare", "undisturbed")
    rows = []
    for kind in kinds:
        wall, undisturbed = med(kind, "wall"), med(kind, "undisturbed")
        rows.append({
            "setup": "bare pipeline" if kind == "bare" else f"server {kind}", "wall_s": wall, "ms_per_image": wall / n * 1000,
            "overhead_ms_per_image": None if kind == "bare" else (wall - base) / n * 1000,
            "overhead": None if kind == "bare" else wall / base - 1,
            "undisturbed_s": undisturbed,
            "undisturbed_overhead_ms_per_image": None if kind == "bare" else (undisturbed - base_undisturbed) / n * 1000,
            "undisturbed_overhead": None if kind == "bare" else undisturbed / base_undisturbed - 1,
            "walls": [run.wall for run in runs[kind]],
        })  # fmt: skip
    print()
    report(rows, [
        Column("setup", "", align="<"), Column("wall_s", "wall (median)", lambda v: f"{v:.2f}s"), Column("ms_per_image", "per image", lambda v: f"{v:.0f} ms"),
        Column("overhead_ms_per_image", "overhead", lambda v: f"{v:+.1f} ms/img"), Column("overhead", "", "+.1%"),
        Column("undisturbed_s", "minus CPU waits", lambda v: f"{v:.2f}s"), Column("undisturbed_overhead_ms_per_image", "overhead", lambda v: f"{v:+.1f} ms/img"),
        Column("undisturbed_overhead", "", "+.1%"), Column("walls", "wall runs", lambda v: " ".join(f"{w:.2f}" for w in v), align="<"),
    ], indent="   ", json_out=args.json_out, name="overhead")  # fmt: skip
    print("   where the server's time goes (medians, per image):")
    print(f"     bare: compute thread on CPU {med('bare', 'on_cpu') / n * 1000:.1f} ms")
    for kind in ("base64", "url"):
        print(
            f"     {kind}: worker on CPU {med(kind, 'on_cpu') / n * 1000:.1f} ms ({(med(kind, 'on_cpu') - med('bare', 'on_cpu')) / n * 1000:+.1f} vs bare); "
            f"worker idle (waiting for the request, between shards, after the last one) {med(kind, 'idle') / n * 1000:.1f} ms; "
            f"API process CPU {med(kind, 'api_cpu') / n * 1000:.1f} ms (on the other core)"
        )
    assert reference is not None
    send_s, check_s = bare.worker_side(reference, [p for p in prompts for _ in range(per_prompt)])
    shards = -(-n // args.max_batch)
    worker_side = (send_s + check_s) * shards
    print(
        f"   server work inside the worker, timed in the bare process: {send_s * 1000:.1f} ms to send a shard's PNGs, "
        f"{check_s * 1000:.1f} ms for the prompt-length check, per shard of {args.max_batch}"
    )
    print(f"   server images byte-identical to the bare pipeline's: {'yes' if identical else 'NO'}")
    for kind in ("base64", "url"):
        bound = med(kind, "idle") + worker_side + med(kind, "api_cpu")
        ratio_wall = med(kind, "wall") / base - 1
        print(
            f"   {kind}: overhead by accounting = worker idle {med(kind, 'idle') / n * 1000:.1f} + server work in the worker "
            f"{worker_side / n * 1000:.1f} + all API-process CPU {med(kind, 'api_cpu') / n * 1000:.1f} (as if it took the "
            f"worker's core) = {bound / n * 1000:.1f} ms/image = {bound / med('bare', 'on_cpu'):+.2%} of the bare compute"
        )
        # The goal is judged on the two figures that hold still on a shared machine; the raw wall
        # time is reported next to them (its noise is visible in the runs above).
        ratio_undisturbed = med(kind, "undisturbed") / base_undisturbed - 1
        ratio_min = min(run.wall for run in runs[kind]) / min(run.wall for run in runs["bare"]) - 1
        verdicts.append(
            goal_check(
                f"overhead, {n} images, {kind} (by accounting)",
                f"{bound / med('bare', 'on_cpu'):+.2%} ({bound / n * 1000:+.1f} ms/image)",
                "< +5%",
                bound / med("bare", "on_cpu") < GOAL_OVERHEAD,
            )
        )
        verdicts.append(
            goal_check(
                f"overhead, {n} images, {kind} (wall - CPU waits)",
                f"{ratio_undisturbed:+.1%} ({(med(kind, 'undisturbed') - base_undisturbed) / n * 1000:+.1f} ms/image), median",
                "< +5%",
                ratio_undisturbed < GOAL_OVERHEAD,
            )
        )
        verdicts.append(
            goal_check(f"overhead, {n} images, {kind} (raw wall)", f"median {ratio_wall:+.1%}, best run {ratio_min:+.1%}", "< +5%, not judged", None)
        )
    verdicts.append(goal_check("same PNG bytes as bare", "yes" if identical else "NO", "identical", identical))


def big_body(args: argparse.Namespace) -> dict[str, Any]:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in range(args.big_images)]
    return batch_body(prompts, 1, 7, "base64")


def check_big(reply: Reply, images: int) -> None:
    fields = reply.tail_fields()
    if reply.status != 200 or fields.get("count") != images or reply.png_count != images:
        raise RuntimeError(f"big job failed: HTTP {reply.status}, {reply.png_count} PNGs, tail {reply.tail[-300:]!r}")


def print_silences(reply: Reply, interval: float, label: str, verdicts: list[Check]) -> None:
    silences = reply.silences()
    worst = max(silences)
    where = silences.index(worst)
    position = "before the status line" if where == 0 else ("before the JSON" if where == len(silences) - 1 else f"between beats {where} and {where + 1}")
    between = silences[1:-1] or [float("nan")]
    print(
        f"   heartbeats ({label}): {len(reply.beats)} beats over {reply.json_started - reply.sent:.1f} s; "
        f"largest silence {worst:.3f} s ({worst / interval:.2f}x the {interval:g} s interval, {position}); "
        f"between beats: median {statistics.median(between):.3f} s, max {max(between):.3f} s; "
        f"first beat after {silences[0]:.3f} s; last beat -> JSON {silences[-1]:.3f} s"
    )
    verdicts.append(goal_check(f"heartbeat largest silence ({label})", f"{worst / interval:.2f}x interval ({worst:.3f} s)", "<= 1.5x", worst <= GOAL_HEARTBEAT * interval))


def latency_row(
    label: str, records: list[tuple[float, float, int, int]], start: float, end: float, kind: int, waits: tuple[float, float]
) -> dict[str, Any]:
    """One row of latencies; ``waits``: seconds the API's loop thread and the client waited for a CPU in the window."""
    chosen = [r for r in records if start <= r[0] < end and r[2] == kind]
    latencies = [r[1] for r in chosen if r[3] > 0]
    span = max(end - start, 1e-9)
    return {
        "window": label, "requests": len(latencies), "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000, "api_waited_ms_per_s": waits[0] / span * 1000,
        "probe_waited_ms_per_s": waits[1] / span * 1000, "errors": sum(1 for r in chosen if r[3] <= 0),
    }  # fmt: skip


def ms(value: float) -> str:
    return f"{value:.1f} ms"


LATENCY_COLUMNS = [
    Column("window", align="<"), Column("requests"), Column("p50_ms", "p50", ms), Column("p99_ms", "p99", ms), Column("max_ms", "max", ms),
    Column("api_waited_ms_per_s", "API loop thread waited for a CPU", lambda v: f"{v:.0f} ms/s"),
    Column("probe_waited_ms_per_s", "probe waited", lambda v: f"{v:.0f} ms/s"), Column("errors"),
]  # fmt: skip


def part_memory_probe(args: argparse.Namespace, server: ApiServer, verdicts: list[Check]) -> None:
    """Job A: a 150-image base64 job with RSS sampled every 20 ms, heartbeats timed, /health probed."""
    print(f"\n== 2. memory, heartbeats and /health p99: one {args.big_images}-image base64 job ==", flush=True)
    print(f"   {load_line()}")
    assert server.pid is not None
    probe = LoadProcess(server.url, "probe", rate=args.probe_rate)
    sampler = TreeSampler(server.pid, args.sample_interval, tree=False, cpu_pids=[server.pid, probe.pid], waits=True).start()
    time.sleep(args.idle_seconds)
    reply = post_generate(server.url, big_body(args))
    time.sleep(args.idle_seconds)
    samples = sampler.stop()
    records = probe.finish()
    check_big(reply, args.big_images)
    idle = statistics.median(samples.rss_between(samples.times[0], reply.sent))
    generating = samples.rss_between(reply.sent, reply.json_started)
    writing = samples.rss_between(reply.json_started, reply.ended + 0.25)
    peak = max(generating + writing)
    extra = peak - idle
    ratio = extra / reply.body_bytes
    print(
        f"   job: {reply.seconds:.1f} s ({reply.json_started - reply.sent:.1f} s until the JSON started, "
        f"{reply.ended - reply.json_started:.2f} s to write the body); {len(samples.times)} RSS samples every "
        f"{args.sample_interval * 1000:.0f} ms"
    )
    print(f"   response body: {mib(reply.body_bytes)} ({reply.png_count} base64 PNGs)")
    after = statistics.median(samples.rss_between(reply.ended + 1.0, samples.times[-1]) or [float("nan")])
    print(
        f"   API process RSS: idle {mib(idle)}; peak while generating {mib(max(generating))}, while writing "
        f"{mib(max(writing))}; extra peak {mib(extra)} = {ratio:.2f}x the body; {mib(after)} after the job"
    )
    verdicts.append(goal_check(f"extra peak RSS, {args.big_images}-image base64", f"{ratio:.2f}x body ({mib(extra)} for {mib(reply.body_bytes)})", "< 1.5x", ratio < GOAL_MEMORY))
    print_silences(reply, args.heartbeat_interval, "probe job", verdicts)
    print(f"   GET /health paced at {args.probe_rate:g}/s from a second process (open loop):")

    def waits(start: float, end: float) -> tuple[float, float]:
        return tuple(samples.cpu_between(pid, start, end, "waits") for pid in (server.pid, probe.pid))  # type: ignore[return-value]

    rows = [
        latency_row("idle, before the job", records, probe.started + 0.5, reply.sent, HEALTH, waits(probe.started + 0.5, reply.sent)),
        latency_row("while generating", records, reply.sent, reply.json_started, HEALTH, waits(reply.sent, reply.json_started)),
        latency_row("while writing the body", records, reply.json_started, reply.ended, HEALTH, waits(reply.json_started, reply.ended)),
    ]
    report(rows, LATENCY_COLUMNS, indent="   ", json_out=args.json_out, name="health_latency_paced")
    p99_gen, p99_write = rows[1]["p99_ms"] / 1000, rows[2]["p99_ms"] / 1000
    verdicts.append(goal_check("/health p99 while generating (paced)", f"{p99_gen * 1000:.1f} ms", "< 50 ms", p99_gen < GOAL_P99_S))
    verdicts.append(goal_check("/health p99 while writing the body (paced)", f"{p99_write * 1000:.1f} ms", "< 50 ms", p99_write < GOAL_P99_S))


class LoadWindow(threading.Thread):
    """During the job: full load for the first ``seconds``, a pause while the bulk of the job runs
    (it would only slow the worker down and the run down), and full load again from the moment the
    last shards are handed to the worker (``/health`` shows no queued images) until the body is read."""

    def __init__(self, load: LoadProcess, url: str, seconds: float) -> None:
        super().__init__(name="load-window", daemon=True)
        self.load, self.url, self.seconds = load, url, seconds
        self.paused_at: float | None = None
        self.resumed_at: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        if self.halt.wait(self.seconds):
            return
        self.load.pause()
        self.paused_at = time.monotonic()
        with requests.Session() as session:
            while not self.halt.wait(0.25):
                try:
                    if session.get(self.url + "/health", timeout=10).json().get("queued_images") == 0:
                        break
                except (requests.RequestException, ValueError):
                    pass
        self.load.resume()
        self.resumed_at = time.monotonic()


def part_rate(args: argparse.Namespace, server: ApiServer, verdicts: list[Check]) -> None:
    """Job B: a saturating load of cheap requests, idle and then during a 150-image job."""
    print(
        f"\n== 3. cheap requests per second: {args.connections} connections from a second process "
        f"(half GET /health, half invalid POST /generate), idle then during a {args.big_images}-image job ==",
        flush=True,
    )
    print(f"   {load_line()}")
    assert server.pid is not None
    load = LoadProcess(server.url, "saturate", connections=args.connections)
    sampler = TreeSampler(server.pid, args.sample_interval, tree=False, cpu_pids=[server.pid, load.pid], waits=True).start()
    time.sleep(args.idle_seconds)
    window = LoadWindow(load, server.url, args.load_seconds)
    window.start()
    reply = post_generate(server.url, big_body(args))
    window.halt.set()
    window.join()
    samples = sampler.stop()
    records = load.finish()
    check_big(reply, args.big_images)
    generating = [(reply.sent, reply.json_started)]
    if window.paused_at is not None:
        generating = [(reply.sent, min(window.paused_at, reply.json_started))]
        if window.resumed_at is not None and window.resumed_at < reply.json_started:
            generating.append((window.resumed_at, reply.json_started))
    windows = (
        ("idle", [(load.started + 0.5, reply.sent)]),
        ("while generating", generating),
        ("while writing the body", [(reply.json_started, reply.ended)]),
    )
    load_spans = " + ".join(f"{end - start:.1f} s" for start, end in generating)
    print(
        f"   job: {reply.seconds:.1f} s; under load while generating: {load_spans} (first {args.load_seconds:g} s, and from "
        f"the dispatch of its last shards), and the {reply.ended - reply.json_started:.2f} s writing {mib(reply.body_bytes)}"
    )
    rates: dict[str, float] = {}
    rows = []
    for label, spans in windows:
        span = sum(end - start for start, end in spans)
        inside = [r for r in records if any(start <= r[0] + r[1] < end for start, end in spans)]
        ok = [r for r in inside if r[3] > 0]
        health = [r for r in ok if r[2] == HEALTH]
        bad = [r for r in ok if r[2] == BAD_POST]
        wrong = sum(1 for r in ok if r[3] != (200 if r[2] == HEALTH else 400))
        errors = len(inside) - len(ok) + wrong
        p99 = percentile([r[1] for r in health], 99)
        api_cpu = sum(samples.cpu_between(server.pid, start, end) for start, end in spans)
        load_cpu = sum(samples.cpu_between(load.pid, start, end) for start, end in spans)
        api_wait = sum(samples.cpu_between(server.pid, start, end, "waits") for start, end in spans)
        rates[label] = len(ok) / span
        rows.append({
            "window": label, "seconds": span, "health_per_s": len(health) / span, "bad_per_s": len(bad) / span, "total_per_s": len(ok) / span,
            "health_p99_ms": p99 * 1000, "errors": errors, "api_cpu": api_cpu / span, "load_cpu": load_cpu / span,
            "api_cpu_ms_per_request": api_cpu / max(1, len(ok)) * 1000, "api_waited": api_wait / span,
        })  # fmt: skip
    report(rows, [
        Column("window", align="<"), Column("seconds", fmt=".1f"), Column("health_per_s", "health/s", ".0f"), Column("bad_per_s", "400s/s", ".0f"),
        Column("total_per_s", "total/s", ".0f"), Column("health_p99_ms", "health p99", ms), Column("errors"), Column("api_cpu", "API CPU", ".0%"),
        Column("load_cpu", "load CPU", ".0%"), Column("api_cpu_ms_per_request", "API CPU/req", lambda v: f"{v:.2f} ms"),
        Column("api_waited", "API waited", ".0%"),
    ], indent="   ", json_out=args.json_out, name="cheap_requests")  # fmt: skip
    print(
        "   (API/load CPU: share of one core used by the API process and by the load generator; API waited: share of\n"
        "    the window in which the API's loop thread was runnable but had no CPU)"
    )
    verdicts.append(
        goal_check(
            "cheap requests/s while generating (saturated)",
            f"{rates['while generating']:.0f}/s ({rates['while generating'] / rates['idle']:.0%} of idle {rates['idle']:.0f}/s)",
            "none (reported)",
            None,
        )
    )
    print_silences(reply, args.heartbeat_interval, "job under saturating load", verdicts)


# --------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server_overhead",
        description="The server's own cost (overhead, memory, request rate, heartbeats) against the bare pipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=16, help="batch size of the bare-vs-server comparison")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of bare, base64 and url")
    parser.add_argument("--big-images", type=int, default=150, help="images of the memory and load jobs")
    parser.add_argument("--max-batch", type=int, default=4, help="--max-batch of the server, and the bare shard size")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="--heartbeat-interval of the server")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections of the saturating load")
    parser.add_argument(
        "--load-seconds", type=float, default=20.0, help="seconds of saturating load at the start of the job (it resumes for the job's end)"
    )
    parser.add_argument("--probe-rate", type=float, default=50.0, help="paced /health requests per second during the memory job")
    parser.add_argument("--sample-interval", type=float, default=0.02, help="seconds between RSS/CPU samples")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="load before each job starts (the idle window)")
    parser.add_argument("--keep-log", action="store_true", help="keep the server's log (an access line per request: large)")
    parser.add_argument("--json", help="also write every table and the goals as JSON here")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: overhead, memory, rate")
    parser.add_argument(
        "--model-cache", default=str(Path.home() / ".cache" / "sdxl-lightning-server"), help="where the tiny model is built (shared by both sides)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    began = time.monotonic()
    print("== server overhead: the server against the bare pipeline, tiny model on CPU ==")
    print(f"   machine: {machine_description()}")
    print(f"   at start: {load_line()}", flush=True)
    bare = BareProcess(args.model_cache, args.max_batch)
    # Default log level: an access line per request, as in production.
    server = bench_server(1, args.max_batch, args.model_cache, "--heartbeat-interval", str(args.heartbeat_interval), prefix="sdxl-overhead-")
    print(f"   server: {' '.join(server.args[1:])}\n   in {server.workdir}", flush=True)
    verdicts: list[Check] = []
    args.json_out = JsonOut(args.json, "benchmarks.server_overhead")
    try:
        server.start()
        health = requests.get(server.url + "/health", timeout=10).json()
        worker_pid = int(health["workers"][0]["pid"])
        post_generate(server.url, batch_body(PROMPTS[:1], 1, 1, "base64"))  # first-request paths, as a warm-up
        if "memory" not in skip:
            part_memory_probe(args, server, verdicts)
        if "overhead" not in skip:
            part_overhead(args, bare, server, worker_pid, verdicts)
        if "rate" not in skip:
            part_rate(args, server, verdicts)
    finally:
        bare.close()
        code = server.stop()
        server.remove_images()
        log_size = server.log_path.stat().st_size if server.log_path.exists() else 0
        if not args.keep_log:
            shutil.rmtree(server.workdir, ignore_errors=True)
    passed = report_checks(verdicts, title=f"\n== goals ({time.monotonic() - began:.0f} s in all; at the end: {load_line()}) ==", indent="   ",
                           fail="MISS", json_out=args.json_out, name="goals")  # fmt: skip
    kept = f"kept at {server.log_path}" if args.keep_log else "removed (--keep-log keeps it)"
    print(f"   server stopped with SIGTERM, exit code {code}; its log ({mib(log_size)}, an access line per request) {kept}")
    args.json_out.announce()
    return 0 if passed and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
