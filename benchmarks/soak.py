"""Soak test: many clients, workers killed under them, and not one image may be lost.

Unit and integration tests show that each fault path works once; a soak shows that they keep working
when they overlap for minutes: requests in flight while a worker is SIGKILLed, restarts while the
queue is full, 503s while no worker is ready, and memory that must not creep up. It is a script, not
part of the pytest suite, because it runs for minutes and its numbers are for a person to read.

    python -m benchmarks.soak --clients 4 --minutes 5 --workers 2 --kill-every 15

By default it starts its own ``python -m service --model tiny`` on a free loopback port (so it can
read the RSS of the server and its workers, and SIGKILL the workers); ``--url`` points it at a
running server instead. Exit status 0 when no accepted image was lost, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

try:  # psutil is in the venv; /proc is the fallback so the script still runs without it.
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_MODULUS = 2**32
# Long enough for a full batch on a slow CPU worker; heartbeats keep the connection itself alive.
CLIENT_TIMEOUT_S = 300.0
HEALTH_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 180.0
SAMPLE_INTERVAL_S = 0.5
# The server drains for up to --grace-period (60 s by default) after SIGTERM; give it that and more.
STOP_TIMEOUT_S = 90.0
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


# --------------------------------------------------------------------------------------------------
# The server under test


def free_port() -> int:
    """A port the kernel just handed out, so parallel runs (and the test suite) do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnServer:
    """``python -m service --model tiny`` in a subprocess, logging to a file in its own temp dir."""

    def __init__(self, workers: int, max_batch: int, model_cache: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="sdxl-soak-"))
        self.log_path = self.workdir / "server.log"
        self.image_dir = self.workdir / "images"
        self.port = free_port()
        self.args = [
            sys.executable, "-m", "service", "--model", "tiny",
            "--workers", str(workers), "--max-batch", str(max_batch),
            "--port", str(self.port), "--host", "127.0.0.1",
            "--image-dir", str(self.image_dir), "--model-cache", model_cache,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        """Start and wait for a 200 from /health: a worker must be ready before the clock starts."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args, cwd=self.workdir, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} before it was healthy; see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s; see {self.log_path}")

    def stop(self) -> int | None:
        """SIGTERM, as supervisord does, and wait for the drain: a clean stop must exit 0."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server did not stop {STOP_TIMEOUT_S:.0f} s after SIGTERM; sending SIGKILL", file=sys.stderr)
                self.process.kill()
                self.process.wait(10)
        if self._log_file:
            self._log_file.close()
        return self.process.returncode

    def remove_images(self) -> None:
        """Every job's images are ~MiBs each; a long soak would otherwise leave GiBs in /tmp. The job
        database goes with them (var/ of the server's working directory)."""
        shutil.rmtree(self.image_dir, ignore_errors=True)
        shutil.rmtree(self.workdir / "var", ignore_errors=True)


def get_health(session: requests.Session, url: str) -> dict[str, Any] | None:
    """The /health body whatever its status (503 still lists the workers), or None if unreachable."""
    try:
        return session.get(url + "/health", timeout=HEALTH_TIMEOUT_S).json()
    except (requests.RequestException, ValueError):
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


def check_images(session: requests.Session, job: Job, images: list[Any]) -> tuple[int, list[str]]:
    """How many images are real PNGs (decoded, or fetched from their url), and what was wrong with the rest."""
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
                reply = session.get(item, timeout=CLIENT_TIMEOUT_S)
            except requests.RequestException as exc:
                problems.append(f"GET {item}: {type(exc).__name__}: {exc}")
                continue
            if reply.status_code != 200 or reply.headers.get("Content-Type") != "image/png" or reply.content[:8] != PNG_MAGIC:
                problems.append(f"GET {item}: {reply.status_code} {reply.headers.get('Content-Type')}")
                continue
        good += 1
    return good, problems


def check_success(session: requests.Session, job: Job, data: dict[str, Any]) -> tuple[int, list[str]]:
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
    good, image_problems = check_images(session, job, images[: job.images])
    return good, problems + image_problems


def run_one(session: requests.Session, url: str, job: Job, stats: Stats, stop: threading.Event, started: float) -> None:
    """Send one request and book its outcome; a 503 is a refusal (wait Retry-After), never a loss."""
    stats.add(sent=1)
    sent_at = time.monotonic() - started
    try:
        response = session.post(url + "/generate", json=job.body(), timeout=CLIENT_TIMEOUT_S)
    except requests.RequestException as exc:
        stamp = f"t={sent_at:.1f}-{time.monotonic() - started:.1f}s {job.describe()}"
        stats.add(images_requested=job.images)
        stats.record_failure(f"{stamp}: {type(exc).__name__}: {exc}")
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
    good, problems = check_success(session, job, data)
    stats.add(images_returned=good)
    if problems:
        stats.record_failure(f"{stamp}: HTTP 200 but " + "; ".join(problems[:3]))
    else:
        stats.add(done=1)


def client_loop(url: str, stats: Stats, stop: threading.Event, started: float, seed: int) -> None:
    """One client: requests back to back until the clock runs out; the one in flight is finished."""
    rng = random.Random(seed)
    with requests.Session() as session:
        index = seed  # so clients do not all use the same format at the same time
        while not stop.is_set():
            run_one(session, url, make_job(rng, index), stats, stop, started)
            index += 1


# --------------------------------------------------------------------------------------------------
# Killer and sampler


def kill_one_worker(session: requests.Session, url: str, rng: random.Random, stats: Stats, started: float) -> None:
    """SIGKILL a random worker that holds (or could hold) work: killing a starting one tests nothing new."""
    health = get_health(session, url)
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


