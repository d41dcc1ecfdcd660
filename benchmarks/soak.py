"""Soak test: many clients, workers killed under them, and not one image may be lost.

Unit and integration tests show that each fault path works once; a soak shows that they keep working
when they overlap for minutes: requests in flight while a worker is SIGKILLed, restarts while the
queue is full, 503s while no worker is ready, and memory that must not creep up. It is a script, not
part of the pytest suite, because it runs for minutes and its numbers are for a person to read.

    python -m benchmarks.soak --clients 4 --minutes 5 --workers 2 --kill-every 15

By default it starts its own ``python -m service --model tiny`` on a free loopback port (so it can
read the RSS of the server and its workers, and SIGKILL the workers); ``--url`` points it at a
running server instead. Exit status 0 when no accepted image was lost, 1 otherwise.

``--abuse`` adds, while the clients and kills run, what a hostile or unlucky public-tunnel user does,
against a server started with tight bounds (``--max-connections 64 --keepalive-timeout 3
--write-timeout 3 --max-queued-images 120``): hundreds of idle TCP connections (some with half a
request head), re-opened as the server closes them; slow readers (``POST /generate`` of 4 base64
images on a socket with a tiny receive buffer, never read); every few seconds a burst of 10
concurrent ``POST /jobs`` of 40 images; and the edge abuse of ``benchmarks/edge_abuse.py`` (a
stranger's idle sockets from other addresses, all renewed every 14 s; unfinished 0.8 MB request
heads; a newcomer's fresh connection every second); and 12 clients of ``benchmarks/slow_dns.py``
sending ``webhook_url`` hosts that a nameserver which never answers is asked about. It then checks that the bounds held: no image lost, accepted
and unfinished images never past the bound, the API process's RSS flat and its open files under
the limit, no more connections held than the cap, idle connections closed and slow readers cut off,
and a log that does not flood. The exit status is 1 if any check fails. The soak clients, the
bursts and the slow readers first get their connection past the cap (a GET /health the server
itself answers), so a connection the cap turns away is never booked as a lost request.

    python -m benchmarks.soak --clients 2 --minutes 3 --workers 2 --kill-every 20 --abuse
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import random
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from benchmarks import edge_abuse
from benchmarks import slow_dns
from benchmarks.harness.launch import bench_server
from benchmarks.harness.report import Check, JsonOut, mib, report_checks, report_pairs
from benchmarks.harness.sampling import SampleSummary, TreeSampler, fd_limit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_MODULUS = 2**32
# Long enough for a full batch on a slow CPU worker; heartbeats keep the connection itself alive.
CLIENT_TIMEOUT_S = 300.0
HEALTH_TIMEOUT_S = 10.0
SAMPLE_INTERVAL_S = 0.5
MAX_FAILURE_EXAMPLES = 10
WORDS = (
    "baroque oil painting stone tablet ancient philosopher mystical symbols glowing darkness harbour "
    "lighthouse storm fog forest cathedral candle mirror river bridge winter lantern desert ruins"
).split()


# --------------------------------------------------------------------------------------------------
# Counters shared by the threads


@dataclass
class Stats:
    """Everything the summary reports; one lock, because the client threads all write to it."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    sent: int = 0
    done: int = 0
    refused: int = 0
    failed: int = 0
    images_requested: int = 0
    images_returned: int = 0
    kills: int = 0
    kill_errors: int = 0
    peak_api_rss: int = 0
    peak_total_rss: int = 0
    rss_samples: int = 0
    # First and last (fds, threads) of the API process: growth between them is a per-kill leak.
    first_handles: tuple[int, int] | None = None
    last_handles: tuple[int, int] | None = None
    # For --abuse: the API process's RSS at the first and last sample, and its most open fds.
    first_api_rss: int = 0
    last_api_rss: int = 0
    max_fds: int = 0
    # For --abuse: a client's connection answered by the server's connection cap (503 before any
    # request is read), and requests that met it; neither is a request the server accepted.
    cap_waits: int = 0
    refused_cap: int = 0
    failures: list[str] = field(default_factory=list)
    kill_log: list[str] = field(default_factory=list)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def record_failure(self, text: str) -> None:
        """Keep the first few failures verbatim: a count alone says nothing about the cause."""
        with self.lock:
            self.failed += 1
            if len(self.failures) < MAX_FAILURE_EXAMPLES:
                self.failures.append(text)

    @property
    def images_lost(self) -> int:
        return self.images_requested - self.images_returned

    def take_samples(self, summary: SampleSummary) -> None:
        """The API process's memory and handles, from the sampler of the run."""
        self.peak_api_rss, self.peak_total_rss, self.rss_samples = summary.peak_rss, summary.peak_tree_rss, summary.samples
        self.first_api_rss, self.last_api_rss = summary.first_rss, summary.last_rss
        self.first_handles, self.last_handles, self.max_fds = summary.first_fds, summary.last_fds, summary.max_fds


# --------------------------------------------------------------------------------------------------
# The server under test


def get_health(session: requests.Session, url: str) -> dict[str, Any] | None:
    """The /health body whatever its status (503 still lists the workers), or None if unreachable."""
    try:
        return session.get(url + "/health", timeout=HEALTH_TIMEOUT_S).json()
    except (requests.RequestException, ValueError):
        return None


# The server's connection cap (--max-connections) answers a connection past it before the app sees
# it: a 503 and a close, without the X-Request-Id header that every answer of the app carries.
CAP_PATIENCE_S = 60.0
# With --abuse, how often a client that must keep its connection open sends a GET /health (under
# the 3 s keep-alive timeout the server gets then).
KEEP_OPEN_S = 2.0


def refused_by_cap(response: requests.Response) -> bool:
    return response.status_code == 503 and "X-Request-Id" not in response.headers


def get_through_cap(
    session: requests.Session,
    url: str,
    on_refusal: Callable[[], None],
    stop: threading.Event | None = None,
    timeout: float = HEALTH_TIMEOUT_S,
    patience: float = CAP_PATIENCE_S,
) -> requests.Response | None:
    """GET ``url`` until the server itself answers (not its connection cap, nor a connection reset
    on the way in), for at most ``patience`` seconds or until ``stop``; None if it never did. The
    session keeps that connection, so the next request on it is past the cap."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        try:
            response = session.get(url, timeout=timeout)
        except requests.RequestException:
            response = None
        if response is not None and not refused_by_cap(response):
            return response
        on_refusal()
        pause = random.uniform(0.05, 0.3)
        if stop is not None:
            stop.wait(pause)
        else:
            time.sleep(pause)
    return None


def get_health_through_cap(session: requests.Session, url: str, stats: Stats) -> dict[str, Any] | None:
    response = get_through_cap(session, url + "/health", lambda: stats.add(cap_waits=1))
    try:
        return None if response is None else response.json()
    except ValueError:
        return None


def total_restarts(health: dict[str, Any] | None) -> int | None:
    if health is None:
        return None
    return sum(int(w.get("restarts") or 0) for w in health.get("workers", []))


# --------------------------------------------------------------------------------------------------
# Clients


@dataclass(frozen=True)
class Job:
    """One request as the client built it: everything needed to check the answer."""

    prompts: list[str]
    n: int
    seed: int
    return_format: str

    @property
    def images(self) -> int:
        return len(self.prompts) * self.n

    def body(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "num_images_per_prompt": self.n, "seed": self.seed, "return_format": self.return_format}

    def describe(self) -> str:
        return f"{len(self.prompts)} prompt(s) x {self.n}, seed {self.seed}, {self.return_format}"


def make_job(rng: random.Random, index: int) -> Job:
    """Random sizes so shards of every fill level meet kills; the format alternates to cover both paths."""
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(rng.randint(1, 8))]
    return Job(prompts=prompts, n=rng.randint(1, 2), seed=rng.randrange(SEED_MODULUS), return_format=("base64", "url")[index % 2])


def retry_after_seconds(response: requests.Response) -> float:
    """Retry-After in seconds (the server only sends delta-seconds); 1 s if missing or odd."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def check_images(session: requests.Session, job: Job, images: list[Any], stats: Stats | None = None) -> tuple[int, list[str]]:
    """How many images are real PNGs (decoded, or fetched from their url), and what was wrong with the rest.
    With ``stats`` (--abuse) a url whose connection the server's cap refused is fetched again."""
    good, problems = 0, []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            problems.append(f"image {i} is {type(item).__name__}, not a string")
            continue
        if job.return_format == "base64":
            try:
                ok = base64.b64decode(item, validate=True)[:8] == PNG_MAGIC
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"image {i} is not a base64 PNG")
                continue
        else:
            try:
                if stats is None:
                    reply = session.get(item, timeout=CLIENT_TIMEOUT_S)
                else:
                    got = get_through_cap(session, item, lambda: stats.add(cap_waits=1), timeout=CLIENT_TIMEOUT_S)
                    if got is None:
                        problems.append(f"GET {item}: refused by the connection cap for {CAP_PATIENCE_S:.0f} s")
                        continue
                    reply = got
            except requests.RequestException as exc:
                problems.append(f"GET {item}: {type(exc).__name__}: {exc}")
                continue
            if reply.status_code != 200 or reply.headers.get("Content-Type") != "image/png" or reply.content[:8] != PNG_MAGIC:
                problems.append(f"GET {item}: {reply.status_code} {reply.headers.get('Content-Type')}")
                continue
        good += 1
    return good, problems


