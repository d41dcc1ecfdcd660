"""The one scheduler: which shards wait, which run, and what happens when a worker is lost.

It implements the seam the service talks to (``gpu_workers.backend.ShardBackend``) over any
``Transport``: local worker processes (``gpu_workers.pool.LocalProcesses``) or Redis Streams for
workers on other boxes (``gpu_workers.redis_broker.RedisTransport``). The policy lives here once:

- the fair queue (round-robin between requests, ``shard_queue``) and the request ledger;
- dispatch: a shard leaves the queue only when the transport has room (``SHARDS_PER_WORKER`` per
  live worker), so fairness and cancelling stay here and a small request is never stuck behind a
  big batch already handed out;
- the retry rule (``shard_rules``): a shard whose worker died, or ran past the shard timeout, goes
  back to the front of the queue; one that lost ``MAX_SHARD_LOSSES`` workers fails its own request
  only; shards merely waiting in a lost worker's hands go back unmarked;
- failures as *reasons* (``contract.failures``), never HTTP statuses.

A transport moves shards to workers and tells the scheduler what came back (``TransportEvents``).
All of it runs on the event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from contract.failures import FailureReason
from contract.formats import DEFAULT_ALLOWED_SIZES
from contract.states import WorkerState
from gpu_workers.ledger import RequestHandle, RequestLedger
from gpu_workers.messages import ShardDone, ShardFailed, ShardTask
from gpu_workers.shard_rules import given_up, given_up_detail
from gpu_workers.speed import SpeedSettings

log = logging.getLogger(__name__)

SHUTDOWN_DETAIL = "The server is shutting down; the request did not finish."


@dataclass(frozen=True)
class EngineConfig:
    devices: tuple[str, ...]
    model: str
    model_cache: str
    cpu_threads: int = 1
    max_batch: int = 4
    # Seconds one shard may run on a device; past it the worker is replaced (0: no limit).
    shard_timeout: float = 0.0
    # The first wait before a dead local worker is started again (doubles while it keeps dying).
    restart_delay: float = 1.0
    # The workers' speed settings, and the sizes a request may ask for (what a full warm-up covers).
    speed: SpeedSettings = SpeedSettings()
    sizes: tuple[str, ...] = DEFAULT_ALLOWED_SIZES

    def worker_fields(self) -> dict[str, Any]:
        """What every ``WorkerConfig`` of this engine carries besides its own id and device."""
        return {**self.speed.as_fields(), "warmup_sizes": self.sizes, "max_batch": self.max_batch}


@dataclass(frozen=True)
class WorkerStatus:
    """One row of ``/health``."""

    worker_id: int
    pid: int | None
    device: str
    device_name: str | None
    model: str
    state: WorkerState
    images_done: int
    shards_in_flight: int
    restarts: int
    error: str | None


class TransportEvents(Protocol):
    """What a transport tells the scheduler (on the event loop)."""

    def shard_done(self, message: ShardDone) -> None: ...

    def shard_failed(self, message: ShardFailed) -> None: ...

    def shards_lost(self, shards: list[ShardTask], culprit: ShardTask | None, reason: FailureReason, cause: str) -> None: ...

    def transport_lost(self, cause: str) -> None: ...

    def no_worker_can_load(self, error: str) -> None: ...

    def room_changed(self) -> None: ...


class EngineObserver(Protocol):
    """Who wants to know each shard's end besides the requests (the metrics)."""

    def shard_done(self, message: ShardDone) -> None: ...

    def shard_failed(self, message: ShardFailed, images: int) -> None: ...

    def shards_lost(self, shards: list[ShardTask], culprit: ShardTask | None, reason: FailureReason, cause: str) -> None: ...


class Transport(Protocol):
    """Moves shards to workers and results back; knows nothing of requests or retries."""

    # Why no worker can take shards now, beyond the workers' own errors (Redis unreachable).
    problem: str | None

    async def start(self, events: TransportEvents) -> None: ...

    async def stop(self, timeout: float) -> None: ...

    def has_room(self) -> bool:
        """True while a live worker can take one more shard."""

    def send(self, shard: ShardTask) -> None:
        """Hand one shard on; its result comes back through ``TransportEvents``."""

    def workers(self) -> list[WorkerStatus]: ...


