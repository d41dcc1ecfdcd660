"""The one seam between the service and whatever runs the shards.

Everything in ``service/`` talks to the workers through this interface and nothing else, so the
local process pool (``gpu_workers.pool.WorkerPool``, the default) and a broker for workers on
other boxes (Redis Streams, to come) are interchangeable: routes, jobs, heartbeats and admission
never know which one runs. ``tests/test_units.py`` checks that ``WorkerPool`` satisfies it.

A request's events arrive on its handle's ``events`` queue: ``ShardDone`` per finished shard (each
shard at most once, whatever the transport delivered), or one ``RequestFailed``; after
``abandon``, the shards already running still report, then ``Drained`` ends the stream.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from gpu_workers.ledger import Drained, RequestFailed
from gpu_workers.messages import ShardDone, ShardTask
from gpu_workers.pool import PoolConfig, WorkerStatus
from gpu_workers.sharding import GenerationRequest


class RequestEvents(Protocol):
    request_id: str
    shards: list[ShardTask]
    events: asyncio.Queue[ShardDone | RequestFailed | Drained]

    @property
    def complete(self) -> bool: ...


@runtime_checkable
class ShardBackend(Protocol):
    config: PoolConfig
    # Why no worker can take shards now, beyond the workers' own errors (Redis unreachable); None when fine.
    problem: str | None

    async def start(self) -> None:
        """Begin taking shards; returns at once (workers report ready as they come up)."""

    async def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still waiting and release every worker."""

    def submit(self, request: GenerationRequest, shards: list[ShardTask] | None = None) -> RequestEvents:
        """Queue a request's shards (all of them, or the given unfinished ones of a resumed job)."""

    def abandon(self, request_id: str) -> None:
        """Queued shards never run; running ones finish and report, then ``Drained``."""

    def fail_all(self, detail: str, status: int = 500) -> None:
        """End every request with ``RequestFailed(detail, status)``."""

    def snapshot(self) -> list[WorkerStatus]:
        """One row per worker, for /health."""

    @property
    def ready_workers(self) -> int: ...

    @property
    def queued_images(self) -> int: ...

    @property
    def pending_images(self) -> int:
        """Images accepted and not finished yet: what admission control bounds."""

    def estimated_wait(self, images: int) -> float:
        """Seconds until ``images`` more would be done at the throughput seen so far."""