def check_success(session: requests.Session, job: Job, data: dict[str, Any], stats: Stats | None = None) -> tuple[int, list[str]]:
    """Good images in a success body, and every way the body breaks the contract."""
    images = data.get("images")
    if not isinstance(images, list):
        return 0, ["no images list"]
    problems = []
    if not (data.get("count") == len(images) == job.images):
        problems.append(f"count {data.get('count')}, {len(images)} images, asked {job.images}")
    expected = [(job.seed + i) % SEED_MODULUS for i in range(job.images)]
    if data.get("seeds") != expected:
        problems.append(f"seeds {data.get('seeds')!r:.120} != {expected!r:.120}")
    good, image_problems = check_images(session, job, images[: job.images], stats)
    return good, problems + image_problems


def run_one(
    session: requests.Session, url: str, job: Job, stats: Stats, stop: threading.Event, started: float, abuse: bool = False
) -> None:
    """Send one request and book its outcome; a 503 is a refusal (wait Retry-After), never a loss.

    With ``abuse`` the connection is first made to pass the server's connection cap (a GET /health on
    it that the server itself answers), so that a connection the cap turns away, which is no request
    at all, is never booked as a lost one; the POST then goes out on that same connection."""
    if abuse and get_through_cap(session, url + "/health", lambda: stats.add(cap_waits=1), stop=stop) is None:
        return  # the clock ran out while the cap kept this client out: nothing was sent
    stats.add(sent=1)
    sent_at = time.monotonic() - started
    try:
        response = session.post(url + "/generate", json=job.body(), timeout=CLIENT_TIMEOUT_S)
    except requests.RequestException as exc:
        stamp = f"t={sent_at:.1f}-{time.monotonic() - started:.1f}s {job.describe()}"
        stats.add(images_requested=job.images)
        stats.record_failure(f"{stamp}: {type(exc).__name__}: {exc}")
        return
    if abuse and refused_by_cap(response):
        stats.add(refused_cap=1)
        return
    if response.status_code == 503:
        stats.add(refused=1)
        stop.wait(retry_after_seconds(response))
        return
    stats.add(images_requested=job.images)
    # Sent and answered: lined up with the kill log, this says which kill a failure followed.
    stamp = f"t={sent_at:.1f}-{time.monotonic() - started:.1f}s {job.describe()}"
    try:
        data = response.json()
    except ValueError:
        stats.record_failure(f"{stamp}: HTTP {response.status_code}, body is not JSON: {response.text[:200]!r}")
        return
    if not isinstance(data, dict):
        stats.record_failure(f"{stamp}: HTTP {response.status_code}, body is not a JSON object: {data!r:.200}")
        return
    if response.status_code != 200 or data.get("success") is not True:
        stats.record_failure(
            f"{stamp}: HTTP {response.status_code}, success={data.get('success')!r}: {data.get('detail')!r:.300}"
        )
        return
    good, problems = check_success(session, job, data, stats if abuse else None)
    stats.add(images_returned=good)
    if problems:
        stats.record_failure(f"{stamp}: HTTP 200 but " + "; ".join(problems[:3]))
    else:
        stats.add(done=1)


def client_loop(url: str, stats: Stats, stop: threading.Event, started: float, seed: int, abuse: bool = False) -> None:
    """One client: requests back to back until the clock runs out; the one in flight is finished."""
    rng = random.Random(seed)
    with requests.Session() as session:
        index = seed  # so clients do not all use the same format at the same time
        while not stop.is_set():
            run_one(session, url, make_job(rng, index), stats, stop, started, abuse)
            index += 1


# --------------------------------------------------------------------------------------------------
# Killer and sampler


def kill_one_worker(
    session: requests.Session, url: str, rng: random.Random, stats: Stats, started: float, abuse: bool = False
) -> None:
    """SIGKILL a random worker that holds (or could hold) work: killing a starting one tests nothing new."""
    health = get_health_through_cap(session, url, stats) if abuse else get_health(session, url)
    if health is None:
        return
    victims = [w for w in health.get("workers", []) if w.get("pid") and w.get("state") in ("ready", "busy")]
    if not victims:
        return
    victim = rng.choice(victims)
    try:
        os.kill(int(victim["pid"]), signal.SIGKILL)
    except OSError as exc:  # gone already, or not ours (--url on another host or user)
        stats.add(kill_errors=1)
        with stats.lock:
            stats.kill_log.append(f"t={time.monotonic() - started:.1f}s kill worker {victim['id']} pid {victim['pid']} failed: {exc}")
        return
    stats.add(kills=1)
    with stats.lock:
        stats.kill_log.append(
            f"t={time.monotonic() - started:.1f}s SIGKILL worker {victim['id']} pid {victim['pid']} ({victim['state']}, "
            f"{victim.get('shards_in_flight')} shard(s) in flight)"
        )


def killer_loop(url: str, every: float, stats: Stats, stop: threading.Event, started: float, abuse: bool = False) -> None:
    rng = random.Random(0xC0FFEE)
    with requests.Session() as session:
        if not abuse:
            while not stop.wait(every):
                kill_one_worker(session, url, rng, stats, started)
            return
        # With --abuse a new connection can wait long behind the idle flood, so the killer keeps its
        # own open between kills (a GET /health every KEEP_OPEN_S, under the keep-alive timeout).
        due = time.monotonic() + every
        while not stop.wait(min(KEEP_OPEN_S, max(0.0, due - time.monotonic()))):
            if time.monotonic() < due:
                get_health_through_cap(session, url, stats)
                continue
            kill_one_worker(session, url, rng, stats, started, abuse)
            due = time.monotonic() + every


# --------------------------------------------------------------------------------------------------
# Abuse (--abuse): what a hostile or unlucky public-tunnel user does, and the bounds that must hold

# The server started with --abuse gets these bounds, tight enough for a short run to reach them all.
ABUSE_MAX_CONNECTIONS = 64
ABUSE_KEEPALIVE_S = 3.0
ABUSE_WRITE_TIMEOUT_S = 3.0
ABUSE_MAX_QUEUED_IMAGES = 120
# Above what the soak's own clients hold from 127.0.0.1 (about 20), under the stranger's 64 per address.
ABUSE_MAX_PER_PEER = 32
ABUSE_SERVER_ARGS = (
    "--max-connections", str(ABUSE_MAX_CONNECTIONS), "--max-connections-per-peer", str(ABUSE_MAX_PER_PEER),
    "--keepalive-timeout", f"{ABUSE_KEEPALIVE_S:g}",
    "--write-timeout", f"{ABUSE_WRITE_TIMEOUT_S:g}", "--max-queued-images", str(ABUSE_MAX_QUEUED_IMAGES),
)  # fmt: skip
# The slow-DNS clients connect from a loopback address of their own (the server counts per peer).
SLOW_DNS_SOURCE = "127.0.0.200"
# One idle connection in this many sends half a request head (request line and a header, no blank line).
HALF_HEAD_EVERY = 4
HALF_HEAD = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
IDLE_CONNECT_TIMEOUT_S = 10.0
# An idle connection closed silently sooner than this was closed to make room at the cap.
EVICTED_BEFORE_S = 0.9 * ABUSE_KEEPALIVE_S
# An idle connection still open this long after it was accepted breaks --keepalive-timeout.
IDLE_OVERDUE_S = ABUSE_KEEPALIVE_S + 10.0
SLOW_READER_IMAGES = 4
SLOW_READER_RCVBUF = 1024  # Linux doubles it and raises it to its minimum: about 2 KiB
# A slow reader not cut off this long after its answer began breaks --write-timeout.
SLOW_READER_OVERDUE_S = ABUSE_WRITE_TIMEOUT_S + 30.0
BURST_SIZE = 10
BURST_PROMPTS, BURST_IMAGES_PER_PROMPT = 10, 4  # 40 images a job
BURST_GATHER_S = 30.0  # how long a burst client may take to get (back) past the cap
TRACK_INTERVAL_S = 0.5
FD_SAMPLE_S = 0.1
HELD_SAMPLE_S = 0.5  # how often the idle connections the server holds are counted
HELD_AFTER_S = 1.0  # an idle connection open this long without a 503 was taken by the server
RSS_GROWTH_LIMIT = 150 * 2**20
LOG_LINES_PER_MINUTE_LIMIT = 2000
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # tcpi_state (include/net/tcp_states.h)
FINISHED_JOB_STATES = ("done", "failed", "cancelled")
# A log line; not anchored, since a worker's progress bar (ending in \r) may precede it on a line.
LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\S+) (\S+) (.*)$")