class Scheduler:
    """``ShardBackend`` over one transport."""

    def __init__(self, config: EngineConfig, transport: Transport) -> None:
        self.config = config
        self.transport = transport
        self._ledger = RequestLedger()
        self._queue = self._ledger.queue
        self._in_flight: dict[tuple[str, int], ShardTask] = {}
        self._losses: dict[tuple[str, int], int] = {}
        self.observers: list[EngineObserver] = []

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start(self)

    async def stop(self, timeout: float = 10.0) -> None:
        self.fail_all(SHUTDOWN_DETAIL, FailureReason.SHUTTING_DOWN)
        await self.transport.stop(timeout)

    # ----- what the service uses -------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        return self.transport.problem

    @property
    def ready_workers(self) -> int:
        return sum(worker.state.takes_shards for worker in self.transport.workers())

    @property
    def queued_images(self) -> int:
        """Images waiting for a worker."""
        return self._queue.images

    @property
    def queued_shards(self) -> int:
        return len(self._queue)

    @property
    def pending_images(self) -> int:
        """Images accepted and not finished yet: what admission control bounds."""
        return self._queue.images + sum(shard.size for shard in self._in_flight.values())

    def pending_images_of(self, owner: str) -> int:
        """One owner's (API key's) images accepted and not finished: what the per-key bound counts."""
        in_flight = sum(shard.size for shard in self._in_flight.values() if self._queue.owner_of(shard.request_id) == owner)
        return self._queue.images_of(owner) + in_flight

    def estimated_wait(self, images: int) -> float:
        return self._ledger.estimated_wait(images, self.ready_workers)

    def submit(self, request_id: str, shards: list[ShardTask], owner: str = "") -> RequestHandle:
        """Queue a request's shards; ``owner`` (an API key's name) is whose turn they take."""
        handle = self._ledger.add(request_id, shards, owner)
        self._dispatch()
        return handle

    def abandon(self, request_id: str) -> None:
        self._ledger.abandon(request_id)

    def fail_all(self, detail: str, reason: FailureReason) -> None:
        self._ledger.fail_all(detail, reason)

    def snapshot(self) -> list[WorkerStatus]:
        return self.transport.workers()

    # ----- what transports tell us -----------------------------------------------------------

    def shard_done(self, message: ShardDone) -> None:
        for observer in self.observers:
            observer.shard_done(message)
        key = (message.request_id, message.shard_id)
        self._in_flight.pop(key, None)
        self._losses.pop(key, None)
        if not self._ledger.shard_done(message):
            log.info("shard %s/%d reported again; the first result was used", *key)
        self._dispatch()

    def shard_failed(self, message: ShardFailed) -> None:
        key = (message.request_id, message.shard_id)
        shard = self._in_flight.pop(key, None)
        for observer in self.observers:
            observer.shard_failed(message, shard.size if shard is not None else 0)
        self._losses.pop(key, None)
        self._ledger.shard_failed(message.request_id, message.shard_id, message.error, _reason(message.reason))
        self._dispatch()

    def shards_lost(self, shards: list[ShardTask], culprit: ShardTask | None, reason: FailureReason, cause: str) -> None:
        """A worker went away holding ``shards``; ``culprit`` was the one on its device."""
        for observer in self.observers:
            observer.shards_lost(shards, culprit, reason, cause)
        for shard in reversed(shards):  # put_front: the first lost goes first again
            key = (shard.request_id, shard.shard_id)
            self._in_flight.pop(key, None)
            handle = self._ledger.shard_lost(shard)
            if handle is None:
                self._losses.pop(key, None)
                continue
            if shard is culprit:
                self._losses[key] = self._losses.get(key, 0) + 1
                if given_up(self._losses[key]):
                    self._losses.pop(key, None)
                    self._ledger.fail(handle, given_up_detail(shard, reason, cause), reason)
                    continue
            self._queue.put_front(shard)
        self._dispatch()

    def transport_lost(self, cause: str) -> None:
        """Requests with shards in flight end (retrying later can help); wholly queued ones wait."""
        log.error("%s; failing the requests with shards in flight", cause)
        detail = f"{cause}; the request did not finish. Retry when /health is healthy again."
        for handle in list(self._ledger.requests.values()):
            if handle.abandoned:
                handle.in_flight.clear()  # nothing more will come for it
                self._ledger.end_if_drained(handle)
            elif handle.in_flight:
                self._ledger.fail(handle, detail, FailureReason.TRANSPORT_LOST)
        self._in_flight.clear()

    def no_worker_can_load(self, error: str) -> None:
        self.fail_all(f"No worker could load the model: {error}", FailureReason.NO_MODEL)

    def room_changed(self) -> None:
        self._dispatch()

    # ----- internals -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while len(self._queue) and self.transport.has_room():
            shard = self._queue.pop()
            assert shard is not None
            self._in_flight[(shard.request_id, shard.shard_id)] = shard
            self._ledger.dispatched(shard)
            self.transport.send(shard)


def _reason(value: str) -> FailureReason:
    try:
        return FailureReason(value)
    except ValueError:
        return FailureReason.GENERATION
