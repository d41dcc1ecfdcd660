"""A real server, started as ``python -m service`` in a subprocess on a loopback port: the
benchmarks' launcher (``benchmarks/harness/launch.py``) under the names and defaults the tests use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.launch import REPO, ApiServer, free_port, port_is_free

__all__ = ["REPO", "ServerProcess", "free_port", "port_is_free"]


class ServerProcess(ApiServer):
    """``ServerProcess(workdir, args, env)``: its log is ``workdir/server.log``, its images and job
    database are in ``workdir``; ``start()`` waits for a 200 from /health, ``stop()`` drains (30 s)."""

    def __init__(
        self, workdir: Path, args: list[str], env: dict[str, str], port: int | None = None, launcher: Sequence[str] = ("-m", "service")
    ) -> None:
        """``launcher``: what follows the interpreter before the server's flags (a test may run the
        server through a wrapper that watches it, e.g. tests/import_probe.py)."""
        super().__init__(workdir, args, port=port, env=env, launcher=launcher)

    def log_tail(self, lines: int = 0) -> str:
        """The last 5000 characters of the log (``lines``: the last lines instead)."""
        return super().log_tail(lines) if lines else self.log()[-5000:]
