"""Shared fixtures: the tiny model built once per session, and real servers on loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.debian_packages import PROBLEMS, install_missing
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess


def pytest_sessionstart(session: pytest.Session) -> None:
    """Debian packages first, before any module is collected (see ``tests/debian_packages.py``)."""
    install_missing()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model cache for every server of the session (built by the first worker)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator:
    """Start ``python -m service`` with extra flags; every server is stopped at session end."""
    started: list[ServerProcess] = []

    def start(*args: str, port: int | None = None, env: dict[str, str] | None = None, healthy: bool = True) -> ServerProcess:
        workdir = tmp_path_factory.mktemp("server")
        server = ServerProcess(workdir, ["--model-cache", str(model_cache), *args], env or {}, port=port)
        started.append(server)
        return server.start(healthy=healthy)

    yield start
    for server in started:  # TERM them all first: their drains then run side by side
        server.terminate()
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (Debian's package, installed when missing)."""
    if shutil.which("redis-server") is None:
        pytest.skip(PROBLEMS.get("redis-server", "redis-server is not installed"))
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The main tiny-model server: one CPU worker, shards of 2, on a free port."""
    return start_server("--model", "tiny", "--workers", "1", "--max-batch", "2")


@pytest.fixture(scope="session")
def two_workers(start_server) -> ServerProcess:
    """Two CPU workers, shards of 2: the same shard layout as ``server``, so the same bytes."""
    return start_server("--model", "tiny", "--workers", "2", "--max-batch", "2")