@dataclass
class BurstJob:
    """A burst job the server accepted (202), as last seen by GET /jobs/{id}."""

    job_id: str
    images: int
    accepted_at: float  # monotonic, when its 202 came back: the server had accepted it before
    state: str = "queued"
    images_done: int = 0
    detail: str | None = None
    ended: bool = False
    cancelled_by_us: bool = False

    @property
    def unfinished(self) -> int:
        return 0 if self.ended else self.images - self.images_done


@dataclass
class AbuseStats:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Idle connections: opened (TCP handshake done), answered by the cap (503, closed), closed by the
    # server without a word after the keep-alive timeout (FIN, or a reset), still open when they
    # should not be (we closed them), and open when the run ended.
    idle_opened: int = 0
    idle_opened_half: int = 0
    idle_refused: int = 0
    idle_evicted: int = 0  # closed without a word well before the keep-alive timeout: made room at the cap
    idle_closed: int = 0
    idle_reset: int = 0
    idle_overdue: int = 0
    idle_open_at_end: int = 0
    idle_connect_errors: int = 0
    idle_lifetimes: list[float] = field(default_factory=list)
    idle_half_lifetimes: list[float] = field(default_factory=list)
    idle_answers: Counter[str] = field(default_factory=Counter)
    held_samples: int = 0
    max_idle_held: int = 0  # idle connections the server held at once (taken, not refused)
    max_server_connections: int = 0  # all connections its process held at once, ours and the clients'
    # Slow readers
    slow_cap_waits: int = 0
    slow_sent: int = 0
    slow_accepted: int = 0
    slow_cut: int = 0
    slow_cut_after_answer: list[float] = field(default_factory=list)
    slow_cut_after_sent: list[float] = field(default_factory=list)
    slow_orphaned: int = 0  # cut off by a close the kernel then carried on (no reset)
    slow_orphan_queued: int = 0  # the most bytes such a socket still had queued
    slow_closed_gracefully: int = 0
    slow_not_cut: int = 0
    slow_refused_busy: int = 0
    slow_other: Counter[str] = field(default_factory=Counter)
    slow_abandoned: int = 0
    slow_job_ids: list[str] = field(default_factory=list)
    # Bursts: (seconds into the run, 202s, 503s of the queue bound, cap refusals, others)
    bursts: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    burst_cap_waits: int = 0
    burst_other: list[str] = field(default_factory=list)
    jobs: dict[str, BurstJob] = field(default_factory=dict)
    # The bound, sampled
    track_samples: int = 0
    track_cap_waits: int = 0
    max_unfinished: int = 0
    max_unfinished_at: float = 0.0
    over_bound_streak: int = 0
    over_bound: list[str] = field(default_factory=list)
    health_samples: int = 0
    max_queued_images: int = 0
    max_active_jobs: int = 0
    max_active_requests: int = 0
    max_health_estimate: int = 0  # queued_images + max_batch x shards in flight: an upper estimate
    # The API process's open files, sampled every FD_SAMPLE_S: all of them, and sockets among them.
    fd_samples: int = 0
    first_fds: tuple[int, int] = (0, 0)
    max_fds: int = 0
    max_socket_fds: int = 0
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


def cap_answer(data: bytes) -> bool:
    """Raw bytes a connection got: the cap's 503 (no X-Request-Id, which the app puts on every answer)."""
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return head.startswith(b"http/1.1 503") and b"x-request-id" not in head


def first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1")[:60] or "(nothing)"


def median_max(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"


class IdleFlood:
    """``count`` TCP connections that send nothing (one in HALF_HEAD_EVERY sends half a request head),
    each opened again as soon as the server has closed it: the cap answers those past it, the
    keep-alive timeout closes those it took."""

    def __init__(self, host: str, port: int, count: int, reopen_delay: float, stats: AbuseStats) -> None:
        self.host, self.port, self.count, self.reopen_delay, self.stats = host, port, count, reopen_delay, stats
        self.open_since: dict[int, float] = {}  # client port -> when it connected, while open and unanswered

    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._main(stop))

    async def _main(self, stop: threading.Event) -> None:
        tasks = [asyncio.create_task(self._connection(i, stop)) for i in range(self.count)]
        while not stop.is_set():
            await asyncio.sleep(HELD_SAMPLE_S)
            await self._count_held()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _count_held(self) -> None:
        """How many of these connections the server holds as its own (accepted, not refused, not
        closed) at once: open for HELD_AFTER_S with no answer (the cap answers within milliseconds),
        and owned by the server process (not waiting in the kernel's listen queue)."""
        now = time.monotonic()
        old = {port for port, since in self.open_since.items() if now - since >= HELD_AFTER_S}
        owned = await asyncio.to_thread(server_connections, self.port)
        with self.stats.lock:
            self.stats.held_samples += 1
            self.stats.max_idle_held = max(self.stats.max_idle_held, len(old & owned))
            self.stats.max_server_connections = max(self.stats.max_server_connections, len(owned))

    async def _connection(self, index: int, stop: threading.Event) -> None:
        half = index % HALF_HEAD_EVERY == HALF_HEAD_EVERY - 1
        rng = random.Random(index)
        await asyncio.sleep(index * 0.01)  # all of them open within the first few seconds
        while not stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), IDLE_CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                self.stats.add(idle_connect_errors=1)
                await asyncio.sleep(self.reopen_delay)
                continue
            opened = time.monotonic()
            port = writer.get_extra_info("sockname")[1]
            self.open_since[port] = opened
            self.stats.add(idle_opened=1, idle_opened_half=int(half))
            try:
                if half:
                    writer.write(HALF_HEAD)
                outcome, data = await self._until_closed(reader)
            except asyncio.CancelledError:
                self.stats.add(idle_open_at_end=1)
                writer.transport.abort()
                raise
            finally:
                self.open_since.pop(port, None)
            writer.transport.abort()  # a reset: no TIME_WAIT left on this side
            lifetime = time.monotonic() - opened
            with self.stats.lock:
                if outcome == "refused":
                    self.stats.idle_refused += 1
                elif outcome == "overdue":
                    self.stats.idle_overdue += 1
                else:
                    self.stats.idle_closed += outcome == "closed"
                    self.stats.idle_reset += outcome == "reset"
                    self.stats.idle_evicted += not data and lifetime < EVICTED_BEFORE_S
                    (self.stats.idle_half_lifetimes if half else self.stats.idle_lifetimes).append(lifetime)
                    if data:
                        self.stats.idle_answers[first_line(data)] += 1
            if outcome == "refused":
                await asyncio.sleep(rng.uniform(0.5, 1.5) * self.reopen_delay)

    async def _until_closed(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        data = b""
        deadline = time.monotonic() + IDLE_OVERDUE_S
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(4096), max(0.0, deadline - time.monotonic()))
                if not chunk:
                    return ("refused" if cap_answer(data) else "closed"), data
                data = (data + chunk)[:4096]
        except TimeoutError:
            return "overdue", data
        except OSError:
            return ("refused" if cap_answer(data) else "reset"), data


