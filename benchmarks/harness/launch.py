"""Child processes a benchmark (or a test) runs on loopback: the API server, remote worker boxes.

Every one logs to a file the caller names, starts with this checkout (or another worktree) first on
``PYTHONPATH``, and stops the same way: SIGTERM (a clean drain, as supervisord stops it), then SIGKILL
of the process, or of its whole session when it has one of its own. Only the standard library is
imported here: ``benchmarks/gpu_throughput.py`` imports this module on the GPU box before anything
is installed (``requests`` is imported where a health check needs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
# One worker ready: loading the tiny model on a busy 2-core machine takes well under this.
STARTUP_TIMEOUT_S = 180.0
HEALTH_READY_STATES = ("ready", "busy")
# A benchmark's server drains for up to --grace-period (60 s by default) after SIGTERM: that and more.
BENCH_STOP_TIMEOUT_S = 90.0


class NotReached(AssertionError, RuntimeError):
    """A /health condition not reached in time: an AssertionError to a test, a RuntimeError to a benchmark."""


def free_port() -> int:
    """A loopback port the kernel just handed out, so parallel runs (and test workers) do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def checkout_env(repo: Path = REPO, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``repo`` first on PYTHONPATH, then ``env`` on top."""
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


def stop_process(process: subprocess.Popen[Any], timeout: float, *, group: bool = False, signalled: bool = False, name: str = "process") -> int | None:
    """SIGTERM (unless ``signalled``: a second TERM would mean "stop now" to the server), wait up to
    ``timeout`` s, then SIGKILL; with ``group`` the whole session is SIGKILLed at the end in any case
    (a box's workers, a compile's helpers), so nothing of it outlives the stop."""
    if process.poll() is None:
        if not signalled:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop {timeout:.0f} s after SIGTERM; SIGKILL", file=sys.stderr, flush=True)
            process.kill()
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    return process.returncode


def kill_process(process: subprocess.Popen[Any], wait: float = 10.0) -> None:
    """SIGKILL, as a power cut or an OOM killer would, and reap it."""
    if process.poll() is None:
        process.kill()
        process.wait(wait)


class Launched:
    """One child process, its stdout and stderr appended to ``log_path`` (a restart appends too).

    ``args`` is read at ``launch()``, so a caller may still wrap it (``prlimit ...``) before."""

    def __init__(
        self, args: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None, *, new_session: bool = False, name: str = "process"
    ) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.cwd = cwd
        self.log_path = log_path
        self.env = env if env is not None else checkout_env()
        self.new_session = new_session
        self.name = name
        self.stop_timeout = 30.0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._terminated: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the life of the process, closed in stop()
        self.process = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
        )  # fmt: skip

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop`` then waits, without a second TERM)."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            self._terminated = self.process

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` s (``stop_timeout`` by default), SIGKILL; the exit code
        (None if never started)."""
        if self.process is None:
            return None
        code = stop_process(self.process, self.stop_timeout if timeout is None else timeout, group=self.new_session, signalled=self._terminated is self.process, name=self.name)
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL, as a power cut or an OOM killer would."""
        if self.process is None:
            return
        kill_process(self.process)
        if self.new_session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """The whole log so far ("" before there is one)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty log)"


