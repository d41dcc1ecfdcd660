"""The repository's supervisord.conf, as is: real supervisord runs the tiny-model server, brings it
back after a SIGKILL, and stops it with a drain that lets an in-flight request finish.

It runs ``supervisord -c supervisord.conf`` from the repository root, exactly as the README says, so
its log, pid file and control socket are the checkout's own ``var/`` files; the test reads only what
it appended to the logs. Settings go in through ``SDXL_*`` variables, the way a deployment sets them.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

from gpu_workers.scheduler import Scheduler
from service.__main__ import FINAL_SHUTDOWN_SECONDS
from service.settings import Settings
from tests.server_process import REPO, free_port
from tests.test_faults import in_background
from tests.timing import patience

CONFIG = REPO / "supervisord.conf"
VAR = REPO / "var"
SOCKET = VAR / "supervisor.sock"
PROGRAM = "sdxl-api"
SUPERVISORD_LOG = VAR / "log" / "supervisord.log"
PROGRAM_LOG = VAR / "log" / f"{PROGRAM}.log"
BIN = Path(sys.executable).parent


def _load_config() -> ServerOptions:
    options = ServerOptions()
    options.realize(["-c", str(CONFIG)])
    return options


def test_config_restarts_and_outwaits_the_drain_without_root_paths() -> None:
    """The settings that make stop and restart safe, read the way supervisord reads them."""
    options = _load_config()
    program = options.process_group_configs[0].process_configs[0]
    worker_stop = inspect.signature(Scheduler.stop).parameters["timeout"].default
    drain = Settings().grace_period + FINAL_SHUTDOWN_SECONDS + worker_stop
    assert program.name == PROGRAM
    assert program.stopsignal == signal.SIGTERM
    assert program.stopwaitsecs > drain + 30, f"stopwaitsecs {program.stopwaitsecs} s barely covers a {drain} s stop"
    assert program.autorestart is RestartUnconditionally, "autorestart=true: any exit brings it back"
    assert not program.stopasgroup, "the TERM must reach the API process only: its workers finish the drain"
    assert program.killasgroup, "a SIGKILL after stopwaitsecs must take the workers too"
    assert program.command == f"{REPO}/.venv/bin/python -m service"
    paths = [options.logfile, options.pidfile, options.childlogdir, program.stdout_logfile, program.directory]
    paths.append(options.server_configs[0]["file"])
    for path in paths:
        assert Path(path).is_relative_to(REPO), f"{path} is outside the checkout"


@dataclass
class Supervisor:
    """supervisord in the foreground, plus the handles the test needs."""

    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_offsets: dict[Path, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ctl(self, *args: str) -> str:
        """supervisorctl over the config's control socket (its exit code is not an error signal)."""
        result = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(CONFIG), *args], capture_output=True, text=True, timeout=30, env=self.env
        )
        return result.stdout.strip()

    def server_pid(self) -> int:
        pid = self.ctl("pid", PROGRAM)
        return int(pid) if pid.isdigit() else 0

    def new_log(self, path: Path) -> str:
        """What the run appended to ``path``."""
        with open(path, "rb") as log:
            log.seek(self.log_offsets.get(path, 0))
            return log.read().decode(errors="replace")

    def wait_healthy(self, timeout: float = 120.0, not_pid: int = 0) -> tuple[int, dict]:
        """Until supervisorctl names a running server (other than ``not_pid``) that says healthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"supervisord exited with {self.process.returncode}:\n{self.logs()}")
            pid = self.server_pid()
            if pid and pid != not_pid:
                try:
                    response = requests.get(self.url + "/health", timeout=2)
                    if response.status_code == 200:
                        return pid, response.json()
                except requests.ConnectionError:
                    pass
            time.sleep(0.3)
        raise AssertionError(f"no healthy server after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{self.new_log(path)[-3000:]}" for path in (SUPERVISORD_LOG, PROGRAM_LOG) if path.exists())


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    """A zombie counts as gone: it holds no memory, only a slot until its new parent reaps it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def supervised(model_cache: Path, tmp_path: Path) -> Iterator[Supervisor]:
    if _socket_answers(SOCKET):
        pytest.skip(f"a supervisord of this checkout is running ({SOCKET} answers); stop it to run this test")
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("supervisord.conf runs <repo>/.venv/bin/python: create the venv as the README's install step does")
    port = free_port()
    env = {
        **os.environ,
        "SDXL_HOST": "127.0.0.1",
        "SDXL_PORT": str(port),
        "SDXL_MODEL": "tiny",
        "SDXL_WORKERS": "1",
        "SDXL_MAX_BATCH": "2",
        "SDXL_MODEL_CACHE": str(model_cache),
        "SDXL_IMAGE_DIR": str(tmp_path / "images"),
    }
    offsets = {path: path.stat().st_size if path.exists() else 0 for path in (SUPERVISORD_LOG, PROGRAM_LOG)}
    with open(tmp_path / "supervisord.out", "wb") as output:
        command = [str(BIN / "supervisord"), "-c", "supervisord.conf"]  # as the README says, from the root
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield Supervisor(process, port, env, offsets)
        finally:
            if process.poll() is None:  # the test failed before its clean stop: stop it, hard if need be
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def _generate(url: str, prompts: list[str], seed: int) -> dict:
    response = requests.post(url + "/generate", json={"prompts": prompts, "seed": seed}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_supervisord_brings_a_killed_server_back_and_stops_it_cleanly(supervised: Supervisor) -> None:
    first_pid, health = supervised.wait_healthy()
    worker_pids = [w["pid"] for w in health["workers"]]
    before = _generate(supervised.url, ["a lighthouse in a storm"], seed=7)
    assert before["success"] and before["count"] == 1

    os.kill(first_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    second_pid, _ = supervised.wait_healthy(timeout=patience(supervised.new_log(PROGRAM_LOG)), not_pid=first_pid)  # a start again
    print(f"healthy again {time.monotonic() - killed_at:.1f} s after the SIGKILL")
    after = _generate(supervised.url, ["a lighthouse in a storm"], seed=7)
    assert after["images"] == before["images"], "the restarted server must give the same bytes for the same seed"
    assert "exited: sdxl-api (terminated by SIGKILL; not expected)" in supervised.new_log(SUPERVISORD_LOG)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in worker_pids), "the killed server's workers must not outlive it"

    call = in_background(lambda: requests.post(supervised.url + "/generate", json={"prompts": ["w", "x", "y", "z"]}, timeout=120))
    deadline = time.monotonic() + 30
    while requests.get(supervised.url + "/health", timeout=5).json()["active_requests"] == 0:
        assert time.monotonic() < deadline, "the request was never admitted"
        time.sleep(0.05)
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(60) == 0
    call["thread"].join(30)
    drained = call["result"].json()
    assert drained["success"] is True and drained["count"] == 4, "the request in flight at stop must finish"
    assert f"stopped: {PROGRAM} (exit status 0)" in supervised.new_log(SUPERVISORD_LOG)
    assert "stopped" in supervised.new_log(PROGRAM_LOG).splitlines()[-1]
    assert not _alive(second_pid)
    assert not SOCKET.exists() or not _socket_answers(SOCKET)