def read_http_response(sock: socket.socket) -> bytes:
    """One whole small response (head and Content-Length body) from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def server_connections(server_port: int) -> set[int]:
    """Client ports of the loopback connections the server process holds (its end ESTABLISHED and
    owned by a process: not in the kernel's listen queue, not closed), from /proc/net/tcp."""
    local = f"0100007F:{server_port:04X}"
    ports = set()
    try:
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 9 and fields[1] == local and fields[3] == "01" and fields[9] != "0":
                    ports.add(int(fields[2].split(":")[1], 16))
    except OSError:
        pass
    return ports


def server_side(server_port: int, client_port: int) -> tuple[int, int, int] | None:
    """(state, bytes queued to send, inode) of the server's end of one loopback connection, from
    /proc/net/tcp; inode 0: no process holds it any more (closed, the kernel still sending), None: gone.

    A server that closes a connection whose peer reads nothing does not reset it: the kernel keeps
    the socket, orphaned, and goes on offering the bytes already queued. So the client's end stays
    ESTABLISHED, and whether the server let go shows only here."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    try:
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 9 and fields[1] == local and fields[2] == remote:
                    return int(fields[3], 16), int(fields[4].split(":")[0], 16), int(fields[9])
    except OSError:
        pass
    return None


def slow_reader_once(host: str, port: int, rng: random.Random, stats: AbuseStats, stop: threading.Event) -> str:
    """One POST /generate of 4 base64 images, on a socket with a tiny receive buffer, never read:
    the server must cut it off ``--write-timeout`` after its writes stop moving. Only MSG_PEEK looks
    at the answer (its status line and headers), so the window stays shut. Cut off: the server's end
    of the connection no longer belongs to the server process (``server_side``), or was reset."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READER_RCVBUF)  # before connect: the window
        sock.settimeout(HEALTH_TIMEOUT_S)
        try:  # past the cap first, on this very connection: the server's own answer to GET /health
            sock.connect((host, port))
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            answer = read_http_response(sock)
        except OSError:
            answer = b""
        if not answer or cap_answer(answer):
            stats.add(slow_cap_waits=1)
            return "cap"
        body = json.dumps(
            {
                "prompts": [" ".join(rng.choices(WORDS, k=5))],
                "num_images_per_prompt": SLOW_READER_IMAGES,
                "seed": rng.randrange(SEED_MODULUS),
                "return_format": "base64",
            }
        ).encode()
        head = (
            f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        sent = time.monotonic()
        client_port = sock.getsockname()[1]
        stats.add(slow_sent=1)
        answer_at: float | None = None
        while True:
            try:
                peeked = sock.recv(2048, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                peeked = b""
            except OSError:
                peeked = b""
            now = time.monotonic()
            if peeked and answer_at is None:
                answer_at = now
                if not peeked.startswith(b"HTTP/1.1 200"):
                    with stats.lock:
                        if peeked.startswith(b"HTTP/1.1 503"):
                            stats.slow_refused_busy += 1
                        else:
                            stats.slow_other[first_line(peeked)] += 1
                    return "refused"
                stats.add(slow_accepted=1)
            if answer_at is not None:
                job = re.search(rb"(?im)^x-job-id:\s*([0-9a-f]+)", peeked)
                if job and job.group(1).decode() not in stats.slow_job_ids:
                    with stats.lock:
                        stats.slow_job_ids.append(job.group(1).decode())
            state = tcp_state(sock)
            theirs = server_side(port, client_port) if answer_at is not None else (0, 0, 1)
            if state == TCP_CLOSE or theirs is None or theirs[2] == 0:  # reset, or let go by the server
                with stats.lock:
                    stats.slow_cut += 1
                    stats.slow_cut_after_sent.append(now - sent)
                    if answer_at is not None:
                        stats.slow_cut_after_answer.append(now - answer_at)
                    if theirs is not None and theirs[2] == 0:
                        stats.slow_orphaned += 1
                        stats.slow_orphan_queued = max(stats.slow_orphan_queued, theirs[1])
                return "cut"
            if state == TCP_CLOSE_WAIT:  # closed with a FIN: the whole answer went out, or a small one
                with stats.lock:
                    stats.slow_closed_gracefully += 1
                    stats.slow_other[f"closed (FIN): {first_line(peeked)}"] += 1
                return "closed"
            if answer_at is not None and now - answer_at > SLOW_READER_OVERDUE_S:
                stats.add(slow_not_cut=1)
                return "not cut"
            if answer_at is None and stop.is_set():
                stats.add(slow_abandoned=1)  # still queued when the clock ran out
                return "abandoned"
            time.sleep(0.05 if answer_at is None else 0.2)
    finally:
        sock.close()


def slow_reader_loop(host: str, port: int, index: int, stats: AbuseStats, stop: threading.Event) -> None:
    rng = random.Random(0x5104 + index)
    while not stop.is_set():
        outcome = slow_reader_once(host, port, rng, stats, stop)
        stop.wait({"cap": 0.2, "refused": 1.0}.get(outcome, 2.0))


class Bursts:
    """BURST_SIZE clients, each holding one keep-alive connection past the cap for the whole run (a
    GET /health every KEEP_OPEN_S, under the keep-alive timeout), that every few seconds send
    POST /jobs of 40 images all at the same moment. Their connections are made once and kept, as a
    determined client would: made afresh for every burst, they would wait behind the idle flood."""

    def __init__(self, url: str, every: float, stats: AbuseStats, stop: threading.Event, started: float) -> None:
        self.url, self.every, self.stats, self.stop, self.started = url, every, stats, stop, started
        self.cond = threading.Condition()
        self.ready: set[int] = set()
        self.generation = 0
        self.firing: set[int] = set()  # the clients past the cap when the last burst was fired
        self.bodies: list[dict[str, Any]] = []
        self.outcomes: list[str] = []
        self.rng = random.Random(0xB0057)

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        """``cond.wait_for`` that also ends when the run stops (the caller holds ``cond``)."""
        deadline = time.monotonic() + timeout
        while not predicate() and not self.stop.is_set() and time.monotonic() < deadline:
            self.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    def run(self) -> None:
        clients = [start_thread(self._client, i, name=f"burst-client-{i}") for i in range(BURST_SIZE)]
        while not self.stop.wait(self.every):
            with self.cond:
                self._wait(lambda: len(self.ready) == BURST_SIZE, BURST_GATHER_S)
                if self.stop.is_set():
                    break
                number = self.generation + 1
                self.bodies = [
                    {
                        "prompts": [f"burst {number} job {i} " + " ".join(self.rng.choices(WORDS, k=4)) for _ in range(BURST_PROMPTS)],
                        "num_images_per_prompt": BURST_IMAGES_PER_PROMPT,
                        "seed": self.rng.randrange(SEED_MODULUS),
                        "return_format": "url",
                    }
                    for i in range(BURST_SIZE)
                ]
                self.firing = set(self.ready)
                self.outcomes = ["no connection"] * (BURST_SIZE - len(self.firing))
                self.generation = number
                fired = time.monotonic() - self.started
                self.cond.notify_all()
                self._wait(lambda: len(self.outcomes) == BURST_SIZE, CLIENT_TIMEOUT_S)
                outcomes = list(self.outcomes)
            counts = Counter(o if o in ("accepted", "busy", "cap") else "other" for o in outcomes)
            with self.stats.lock:
                self.stats.bursts.append((fired, counts["accepted"], counts["busy"], counts["cap"], counts["other"]))
                self.stats.burst_other.extend(o for o in outcomes if o not in ("accepted", "busy", "cap"))
        for client in clients:
            client.join()

    def _client(self, index: int) -> None:
        on_refusal = lambda: self.stats.add(burst_cap_waits=1)  # noqa: E731
        seen = 0
        with requests.Session() as session:
            while not self.stop.is_set():
                if index not in self.ready:
                    if get_through_cap(session, self.url + "/health", on_refusal, stop=self.stop, patience=BURST_GATHER_S) is None:
                        continue
                    with self.cond:
                        self.ready.add(index)
                        self.cond.notify_all()
                with self.cond:
                    self._wait(lambda: self.generation > seen, KEEP_OPEN_S)
                    generation, fire = self.generation, index in self.firing
                    body = self.bodies[index] if generation > seen else None
                if self.stop.is_set():
                    break
                if body is None:  # no burst yet: keep the connection open
                    try:
                        alive = not refused_by_cap(session.get(self.url + "/health", timeout=HEALTH_TIMEOUT_S))
                    except requests.RequestException:
                        alive = False
                    if not alive:
                        on_refusal()
                        with self.cond:
                            self.ready.discard(index)
                    continue
                seen = generation
                if not fire:  # not past the cap when the burst went: booked as "no connection"
                    continue
                outcome = self._post(session, body)
                with self.cond:
                    if outcome not in ("accepted", "busy"):
                        self.ready.discard(index)
                    self.outcomes.append(outcome)
                    self.cond.notify_all()

    def _post(self, session: requests.Session, body: dict[str, Any]) -> str:
        try:
            response = session.post(self.url + "/jobs", json=body, timeout=CLIENT_TIMEOUT_S)
        except requests.RequestException as exc:
            return f"error: {type(exc).__name__}: {exc}"
        if response.status_code == 202:
            data = response.json()
            job = BurstJob(data["job_id"], int(data["images_total"]), time.monotonic())
            with self.stats.lock:
                self.stats.jobs[job.job_id] = job
            return "accepted"
        if refused_by_cap(response):
            return "cap"
        if response.status_code == 503 and "busy" in response.text:
            return "busy"
        return f"HTTP {response.status_code}: {response.text[:160]}"


def track_once(session: requests.Session, url: str, stats: AbuseStats, bound: int, started: float, max_batch: int) -> None:
    """One sample of the bound. /health gives queued_images and active_jobs; the burst jobs give a
    lower bound of the images the server holds accepted and unfinished: only jobs whose 202 came back
    before this sweep began, each with what GET /jobs/{id} says is left (which only shrinks, so a value
    read during the sweep is at most what was left when it began)."""
    begun = time.monotonic()
    on_refusal = lambda: stats.add(track_cap_waits=1)  # noqa: E731
    response = get_through_cap(session, url + "/health", on_refusal, patience=10.0)
    try:
        health = response.json() if response is not None else None
    except ValueError:
        health = None
    with stats.lock:
        jobs = [job for job in stats.jobs.values() if not job.ended and job.accepted_at < begun]
    for job in jobs:
        reply = get_through_cap(session, url + f"/jobs/{job.job_id}", on_refusal, patience=10.0)
        if reply is None or reply.status_code != 200:
            continue
        data = reply.json()
        with stats.lock:
            job.state = str(data.get("state"))
            job.images_done = int(data.get("images_done") or 0)
            job.detail = data.get("detail")
            if job.state in FINISHED_JOB_STATES:
                job.ended = True
                if job.state == "done" and len(data.get("images") or []) != job.images:
                    job.detail = f"done with {len(data.get('images') or [])} image(s) of {job.images}"
                    job.state = "done-incomplete"
    unfinished = sum(job.unfinished for job in jobs)
    with stats.lock:
        stats.track_samples += 1
        if unfinished > stats.max_unfinished:
            stats.max_unfinished, stats.max_unfinished_at = unfinished, begun - started
        # Two sweeps in a row: an image a worker just finished is no longer counted by the server
        # while it is being stored, and GET /jobs/{id} counts it until it is.
        stats.over_bound_streak = stats.over_bound_streak + 1 if unfinished > bound else 0
        if stats.over_bound_streak >= 2:
            stats.over_bound.append(
                f"t={begun - started:.1f}s: {unfinished} image(s) of {len(jobs)} accepted burst job(s) unfinished, bound {bound}"
            )
        if health is not None and "queued_images" in health:
            stats.health_samples += 1
            queued = int(health.get("queued_images") or 0)
            stats.max_queued_images = max(stats.max_queued_images, queued)
            stats.max_active_jobs = max(stats.max_active_jobs, int(health.get("active_jobs") or 0))
            stats.max_active_requests = max(stats.max_active_requests, int(health.get("active_requests") or 0))
            in_flight = sum(int(w.get("shards_in_flight") or 0) for w in health.get("workers", []))
            stats.max_health_estimate = max(stats.max_health_estimate, queued + max_batch * in_flight)


def track_loop(url: str, stats: AbuseStats, bound: int, stop: threading.Event, started: float, max_batch: int) -> None:
    with requests.Session() as session:  # sampled more often than the keep-alive timeout: one connection
        while not stop.is_set():
            track_once(session, url, stats, bound, started, max_batch)
            stop.wait(TRACK_INTERVAL_S)


def cancel_burst_jobs(url: str, stats: AbuseStats) -> None:
    """DELETE the burst jobs still unfinished when the clock ran out, so that the stop does not wait for them."""
    with stats.lock:
        jobs = [job for job in stats.jobs.values() if not job.ended]
    with requests.Session() as session:
        for job in jobs:
            try:
                response = session.delete(url + f"/jobs/{job.job_id}", timeout=HEALTH_TIMEOUT_S)
            except requests.RequestException:
                continue
            if response.status_code == 200:
                with stats.lock:
                    job.cancelled_by_us = True


@dataclass
class LogFigures:
    lines: int = 0
    access: int = 0
    other: int = 0
    minutes: float = 0.0
    max_other_per_minute: int = 0  # most non-access lines in any 60 s window
    max_access_per_minute: int = 0
    errors: int = 0
    tracebacks: int = 0
    top: list[tuple[str, int]] = field(default_factory=list)
    went_away: set[str] = field(default_factory=set)
    # Per job id: when its last image was stored, and when the server gave up on its client.
    done_at: dict[str, float] = field(default_factory=dict)
    went_away_at: dict[str, float] = field(default_factory=dict)


def most_in_a_minute(times: list[float]) -> int:
    best, first = 0, 0
    for last, stamp in enumerate(times):
        while stamp - times[first] >= 60.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def read_log(path: Path) -> LogFigures:
    """Lines of the server's log: one access line per request (``service.access``) counted apart from
    the rest; a line without a time stamp (a traceback's) counts at the time of the line before it."""
    figures = LogFigures()
    access_times: list[float] = []
    other_times: list[float] = []
    messages: Counter[str] = Counter()
    stamp = None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return figures
    for line in text.splitlines():
        figures.lines += 1
        match = LOG_LINE.search(line)
        if match:
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
            logger, level, message = match.group(3), match.group(4), match.group(5)
        else:
            logger, level, message = "", "", line
        if logger == "service.access":
            figures.access += 1
            if stamp is not None:
                access_times.append(stamp)
            continue
        figures.other += 1
        if stamp is not None:
            other_times.append(stamp)
        figures.errors += level in ("ERROR", "CRITICAL")
        figures.tracebacks += line.startswith("Traceback")
        went = re.search(r"job ([0-9a-f]{32}): the client went away", message)
        if went:
            figures.went_away.add(went.group(1))
            if stamp is not None:
                figures.went_away_at[went.group(1)] = stamp
        done = re.search(r"job ([0-9a-f]{32}) done:", message)
        if done and stamp is not None:
            figures.done_at[done.group(1)] = stamp
        messages[re.sub(r"[0-9a-f]{32}|\d+(\.\d+)?", "#", f"{logger} {level} {message}".strip())[:110]] += 1
    stamps = access_times + other_times
    figures.minutes = (max(stamps) - min(stamps)) / 60 if len(stamps) > 1 else 0.0
    figures.max_other_per_minute = most_in_a_minute(other_times)
    figures.max_access_per_minute = most_in_a_minute(access_times)
    figures.top = messages.most_common(8)
    return figures


@dataclass
class Reconstruction:
    """Every job's accepted-unfinished images over time, rebuilt after the run from the server's job
    database (created_at, finished_at of cancelled and failed jobs) and the times its image files
    were written: all jobs, the clients' and slow readers' ones too, not only the burst jobs."""

    jobs: int = 0
    images: int = 0
    max_unfinished: int = 0
    max_at: float = 0.0  # wall clock
    problem: str | None = None


def reconstruct_unfinished(db_path: Path, image_dir: Path) -> Reconstruction:
    """A job counts from created_at with all its images; each image stops counting when its file was
    written (done jobs), or all that are left at finished_at (cancelled, failed). It overstates the
    server's own count for the few milliseconds between a shard leaving a worker and its files being
    written (the server stops counting a shard when it leaves the worker), and understates it for the
    moment between admission and created_at."""
    found = Reconstruction()
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            jobs = db.execute("SELECT id, state, images_total, created_at, finished_at FROM jobs").fetchall()
            images = db.execute("SELECT job_id, image_id FROM job_images").fetchall()
    except Exception as exc:  # noqa: BLE001 - a figure for the report, never a reason to fail the run
        found.problem = f"{type(exc).__name__}: {exc}"
        return found
    written: dict[str, list[float]] = {}
    for job_id, image_id in images:
        try:
            name = image_id if "." in image_id else f"{image_id}.png"  # <id>.<format>; a bare id is a PNG
            written.setdefault(job_id, []).append((image_dir / name).stat().st_mtime)
        except OSError:
            pass
    events: list[tuple[float, int]] = []
    for job_id, state, total, created_at, finished_at in jobs:
        found.jobs += 1
        found.images += total
        events.append((created_at, total))
        times = sorted(written.get(job_id, []))
        if state in ("cancelled", "failed") and finished_at is not None:
            before = [t for t in times if t <= finished_at]
            events.extend((t, -1) for t in before)
            events.append((finished_at, -(total - len(before))))
        else:
            events.extend((t, -1) for t in times)
    level = 0
    for when, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        if level > found.max_unfinished:
            found.max_unfinished, found.max_at = level, when
    return found


class Abuse:
    """The abuse threads of one run: idle flood, slow readers, bursts, and the tracker of the bound."""

    def __init__(self, args: argparse.Namespace, url: str, pid: int) -> None:
        self.args = args
        self.pid = pid
        self.url = url
        host_port = url.split("//", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.bound = ABUSE_MAX_QUEUED_IMAGES
        self.stats = AbuseStats()
        self.edge = edge_abuse.EdgeStats()
        self.stranger_sources = [f"127.0.0.{2 + i}" for i in range(args.abuse_stranger_addresses)]
        self.stop = threading.Event()  # set with the clients' stop
        self.stop_tracker = threading.Event()  # set once the burst jobs left are cancelled
        self.threads: list[threading.Thread] = []
        self.tracker: threading.Thread | None = None
        self.wall_start = time.time()
        # Open files of the API process, sampled often: connections past the cap hold an fd briefly.
        self.fd_sampler = TreeSampler(pid, FD_SAMPLE_S, memory=False, handles=True, sockets=True)

    def start(self, started: float) -> None:
        self.stats.load_start = os.getloadavg()
        self.wall_start = time.time()
        flood = IdleFlood(self.host, self.port, self.args.abuse_idle, self.args.abuse_reopen_delay, self.stats)
        self.threads.append(start_thread(flood.run, self.stop, name="idle-flood"))
        for i in range(self.args.abuse_slow_readers):
            self.threads.append(start_thread(slow_reader_loop, self.host, self.port, i, self.stats, self.stop, name=f"slow-reader-{i}"))
        strangers = edge_abuse.StrangerSockets(
            self.host, self.port, self.args.abuse_strangers, edge_abuse.RENEW_EVERY_S, self.stranger_sources, self.edge
        )
        self.threads.append(start_thread(strangers.run, self.stop, name="strangers"))
        heads = edge_abuse.HeaderFlood(self.host, self.port, self.args.abuse_heads, self.edge)
        self.threads.append(start_thread(heads.run, self.stop, name="header-flood"))
        self.threads.append(start_thread(edge_abuse.probe_loop, self.url, self.edge, self.stop, name="newcomer-probe"))
        bursts = Bursts(self.url, self.args.abuse_burst_every, self.stats, self.stop, started)
        self.threads.append(start_thread(bursts.run, name="bursts"))
        self.fd_sampler.start()
        self.tracker = start_thread(
            track_loop, self.url, self.stats, self.bound, self.stop_tracker, started, self.args.max_batch, name="tracker"
        )

    def finish(self) -> None:
        """After the clients' stop: end the abuse, cancel the burst jobs left, one last sample."""
        self.stop.set()
        for thread in self.threads:
            thread.join()
        self.fd_sampler.stop()
        files = self.fd_sampler.summary()
        with self.stats.lock:
            self.stats.fd_samples, self.stats.max_fds, self.stats.max_socket_fds = files.samples, files.max_fds, files.max_sockets
            self.stats.first_fds = (files.first_fds[0], files.first_sockets) if files.first_fds else (0, 0)
        cancel_burst_jobs(self.url, self.stats)
        self.stop_tracker.set()
        if self.tracker:
            self.tracker.join()
        with requests.Session() as session:
            track_once(session, self.url, self.stats, self.bound, time.monotonic(), self.args.max_batch)
        self.stats.load_end = os.getloadavg()


def print_abuse_summary(
    stats: Stats, run: Abuse, log: LogFigures, limit: int | None, rebuilt: Reconstruction, json_out: JsonOut
) -> list[Check]:
    """The abuse figures; returns the checks (printed by the caller, with the ones it adds)."""
    abuse = run.stats
    slow_done_to_cut = [
        log.went_away_at[job] - log.done_at[job] for job in abuse.slow_job_ids if job in log.went_away_at and job in log.done_at
    ]
    jobs = list(abuse.jobs.values())
    states = Counter("cancelled at the end" if job.cancelled_by_us else job.state for job in jobs)
    accepted = sum(b[1] for b in abuse.bursts)
    most_in_burst = max((b[1] for b in abuse.bursts), default=0)
    allowed_in_burst = ABUSE_MAX_QUEUED_IMAGES // (BURST_PROMPTS * BURST_IMAGES_PER_PROMPT)
    half = abuse.idle_opened_half
    rows: list[tuple[str, Any]] = [
        ("server bounds", " ".join(ABUSE_SERVER_ARGS)),
        ("load average", f"{' '.join(f'{x:.2f}' for x in abuse.load_start)} at start, "
         f"{' '.join(f'{x:.2f}' for x in abuse.load_end)} at end ({os.cpu_count()} CPUs)"),
        ("idle connections opened", f"{abuse.idle_opened} ({half} with half a request head), {run.args.abuse_idle} at a time"),
        ("  refused by the cap (503)", abuse.idle_refused),
        ("  closed to make room", f"{abuse.idle_evicted} (silently, within {EVICTED_BEFORE_S:.1f} s: the idle longest goes first)"),
        ("  closed by the server", f"{abuse.idle_closed + abuse.idle_reset} ({abuse.idle_reset} with a reset); "
         f"open for {median_max(abuse.idle_lifetimes)} (no bytes), {median_max(abuse.idle_half_lifetimes)} (half a head)"),
        ("  what the server said", ", ".join(f"{k!r} x{v}" for k, v in abuse.idle_answers.most_common(4)) or "nothing"),
        ("  held by the server", f"at most {abuse.max_idle_held} at once, open >= {HELD_AFTER_S:g} s without a 503 "
         f"(all connections the server held: at most {abuse.max_server_connections}; {abuse.held_samples} samples)"),
        ("  not closed in time", f"{abuse.idle_overdue} (open > {IDLE_OVERDUE_S:g} s)"),
        ("  open when the run ended", abuse.idle_open_at_end),
        ("  connect errors/timeouts", abuse.idle_connect_errors),
        *edge_abuse.summary_rows(run.edge, run.args.abuse_strangers, len(run.stranger_sources), run.args.abuse_heads),
        ("slow readers sent", f"{abuse.slow_sent} POST /generate ({SLOW_READER_IMAGES} base64 images; "
         f"{abuse.slow_cap_waits} connection(s) turned away by the cap first)"),
        ("  answered 200, unread", abuse.slow_accepted),
        ("  cut off by the server", f"{abuse.slow_cut}: {median_max(abuse.slow_cut_after_answer)} after the answer began, "
         f"{median_max(abuse.slow_cut_after_sent)} after the request"),
        ("  server side (its log)", f"cut {median_max(slow_done_to_cut)} after the job was done (its body then due)"),
        ("  how", f"{abuse.slow_orphaned} closed without a reset: the kernel kept the socket, up to "
         f"{abuse.slow_orphan_queued / 2**10:.0f} KiB unsent, after the server let go"),
        ("  confirmed in the log", f"{len(log.went_away & set(abuse.slow_job_ids))} of {len(abuse.slow_job_ids)} "
         "job(s): 'the client went away; the job goes on'"),
        ("  not cut off / closed", f"{abuse.slow_not_cut} / {abuse.slow_closed_gracefully}"),
        ("  refused 503 (queue full)", abuse.slow_refused_busy),
        ("  other answers", dict(abuse.slow_other) or 0),
        ("  no answer by the end", abuse.slow_abandoned),
        ("bursts", f"{len(abuse.bursts)} x {BURST_SIZE} POST /jobs of {BURST_PROMPTS * BURST_IMAGES_PER_PROMPT} images"),
        ("  accepted (202)", f"{accepted}; at most {most_in_burst} in one burst (the bound allows {allowed_in_burst})"),
        ("  refused 503 (queue full)", sum(b[2] for b in abuse.bursts)),
        ("  refused by the cap", f"{sum(b[3] for b in abuse.bursts)} (after {abuse.burst_cap_waits} retried connects)"),
        ("  other", f"{sum(b[4] for b in abuse.bursts)} {abuse.burst_other[:3] if abuse.burst_other else ''}".strip()),
        ("  burst jobs ended", dict(states) or 0),
        ("accepted unfinished (max)", f"{abuse.max_unfinished} image(s) of burst jobs at t={abuse.max_unfinished_at:.0f}s, "
         f"bound {ABUSE_MAX_QUEUED_IMAGES} ({abuse.track_samples} samples)"),
        ("all jobs, rebuilt after", rebuilt.problem or f"at most {rebuilt.max_unfinished} image(s) accepted and unfinished "
         f"at t={rebuilt.max_at - run.wall_start:.0f}s ({rebuilt.jobs} jobs, {rebuilt.images} images; job database and file times)"),
        ("/health (max)", f"queued_images {abuse.max_queued_images}, active_jobs {abuse.max_active_jobs}, "
         f"active_requests {abuse.max_active_requests}; queued + {run.args.max_batch} x shards in flight "
         f"{abuse.max_health_estimate} (an upper estimate) "
         f"({abuse.health_samples} samples)"),
        ("client connects past cap", f"{stats.cap_waits} retried (tracker: {abuse.track_cap_waits}); "
         f"{stats.refused_cap} request(s) refused by the cap"),
        ("API RSS start/peak/end", f"{mib(stats.first_api_rss, 0)} / {mib(stats.peak_api_rss, 0)} / {mib(stats.last_api_rss, 0)}"),
        ("API open fds (max)", f"{max(stats.max_fds, abuse.max_fds)} of a limit of {limit if limit is not None else 'unknown'} "
         f"(--max-connections {ABUSE_MAX_CONNECTIONS}); sampled every {FD_SAMPLE_S:g} s: at most {abuse.max_fds} "
         f"({abuse.max_socket_fds} sockets), {abuse.first_fds[0]} ({abuse.first_fds[1]} sockets) at the first sample"),
        ("server log", f"{log.lines} lines in {log.minutes:.1f} min: {log.access} access "
         f"({log.access / log.minutes if log.minutes else 0:.0f}/min, max {log.max_access_per_minute} in 60 s), "
         f"{log.other} other ({log.other / log.minutes if log.minutes else 0:.0f}/min, max {log.max_other_per_minute} in 60 s)"),
        ("  errors / tracebacks", f"{log.errors} / {log.tracebacks}"),
    ]
    report_pairs(rows, title="\n== abuse ==", json_out=json_out, name="abuse")
    print("  most frequent non-access log lines:")
    for message, count in log.top:
        print(f"    {count:>6}  {message}")
    failed_jobs = [job for job in jobs if job.state not in ("done", "cancelled") and job.ended]
    for job in failed_jobs[:MAX_FAILURE_EXAMPLES]:
        print(f"  burst job {job.job_id} {job.state}: {job.detail}")
    for line in abuse.over_bound[:MAX_FAILURE_EXAMPLES]:
        print(f"  past the bound: {line}")
    growth = stats.last_api_rss - stats.first_api_rss
    peak_growth = stats.peak_api_rss - stats.first_api_rss
    checks = [
        Check(stats.images_lost == 0, f"images lost: {stats.images_lost} (must be 0)"),
        Check(not abuse.over_bound and abuse.track_samples > 0,
              f"accepted unfinished burst images at most {abuse.max_unfinished}, bound {ABUSE_MAX_QUEUED_IMAGES}"),
        Check(most_in_burst <= allowed_in_burst, f"most jobs accepted in one burst: {most_in_burst} (at most {allowed_in_burst})"),
        Check(abuse.max_queued_images <= ABUSE_MAX_QUEUED_IMAGES and abuse.health_samples > 0,
              f"/health queued_images at most {abuse.max_queued_images}, bound {ABUSE_MAX_QUEUED_IMAGES}"),
        Check(not failed_jobs, f"burst jobs failed: {len(failed_jobs)}"),
        Check(growth <= RSS_GROWTH_LIMIT and peak_growth <= RSS_GROWTH_LIMIT,
              f"API RSS growth: end {growth / 2**20:+.0f} MiB, peak {peak_growth / 2**20:+.0f} MiB (at most +{mib(RSS_GROWTH_LIMIT, 0)})"),
        Check(limit is not None and 0 < max(stats.max_fds, abuse.max_fds) < limit,
              f"API open fds at most {max(stats.max_fds, abuse.max_fds)}, limit {limit}"),
        Check(abuse.idle_overdue == 0 and abuse.idle_closed + abuse.idle_reset > 0,
              f"idle connections closed by the server: {abuse.idle_closed + abuse.idle_reset}, none open past {IDLE_OVERDUE_S:g} s "
              f"({abuse.idle_overdue} were)"),
        Check(abuse.idle_evicted + abuse.idle_refused > 0,
              f"connections past the cap: {abuse.idle_evicted} idle ones closed to make room, {abuse.idle_refused} answered 503"),
        Check(abuse.held_samples > 0 and abuse.max_idle_held <= ABUSE_MAX_CONNECTIONS,  # 0: each made room at once
              f"idle connections the server held at once: at most {abuse.max_idle_held} (cap {ABUSE_MAX_CONNECTIONS})"),
        Check(abuse.slow_not_cut == 0 and abuse.slow_cut > 0 and abuse.slow_closed_gracefully == 0,
              f"slow readers cut off: {abuse.slow_cut} of {abuse.slow_accepted} answered (none left hanging: {abuse.slow_not_cut})"),
        Check(log.max_other_per_minute <= LOG_LINES_PER_MINUTE_LIMIT,
              f"log lines other than access: at most {log.max_other_per_minute} in 60 s (at most {LOG_LINES_PER_MINUTE_LIMIT})"),
        *edge_abuse.checks(run.edge),
    ]
    return checks


# --------------------------------------------------------------------------------------------------
# The run


def start_thread(target: Callable[..., None], *args: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def print_summary(args: argparse.Namespace, stats: Stats, duration: float, restarts: int | None, measured_rss: bool, json_out: JsonOut) -> None:
    rows: list[tuple[str, Any]] = [
        ("duration", f"{duration:.1f} s"),
        ("clients", args.clients),
        ("requests sent", stats.sent),
        ("requests done (success)", stats.done),
        ("refused (503)", stats.refused),
        ("failed", stats.failed),
        ("images requested", stats.images_requested),
        ("images returned", stats.images_returned),
        ("images lost", f"{stats.images_lost}" + ("" if stats.images_lost == 0 else "   <-- MUST BE 0")),
        ("kills", stats.kills if not stats.kill_errors else f"{stats.kills} ({stats.kill_errors} failed)"),
        ("worker restarts (/health)", "unknown (server unreachable)" if restarts is None else restarts),
        ("peak RSS, API process", mib(stats.peak_api_rss, 0) if measured_rss else "n/a (--url: not our process)"),
        ("peak RSS, API + workers", mib(stats.peak_total_rss, 0) if measured_rss else "n/a (--url: not our process)"),
        ("images/s", f"{stats.images_returned / duration:.2f}" if duration > 0 else "n/a"),
    ]
    if measured_rss and stats.first_handles and stats.last_handles:
        (fds0, threads0), (fds1, threads1) = stats.first_handles, stats.last_handles
        rows.append(("API fds / threads", f"{fds0} -> {fds1} / {threads0} -> {threads1} (first -> last sample)"))
    report_pairs(rows, title="\n== soak summary ==", json_out=json_out, name="summary")
    json_out.add("failures", stats.failures)
    json_out.add("kills", stats.kill_log)
    if stats.failures:
        print(f"\nfirst {len(stats.failures)} failure(s):")
        for line in stats.failures:
            print("  " + line)
    if stats.kill_log:
        print("\nkills:")
        for line in stats.kill_log:
            print("  " + line)


def soak(
    args: argparse.Namespace, url: str, server_pid: int | None, abuse: Abuse | None = None
) -> tuple[Stats, float, int | None]:
    """Run clients, killer and sampler (and the abuse, if any) for the given minutes; returns stats,
    duration and restarts seen."""
    stats = Stats()
    with requests.Session() as session:
        baseline = total_restarts(get_health(session, url)) or 0
    stop_clients = threading.Event()
    started = time.monotonic()
    # Peak RSS, sampled: the API process alone shows leaks in the event loop, the sum with its
    # workers shows worker bloat; its fds and threads grow if a restart leaves a pipe behind.
    sampler = TreeSampler(server_pid, SAMPLE_INTERVAL_S, handles=True).start() if server_pid else None
    abusing = abuse is not None
    killer = (
        start_thread(killer_loop, url, args.kill_every, stats, stop_clients, started, abusing, name="killer")
        if args.kill_every > 0
        else None
    )
    clients = [
        start_thread(client_loop, url, stats, stop_clients, started, args.seed + i, abusing, name=f"client-{i}")
        for i in range(args.clients)
    ]
    if abuse:
        abuse.start(started)
    try:
        stop_clients.wait(args.minutes * 60)
    except KeyboardInterrupt:
        print("interrupted: finishing the requests in flight", file=sys.stderr)
    stop_clients.set()
    if abuse:
        abuse.stop.set()
    for thread in clients:
        thread.join()
    duration = time.monotonic() - started
    if killer:
        killer.join()
    if abuse:
        abuse.finish()
    with requests.Session() as session:
        seen = total_restarts(get_health_through_cap(session, url, stats) if abuse else get_health(session, url))
    if sampler:
        sampler.stop()
        stats.take_samples(sampler.summary())
    return stats, duration, None if seen is None else seen - baseline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Soak the image API: concurrent clients check every image while a killer SIGKILLs workers. "
        "Exit status 0 when no accepted image was lost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the clients keep sending")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the server this script starts")
    parser.add_argument("--max-batch", type=int, default=4, help="--max-batch of the server this script starts")
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between worker SIGKILLs; 0 disables. Keep it longer than a shard plus a worker restart: a shard that dies with two workers is failed on purpose (the poison-shard rule)")
    parser.add_argument(
        "--url", default="", help="use this running server instead of starting one (no RSS then; kills need its workers on this host)"
    )
    parser.add_argument(
        "--model-cache",
        default=str(Path.home() / ".cache" / "sdxl-lightning-server"),
        help="--model-cache of the server this script starts (where the tiny model is built)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the clients' random request mix")
    parser.add_argument("--keep-images", action="store_true", help="keep the url images of the started server")
    parser.add_argument(
        "--abuse",
        action="store_true",
        help="also flood idle connections, run slow readers and bursts of POST /jobs against a server started with "
        f"{' '.join(ABUSE_SERVER_ARGS)}, and check that its bounds hold (exit status 1 if one does not)",
    )
    parser.add_argument("--abuse-idle", type=int, default=300, help="idle TCP connections held open at a time (--abuse)")
    parser.add_argument(
        "--abuse-reopen-delay", type=float, default=0.25, help="seconds an idle connection the cap refused waits before it opens again (--abuse)"
    )
    parser.add_argument("--abuse-slow-readers", type=int, default=2, help="concurrent slow readers (--abuse)")
    parser.add_argument(
        "--abuse-burst-every", type=float, default=5.0, help=f"seconds between bursts of {BURST_SIZE} POST /jobs (--abuse)"
    )
    parser.add_argument(
        "--abuse-strangers", type=int, default=2 * ABUSE_MAX_CONNECTIONS,
        help=f"idle sockets a stranger holds from other loopback addresses, all renewed every {edge_abuse.RENEW_EVERY_S:g} s (--abuse)",
    )  # fmt: skip
    parser.add_argument("--abuse-stranger-addresses", type=int, default=2, help="loopback addresses the stranger uses: 127.0.0.2 and up (--abuse)")
    parser.add_argument(
        "--abuse-heads", type=int, default=20,
        help=f"connections at a time sending unfinished request heads of {edge_abuse.HEAD_FLOOD_BYTES / 1e6:g} MB (--abuse)",
    )  # fmt: skip
    parser.add_argument(
        "--abuse-slow-dns", type=int, default=12,
        help="clients sending POST /jobs about twice a second with webhook hosts whose nameserver never answers (--abuse)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the summary (and the abuse figures and checks) as JSON here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.workers < 1 or args.max_batch < 1:
        parser.error("--clients, --workers and --max-batch must be at least 1")
    if args.minutes <= 0 or args.kill_every < 0:
        parser.error("--minutes must be positive and --kill-every not negative")
    if args.abuse and args.url:
        parser.error("--abuse starts its own server (it reads the server's RSS, open files and log): leave out --url")
    if args.abuse_strangers < 0 or args.abuse_heads < 0 or not 1 <= args.abuse_stranger_addresses <= 250:
        parser.error("--abuse-strangers and --abuse-heads must not be negative, --abuse-stranger-addresses 1 to 250")
    if args.abuse_idle < 0 or args.abuse_slow_readers < 0 or args.abuse_burst_every <= 0 or args.abuse_reopen_delay < 0:
        parser.error("--abuse-idle, --abuse-slow-readers and --abuse-reopen-delay must not be negative, --abuse-burst-every positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # --abuse: webhook names go to a nameserver that never answers (benchmarks/slow_dns.py)
    nameserver = slow_dns.SilentNameserver() if args.abuse else None
    server_args = (*ABUSE_SERVER_ARGS, *nameserver.server_args()) if nameserver else ()
    server = None if args.url else bench_server(args.workers, args.max_batch, args.model_cache, *server_args, prefix="sdxl-soak-")
    json_out = JsonOut(args.json, "benchmarks.soak")
    url = args.url.rstrip("/") if args.url else ""
    if server:
        print(f"starting server: {' '.join(server.args)}\n  in {server.workdir}", flush=True)
        try:
            server.start()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        url = server.url
    else:
        print(f"using the running server at {url}: RSS cannot be measured (it is not our process)", flush=True)
    print(f"soaking {url} with {args.clients} client(s) for {args.minutes:g} min, kill every {args.kill_every:g} s", flush=True)
    abuse = Abuse(args, url, server.pid) if args.abuse and server and server.pid else None
    if abuse:
        print(
            f"abuse: {args.abuse_idle} idle connections at a time, {args.abuse_slow_readers} slow reader(s), "
            f"{BURST_SIZE} POST /jobs of {BURST_PROMPTS * BURST_IMAGES_PER_PROMPT} images every {args.abuse_burst_every:g} s; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            flush=True,
        )
    checks: list[tuple[bool, str]] = []
    limit = None
    slow_dns_abuse = slow_dns.SlowDnsAbuse(url, args.abuse_slow_dns, source=SLOW_DNS_SOURCE) if abuse and args.abuse_slow_dns else None
    slow_dns_result: tuple[bool, str] | None = None
    try:
        if slow_dns_abuse:
            slow_dns_abuse.start()
        try:
            stats, duration, restarts = soak(args, url, server.pid if server else None, abuse)
        finally:
            slow_dns_result = slow_dns_abuse.finish() if slow_dns_abuse else None
        print_summary(args, stats, duration, restarts, measured_rss=server is not None, json_out=json_out)
        if abuse and server and server.pid:
            limit = fd_limit(server.pid)  # read while it runs: the server raises its soft limit at start
    finally:
        if server:
            code = server.stop()
            print(f"\nserver stopped with SIGTERM, exit code {code}" + ("" if code == 0 else "   <-- expected 0"))
            if abuse and "stats" in locals():
                rebuilt = reconstruct_unfinished(server.job_db, server.image_dir)
                checks = print_abuse_summary(stats, abuse, read_log(server.log_path), limit, rebuilt, json_out)
                if slow_dns_result is not None:
                    passed, line = slow_dns_result
                    checks.append(Check(passed, f"slow-DNS webhooks ({args.abuse_slow_dns} clients): {line}"))
                checks.append(Check(code == 0, f"server exit code on SIGTERM: {code} (must be 0)"))
                report_checks(checks, title="\n== checks ==", json_out=json_out)
            if not args.keep_images:
                server.remove_images()
            print(f"server log: {server.log_path}")
    json_out.announce()
    if abuse:
        return 0 if checks and all(check.ok for check in checks) else 1
    return 0 if stats.images_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