class ApiServer(Launched):
    """``python -m service`` on a loopback port, with its image folder (and job database) in ``workdir``.

    ``launcher``: what follows the interpreter before the flags (a wrapper that watches the server,
    e.g. tests/import_probe.py). ``job_db`` False leaves the server's default (``var/jobs.sqlite3``
    in ``workdir``), for a checkout older than the flag."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        repo: Path = REPO,
        launcher: Sequence[str] = ("-m", "service"),
        log_path: Path | None = None,
        job_db: bool = True,
        new_session: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.image_dir = workdir / "images"
        self.job_db = workdir / "jobs.sqlite3" if job_db else workdir / "var" / "jobs.sqlite3"
        argv = [
            sys.executable, *launcher, "--host", "127.0.0.1", "--port", str(self.port), "--image-dir", str(self.image_dir),
            *(["--job-db", str(self.job_db)] if job_db else []), *args,
        ]  # fmt: skip
        super().__init__(argv, workdir, log_path or workdir / "server.log", checkout_env(repo, env), new_session=new_session, name=f"server on port {self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = STARTUP_TIMEOUT_S, healthy: bool = True) -> ApiServer:
        """Launch and wait until /health says healthy (``healthy=False``: until it answers at all)."""
        self.launch()
        try:
            self.wait_for(lambda health: True, timeout, "a 200 from /health" if healthy else "an answer from /health", any_status=not healthy)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"server not started: {exc}") from None
        return self

    def health(self, timeout: float = 10.0) -> dict[str, Any]:
        """The /health body whatever its status (a 503 still lists the workers)."""
        import requests

        return requests.get(self.url + "/health", timeout=timeout).json()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, what: str = "condition", *, any_status: bool = True,
        heartbeat: Callable[[float, dict[str, Any] | None], None] | None = None, heartbeat_s: float = float("inf"),
    ) -> dict[str, Any]:
        """Poll /health until ``predicate(health)`` holds (and, without ``any_status``, the status is
        200); that health body. RuntimeError if the server exits first, AssertionError on timeout.
        ``heartbeat(seconds, health)`` is called every ``heartbeat_s`` while it waits (a long start)."""
        import requests

        started = time.monotonic()
        next_beat = started + heartbeat_s
        health: dict[str, Any] | None = None
        while time.monotonic() - started < timeout:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; {self.log_path}:\n{self.log_tail()}")
            try:
                reply = requests.get(self.url + "/health", timeout=2)
                health = reply.json() if reply.headers.get("Content-Type", "").startswith("application/json") else {}
                if (any_status or reply.status_code == 200) and predicate(health):
                    return health
            except (requests.RequestException, ValueError):
                pass
            if heartbeat is not None and time.monotonic() >= next_beat:
                heartbeat(time.monotonic() - started, health)
                next_beat += heartbeat_s
            time.sleep(0.1 if health is not None else 0.2)
        raise NotReached(f"{what} not reached in {timeout:.0f} s at {self.url}; last health: {health}\n{self.log_tail()}")

    def ready_workers(self, health: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The /health rows of workers that take work (ready or busy)."""
        return ready_rows(self.health() if health is None else health)

    def wait_workers(self, count: int, timeout: float = STARTUP_TIMEOUT_S) -> list[int]:
        """Until ``count`` workers are ready and the server is healthy; their pids."""
        health = self.wait_for(lambda h: len(ready_rows(h)) == count and h.get("status") == "healthy", timeout, f"{count} worker(s) ready")
        return [int(row["pid"]) for row in ready_rows(health)]

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a power cut or an OOM killer would."""
        assert self.process is not None
        try:
            workers = [w["pid"] for w in self.health()["workers"] if w["pid"]]
        except Exception:  # noqa: BLE001 - no answer: kill what is known
            workers = []
        super().kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove_images(self) -> None:
        """The images (MiBs each) and the job database: a long run would otherwise leave GiBs behind."""
        shutil.rmtree(self.image_dir, ignore_errors=True)
        for path in (self.job_db, Path(f"{self.job_db}-wal"), Path(f"{self.job_db}-shm")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.workdir / "var", ignore_errors=True)


def ready_rows(health: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [w for w in (health or {}).get("workers", []) if w.get("state") in HEALTH_READY_STATES]


class WorkerBox(Launched):
    """``python -m gpu_workers ...`` in a directory of its own, as on another box, in a session of its
    own: a Ctrl-C in the terminal reaches only the benchmark, which stops the box with SIGTERM (the
    worker finishes its shard) and then SIGKILLs what is left of its session."""

    def __init__(
        self, workdir: Path, args: Sequence[str], *, name: str = "worker box", repo: Path = REPO, log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: the whole environment (a test drops its ``SDXL_*``); by default this one with
        ``repo`` first on PYTHONPATH."""
        super().__init__(
            [sys.executable, "-m", "gpu_workers", *args], workdir, log_path or workdir / "worker.log", env or checkout_env(repo), new_session=True,
            name=name,
        )
        self.workdir = workdir


def bench_server(
    workers: int, max_batch: int, model_cache: str | Path, *extra: str, model: str = "tiny", repo: Path = REPO, prefix: str = "sdxl-bench-",
    job_db: bool = True,
) -> ApiServer:
    """A benchmark's own server (not started): ``--model tiny --workers N --max-batch M`` in a new
    temporary directory that holds its log, images and job database."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    args = ["--model", model, "--workers", str(workers), "--max-batch", str(max_batch), "--model-cache", str(model_cache), *extra]
    server = ApiServer(workdir, args, repo=repo, job_db=job_db)
    server.stop_timeout = BENCH_STOP_TIMEOUT_S
    return server
