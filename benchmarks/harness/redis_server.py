"""A real ``redis-server`` (Debian's package), started as a subprocess on a free loopback port: the
broker of the scale-out benchmark and of the remote-worker tests (``tests/redis_server.py`` re-exports it).

Each instance owns a temporary directory (its ``--dir`` and log file) and never persists anything
(``--save ''``, ``--appendonly no``), so a restart comes back empty, as a Redis that lost its data
would. ``stop()`` is a clean SIGTERM, ``kill()`` is a SIGKILL for fault tests, and ``start()`` again
listens on the same port, so clients that hold ``url`` can reconnect ("Redis restarted mid-request").

Never the system service (``redis-server.service`` on 6379): the port here is a free one that the
kernel picks, and the process is ours.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from benchmarks.harness.launch import free_port, kill_process, stop_process

INSTALL_HINT = "apt-get install -y redis-server"


def find_redis_server() -> str:
    """The ``redis-server`` binary, or a RuntimeError that says how to install it."""
    found = shutil.which("redis-server")
    if found is None:
        for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
            if Path(candidate).is_file():
                found = candidate
                break
    if found is None:
        raise RuntimeError(f"redis-server is not on PATH; install Debian's package: {INSTALL_HINT}")
    return found


def redis_server_version() -> tuple[int, int, int]:
    """The installed server's version, e.g. (7, 0, 15) for Debian 12's package."""
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse redis-server --version: {out!r}")
    return int(match[1]), int(match[2]), int(match[3])


def _resp_command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    """``with RedisServer() as redis: ...`` or ``RedisServer().start()`` ... ``close()``."""

    host = "127.0.0.1"

    def __init__(
        self,
        password: str | None = None,
        port: int | None = None,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = find_redis_server()
        self.password = password
        self.port = port or free_port()
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="redis-test-")
            workdir = Path(self._tempdir.name)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, with ``:PASSWORD@`` (percent-encoded) when the server has one."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra_args

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        """Start (or start again, on the same port) and wait until the server answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        self.process = subprocess.Popen(
            self.args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._finalizer = weakref.finalize(self, kill_process, self.process, 5.0)  # a run that crashed before close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode} on port {self.port}:\n{self.log_tail()}"
                )
            if self.ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING in {timeout} s on port {self.port}:\n{self.log_tail()}")

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING (after AUTH, when it has a password)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                request = b""
                if self.password:
                    request += _resp_command("AUTH", self.password)
                request += _resp_command("PING")
                sock.sendall(request)
                expected = 2 if self.password else 1  # one reply line per command
                reply = b""
                while reply.count(b"\r\n") < expected:
                    chunk = sock.recv(1024)
                    if not chunk:
                        return False
                    reply += chunk
                return reply.split(b"\r\n")[expected - 1] == b"+PONG"
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a clean shutdown; nothing is saved), then SIGKILL if it is still there."""
        if self.process is None:
            return
        stop_process(self.process, timeout, name=f"redis-server on port {self.port}")
        self._forget_process()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer would: open connections see resets, then refusals."""
        if self.process is None:
            return
        kill_process(self.process, 5.0)
        self._forget_process()

    def _forget_process(self) -> None:
        self.process = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def restart(self, timeout: float = 10.0) -> Self:
        """Stop and start again on the same port (an empty dataset: nothing is persisted)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and remove the temporary directory (when this instance made it)."""
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no redis log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
