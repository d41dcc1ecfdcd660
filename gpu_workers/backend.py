"""The one seam between the service and the engine.

Everything in ``service/`` talks to the workers through this interface and nothing else, so the
transport (local worker processes, or Redis Streams for workers on other boxes) is invisible to
routes, jobs, heartbeats and admission. ``gpu_workers.scheduler.Scheduler`` implements it for both
transports (``tests/test_units.py`` checks it); the service's in-process tests use a fake.

A request's events arrive on its handle's ``events`` queue: ``ShardDone`` per finished shard (each
shard at most once, whatever the transport delivered), or one ``RequestFailed`` carrying a
``FailureReason`` (the service, not the engine, picks the HTTP status); after ``abandon``, the
shards already running still report, then ``Drained`` ends the stream.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from contract.failures import FailureReason, RequestFailed
from gpu_workers.ledger import Drained
from gpu_workers.messages import ShardDone, ShardTask
from gpu_workers.scheduler import EngineConfig, WorkerStatus


class RequestEvents(Protocol):
    request_id: str
    shards: list[ShardTask]
    events: asyncio.Queue[ShardDone | RequestFailed | Drained]


@runtime_checkable
class ShardBackend(Protocol):
    config: EngineConfig

    @property
    def problem(self) -> str | None:
        """Why no worker can take shards now, beyond the workers' own errors (Redis unreachable)."""

    async def start(self) -> None:
        """Begin taking shards; returns at once (workers report ready as they come up)."""

    async def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still waiting and release every worker."""

    def submit(self, request_id: str, shards: list[ShardTask], owner: str = "") -> RequestEvents:
        """Queue a request's shards (all of them, or the unfinished ones of a resumed job); owners
        (API keys) take turns before requests do."""

    def abandon(self, request_id: str) -> None:
        """Queued shards never run; running ones finish and report, then ``Drained``."""

    def fail_all(self, detail: str, reason: FailureReason) -> None:
        """End every request with ``RequestFailed(detail, reason)``."""

    def snapshot(self) -> list[WorkerStatus]:
        """One row per worker, for /health."""

    @property
    def ready_workers(self) -> int: ...

    @property
    def queued_images(self) -> int: ...

    @property
    def queued_shards(self) -> int: ...

    @property
    def pending_images(self) -> int:
        """Images accepted and not finished yet: what admission control bounds."""

    def pending_images_of(self, owner: str) -> int:
        """One owner's images accepted and not finished yet: what the per-key bound counts."""

    def estimated_wait(self, images: int) -> float:
        """Seconds until ``images`` more would be done at the throughput seen so far."""
