"""A real server, started as ``python -m service`` in a subprocess on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ServerProcess:
    def __init__(
        self, workdir: Path, args: list[str], env: dict[str, str], port: int | None = None, launcher: tuple[str, ...] = ("-m", "service")
    ) -> None:
        """``launcher``: what follows the interpreter before the server's flags (a test may run the
        server through a wrapper that watches it, e.g. tests/import_probe.py)."""
        self.port = port or free_port()
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.args = [
            sys.executable, *launcher, "--host", "127.0.0.1", "--port", str(self.port),
            "--image-dir", str(workdir / "images"), "--job-db", str(workdir / "jobs.sqlite3"), *args,
        ]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0, healthy: bool = True) -> ServerProcess:
        """Start and wait until /health says healthy (or, with ``healthy=False``, just answers)."""
        self._log = open(self.log_path, "ab")  # a restart appends to the same log
        self.process = subprocess.Popen(self.args, cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status = requests.get(self.url + "/health", timeout=2).status_code
                if status == 200 or not healthy:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a power cut or an OOM killer would."""
        assert self.process is not None
        workers = [w["pid"] for w in self.health()["workers"] if w["pid"]]
        self.process.kill()
        self.process.wait(10)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=10).json()

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> dict:
        """Poll /health until ``predicate(health)`` holds; return that health body."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if predicate(health):
                return health
            time.sleep(0.1)
        raise AssertionError(f"{what} not reached in {timeout} s; last health: {health}\n{self.log_tail()}")

    def log(self) -> str:
        """The whole server log (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log()[-5000:]

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop`` waits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = self.process

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            if getattr(self, "_terminated", None) is not self.process:  # a second TERM would mean "stop now"
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode
