"""A real ``redis-server`` on a free loopback port for the tests: the benchmarks' launcher
(``benchmarks/harness/redis_server.py``), re-exported under the names the tests import."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python tests/redis_server.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.launch import free_port
from benchmarks.harness.redis_server import (
    INSTALL_HINT,
    RedisServer,
    find_redis_server,
    redis_server_version,
)

__all__ = ["INSTALL_HINT", "RedisServer", "find_redis_server", "free_port", "redis_server_version"]


if __name__ == "__main__":
    # Self-check: python tests/redis_server.py
    print("redis-server version", ".".join(map(str, redis_server_version())))
    for password in (None, "s3cret", "p@ss:w/rd"):
        with RedisServer(password=password) as server:
            assert server.ping(), "no PONG"
            port, pid = server.port, server.process.pid if server.process else None
            print(f"started pid {pid} at {server.url}")
            server.kill()
            assert not server.ping(), "still answering after kill()"
            server.start()
            assert server.port == port and server.ping(), "no PONG after start() on the same port"
            server.restart()
            assert server.ping(), "no PONG after restart()"
            if password:
                wrong = RedisServer(password="wrong", port=server.port)
                assert not wrong.ping(), "PONG with a wrong password"
                wrong.close()
            server.stop()
            assert not server.ping(), "still answering after stop()"
            print(f"ok: kill/start/restart/stop on port {port}")
    print("redis_server self-check passed")
