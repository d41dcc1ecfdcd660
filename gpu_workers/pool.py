"""The local worker pool: spawned processes, one per device, fed shards by the event loop.

Threading model: everything here runs on the event loop except ``_Receiver``, one thread that
blocks in ``multiprocessing.connection.wait`` on every worker's result pipe and process sentinel,
unpickles what arrives (off the loop) and hands it over with ``call_soon_threadsafe``. Each worker
has its own task queue and its own result pipe, so a worker killed in the middle of a write can
never leave a lock held that the other workers need.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_workers.ledger import RequestHandle, RequestLedger
from gpu_workers.messages import (
    ShardDone,
    ShardFailed,
    ShardStarted,
    ShardTask,
    StopWorker,
    WorkerConfig,
    WorkerMessage,
    WorkerReady,
    WorkerStartFailed,
)
from gpu_workers.sharding import GenerationRequest, split_into_shards
from gpu_workers.worker import worker_main

log = logging.getLogger(__name__)

# Shards handed to one worker at a time: one running and one waiting in its queue, so the
# worker never idles between shards while the event loop catches up.
SHARDS_PER_WORKER = 2
# A shard that has been in flight on this many workers when they died fails its request.
MAX_SHARD_KILLS = 2
MAX_RESTART_DELAY = 30.0


@dataclass(frozen=True)
class PoolConfig:
    devices: tuple[str, ...]
    model: str
    model_cache: str
    cpu_threads: int = 1
    max_batch: int = 4
    restart_delay: float = 1.0
    # A worker that has been up this long before it died restarts without backoff.
    stable_seconds: float = 60.0


@dataclass(frozen=True)
class WorkerStatus:
    """One row of ``/health``."""

    worker_id: int
    pid: int | None
    device: str
    model: str
    state: str
    images_done: int
    shards_in_flight: int
    restarts: int
    error: str | None


@dataclass
class _Slot:
    """The pool's view of one worker position (a device); survives the worker's restarts."""

    worker_id: int
    device: str
    process: Any = None
    tasks: Any = None
    results: Any = None
    state: str = "starting"
    pid: int | None = None
    images_done: int = 0
    restarts: int = 0
    crash_streak: int = 0
    started_at: float = 0.0
    error: str | None = None
    in_flight: dict[tuple[str, int], ShardTask] = field(default_factory=dict)
    running: tuple[str, int] | None = None

    @property
    def takes_shards(self) -> bool:
        return self.state in ("ready", "busy")


class WorkerPool:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(worker_id=i, device=device) for i, device in enumerate(config.devices)]
        self.problem: str | None = None  # local processes have no transport to lose
        self._ledger = RequestLedger()
        self._queue = self._ledger.queue
        self._kills: dict[tuple[str, int], int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: _Receiver | None = None
        self._ready = asyncio.Event()
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn every worker; returns at once, workers report ready as they finish loading."""
        self._loop = asyncio.get_running_loop()
        self._receiver = _Receiver(self._loop, self._on_message, self._on_exit)
        self._receiver.start()
        for slot in self._slots:
            self._spawn(slot)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Sentinels to workers, join with a timeout, then kill what is left (workers ignore
        SIGTERM on purpose, so a group-wide TERM cannot cut the drain short)."""
        self._stopping = True
        self.fail_all("The server is shutting down; the request did not finish.")
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                slot.tasks.put(StopWorker())
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.process is None:
                continue
            await asyncio.to_thread(slot.process.join, max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                await asyncio.to_thread(slot.process.join, 2.0)
        if self._receiver is not None:
            self._receiver.stop()
            await asyncio.to_thread(self._receiver.join, 2.0)

    # ----- what the service uses -------------------------------------------------------------

    @property
    def ready_workers(self) -> int:
        return sum(slot.takes_shards for slot in self._slots)

    @property
    def queued_images(self) -> int:
        """Images waiting for a worker."""
        return self._queue.images

    @property
    def pending_images(self) -> int:
        """Images accepted and not finished yet: what admission control bounds."""
        in_flight = sum(shard.size for slot in self._slots for shard in slot.in_flight.values())
        return self._queue.images + in_flight

    def estimated_wait(self, images: int) -> float:
        """Seconds until ``images`` more would be done at the throughput seen so far."""
        return self._ledger.estimated_wait(images, self.ready_workers)

    def fail_all(self, detail: str, status: int = 500) -> None:
        self._ledger.fail_all(detail, status)

    def submit(self, request: GenerationRequest, shards: list[ShardTask] | None = None) -> RequestHandle:
        """Queue a request's shards: all of them, or only ``shards`` (a resumed job's unfinished
        ones, cut with the shard size the job was accepted with)."""
        if shards is None:
            shards = split_into_shards(request, self.config.max_batch)
        handle = self._ledger.add(request, shards)
        self._dispatch()
        return handle

    def abandon(self, request_id: str) -> None:
        """Nobody waits for this request any more: its queued shards never run; the ones already
        running finish and still report (their images are kept), then ``Drained`` ends it."""
        self._ledger.abandon(request_id)

    def snapshot(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(
                worker_id=slot.worker_id,
                pid=slot.pid,
                device=slot.device,
                model=self.config.model,
                state=slot.state,
                images_done=slot.images_done,
                shards_in_flight=len(slot.in_flight),
                restarts=slot.restarts,
                error=slot.error,
            )
            for slot in self._slots
        ]

    # ----- internals -------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        config = WorkerConfig(
            worker_id=slot.worker_id,
            device=slot.device,
            model=self.config.model,
            model_cache=self.config.model_cache,
            cpu_threads=self.config.cpu_threads,
        )
        receive_end, send_end = self._ctx.Pipe(duplex=False)
        slot.tasks = self._ctx.Queue()
        slot.results = receive_end
        slot.process = self._ctx.Process(
            target=worker_main, args=(config, slot.tasks, send_end), name=f"sdxl-worker-{slot.worker_id}", daemon=True
        )
        slot.process.start()
        send_end.close()  # the child holds the only writer: EOF on our end means it is gone
        slot.pid = slot.process.pid
        slot.state = "starting"
        slot.started_at = time.monotonic()
        assert self._receiver is not None
        self._receiver.watch(slot.worker_id, slot.results, slot.process)
        log.info("worker %d starting on %s (pid %d)", slot.worker_id, slot.device, slot.pid)

    def _dispatch(self) -> None:
        """Hand queued shards to the least loaded workers that have room."""
        while len(self._queue):
            candidates = [s for s in self._slots if s.takes_shards and len(s.in_flight) < SHARDS_PER_WORKER]
            if not candidates:
                return
            slot = min(candidates, key=lambda s: (sum(t.size for t in s.in_flight.values()), s.worker_id))
            shard = self._queue.pop()
            assert shard is not None
            slot.in_flight[(shard.request_id, shard.shard_id)] = shard
            self._ledger.dispatched(shard)
            slot.state = "busy"
            slot.tasks.put(shard)

    def _on_message(self, message: WorkerMessage) -> None:
        try:
            self._handle(message)
        except Exception:  # noqa: BLE001 - the consumer must never die quietly
            log.exception("error while handling %r", type(message).__name__)

    def _handle(self, message: WorkerMessage) -> None:
        slot = self._slots[message.worker_id]
        if isinstance(message, WorkerReady):
            slot.state, slot.pid, slot.error = "ready", message.pid, None
            log.info("worker %d ready on %s after %.1f s", slot.worker_id, slot.device, message.load_seconds)
            self._ready.set()
        elif isinstance(message, WorkerStartFailed):
            slot.state, slot.error = "failed", message.error
            log.error("worker %d could not start: %s", slot.worker_id, message.error)
            if all(s.state == "failed" for s in self._slots):
                self.fail_all(f"No worker could load the model: {message.error}")
        elif isinstance(message, ShardStarted):
            slot.running = (message.request_id, message.shard_id)
        elif isinstance(message, ShardDone):
            key = (message.request_id, message.shard_id)
            if slot.in_flight.pop(key, None) is not None:
                slot.images_done += len(message.images)
                slot.crash_streak = 0
            self._kills.pop(key, None)
            self._ledger.shard_done(message)
        elif isinstance(message, ShardFailed):
            slot.in_flight.pop((message.request_id, message.shard_id), None)
            self._ledger.shard_failed(message.request_id, message.shard_id, message.error)
        if isinstance(message, (ShardDone, ShardFailed)) and slot.running == (message.request_id, message.shard_id):
            slot.running = None
        if slot.state == "busy" and not slot.in_flight:
            slot.state = "ready"
        self._dispatch()

    def _on_exit(self, worker_id: int, exitcode: int | None) -> None:
        """A worker process ended: hand its shards back, fail poison shards, restart it."""
        slot = self._slots[worker_id]
        lost = list(slot.in_flight.values())
        culprit, slot.running = slot.running, None
        slot.in_flight.clear()
        if slot.state != "failed":
            slot.state = "dead"
        if self._stopping:
            return
        log.error("worker %d (pid %s) died with exit code %s; %d shard(s) handed back", worker_id, slot.pid, exitcode, len(lost))
        for shard in reversed(lost):
            key = (shard.request_id, shard.shard_id)
            handle = self._ledger.shard_lost(shard)
            if handle is None:
                continue
            if key != culprit:
                self._queue.put_front(shard)  # it was only waiting in the dead worker's queue
                continue
            self._kills[key] = self._kills.get(key, 0) + 1
            if self._kills[key] >= MAX_SHARD_KILLS:
                self._kills.pop(key, None)
                self._ledger.fail(
                    handle,
                    f"Image generation failed: images {shard.first_index}-{shard.first_index + shard.size - 1} "
                    f"crashed {MAX_SHARD_KILLS} workers (last exit code {exitcode}); the rest of the server is unaffected.",
                )
            else:
                self._queue.put_front(shard)
        if slot.state == "failed":
            self._dispatch()
            return  # a start failure needs a fix, not a restart loop; /health shows the cause
        if time.monotonic() - slot.started_at > self.config.stable_seconds:
            slot.crash_streak = 0
        delay = min(MAX_RESTART_DELAY, self.config.restart_delay * 2**slot.crash_streak)
        slot.crash_streak += 1
        slot.restarts += 1
        log.info("worker %d restarts in %.1f s", worker_id, delay)
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, slot)
        self._dispatch()

    def _restart(self, slot: _Slot) -> None:
        if not self._stopping and slot.state == "dead":
            self._spawn(slot)


class _Receiver(threading.Thread):
    """Blocks on all result pipes and sentinels; forwards messages and exits to the loop in order."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerMessage], None],
        on_exit: Callable[[int, int | None], None],
    ) -> None:
        super().__init__(name="pool-receiver", daemon=True)
        self._loop = loop
        self._on_message = on_message
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[Any, Any]] = {}
        self._stop_event = threading.Event()

    def watch(self, worker_id: int, results: Any, process: Any) -> None:
        with self._lock:
            self._watched[worker_id] = (results, process)

    def stop(self) -> None:
        self._stop_event.set()

    def _forward(self, callback: Callable[..., None], *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def run(self) -> None:
        while not self._stop_event.is_set():
            with self._lock:
                watched = dict(self._watched)
            owners: dict[Any, tuple[int, bool]] = {}
            for worker_id, (results, process) in watched.items():
                owners[results] = (worker_id, False)
                owners[process.sentinel] = (worker_id, True)
            if not owners:
                self._stop_event.wait(0.2)
                continue
            for ready in multiprocessing.connection.wait(list(owners), timeout=0.2):
                worker_id, is_sentinel = owners[ready]
                results, process = watched[worker_id]
                if is_sentinel or not self._drain(results, once=True):
                    self._drain(results, once=False)
                    self._retire(worker_id, results, process)

    def _drain(self, results: Any, once: bool) -> bool:
        """Receive one message (``once``) or all that are left; False once the pipe hit EOF."""
        try:
            while once or results.poll():
                self._forward(self._on_message, results.recv())
                if once:
                    return True
        except (EOFError, OSError):
            return False
        return True

    def _retire(self, worker_id: int, results: Any, process: Any) -> None:
        """Report a worker's end once, after everything it sent has been forwarded."""
        with self._lock:
            current = self._watched.get(worker_id)
            if current is None or current[0] is not results:
                return
            del self._watched[worker_id]
        results.close()
        process.join(1.0)  # its pipe closed at exit: reap it to learn the exit code
        self._forward(self._on_exit, worker_id, process.exitcode)