def killer_loop(url: str, every: float, stats: Stats, stop: threading.Event, started: float) -> None:
    rng = random.Random(0xC0FFEE)
    with requests.Session() as session:
        while not stop.wait(every):
            kill_one_worker(session, url, rng, stats, started)


def rss_of(pid: int) -> int:
    """Resident bytes of one process, 0 if it is gone (workers die on purpose here)."""
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    """Every descendant (workers, and multiprocessing's resource tracker): all of it is the server's memory."""
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for path in Path("/proc").glob(f"{parent}/task/*/children"):
            try:
                kids = [int(x) for x in path.read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            frontier.extend(kids)
    return found


def handles_of(pid: int) -> tuple[int, int] | None:
    """(open fds, threads) of one process: every restart that leaves a pipe or feeder thread behind shows here."""
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            return process.num_fds(), process.num_threads()
        except psutil.Error:
            return None
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
    return fds, threads


def sampler_loop(server_pid: int, stats: Stats, stop: threading.Event) -> None:
    """Peak RSS, sampled: the API process alone shows leaks in the event loop, the sum shows worker bloat."""
    while not stop.is_set():
        api = rss_of(server_pid)
        total = api + sum(rss_of(child) for child in children_of(server_pid))
        handles = handles_of(server_pid)
        with stats.lock:
            stats.peak_api_rss = max(stats.peak_api_rss, api)
            stats.peak_total_rss = max(stats.peak_total_rss, total)
            stats.rss_samples += 1
            if handles is not None:
                stats.first_handles = stats.first_handles or handles
                stats.last_handles = handles
        stop.wait(SAMPLE_INTERVAL_S)


# --------------------------------------------------------------------------------------------------
# The run


def start_thread(target: Callable[..., None], *args: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def print_summary(args: argparse.Namespace, stats: Stats, duration: float, restarts: int | None, measured_rss: bool) -> None:
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
        ("peak RSS, API process", mib(stats.peak_api_rss) if measured_rss else "n/a (--url: not our process)"),
        ("peak RSS, API + workers", mib(stats.peak_total_rss) if measured_rss else "n/a (--url: not our process)"),
        ("images/s", f"{stats.images_returned / duration:.2f}" if duration > 0 else "n/a"),
    ]
    if measured_rss and stats.first_handles and stats.last_handles:
        (fds0, threads0), (fds1, threads1) = stats.first_handles, stats.last_handles
        rows.append(("API fds / threads", f"{fds0} -> {fds1} / {threads0} -> {threads1} (first -> last sample)"))
    print("\n== soak summary ==")
    for label, value in rows:
        print(f"{label:<27} {value}")
    if stats.failures:
        print(f"\nfirst {len(stats.failures)} failure(s):")
        for line in stats.failures:
            print("  " + line)
    if stats.kill_log:
        print("\nkills:")
        for line in stats.kill_log:
            print("  " + line)


def soak(args: argparse.Namespace, url: str, server_pid: int | None) -> tuple[Stats, float, int | None]:
    """Run clients, killer and sampler for the given minutes; returns stats, duration and restarts seen."""
    stats = Stats()
    with requests.Session() as session:
        baseline = total_restarts(get_health(session, url)) or 0
    stop_clients, stop_sampler = threading.Event(), threading.Event()
    started = time.monotonic()
    sampler = start_thread(sampler_loop, server_pid, stats, stop_sampler, name="sampler") if server_pid else None
    killer = (
        start_thread(killer_loop, url, args.kill_every, stats, stop_clients, started, name="killer")
        if args.kill_every > 0
        else None
    )
    clients = [
        start_thread(client_loop, url, stats, stop_clients, started, args.seed + i, name=f"client-{i}")
        for i in range(args.clients)
    ]
    try:
        stop_clients.wait(args.minutes * 60)
    except KeyboardInterrupt:
        print("interrupted: finishing the requests in flight", file=sys.stderr)
    stop_clients.set()
    for thread in clients:
        thread.join()
    duration = time.monotonic() - started
    if killer:
        killer.join()
    with requests.Session() as session:
        seen = total_restarts(get_health(session, url))
    stop_sampler.set()
    if sampler:
        sampler.join()
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
    args = parser.parse_args(argv)
    if args.clients < 1 or args.workers < 1 or args.max_batch < 1:
        parser.error("--clients, --workers and --max-batch must be at least 1")
    if args.minutes <= 0 or args.kill_every < 0:
        parser.error("--minutes must be positive and --kill-every not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None if args.url else OwnServer(args.workers, args.max_batch, args.model_cache)
    url = args.url.rstrip("/") if args.url else ""
    if server:
        print(f"starting server: {' '.join(server.args)}\n  in {server.workdir}", flush=True)
        try:
            server.start()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            server.stop()
            return 2
        url = server.url
    else:
        print(f"using the running server at {url}: RSS cannot be measured (it is not our process)", flush=True)
    print(f"soaking {url} with {args.clients} client(s) for {args.minutes:g} min, kill every {args.kill_every:g} s", flush=True)
    try:
        stats, duration, restarts = soak(args, url, server.pid if server else None)
        print_summary(args, stats, duration, restarts, measured_rss=server is not None)
    finally:
        if server:
            code = server.stop()
            print(f"\nserver stopped with SIGTERM, exit code {code}" + ("" if code == 0 else "   <-- expected 0"))
            if not args.keep_images:
                server.remove_images()
            print(f"server log: {server.log_path}")
    return 0 if stats.images_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
