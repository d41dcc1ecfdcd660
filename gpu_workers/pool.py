"""Local worker processes: the transport of the scheduler when the workers are on this box.

One spawned process per device, each fed shards through its own queue. Everything here runs on the
event loop except ``_Receiver``, one thread that blocks in ``multiprocessing.connection.wait`` on
every worker's result pipe and process sentinel, unpickles what arrives (off the loop) and hands it
over with ``call_soon_threadsafe``. Each worker has its own task queue and its own result pipe, so
a worker killed in the middle of a write can never leave a lock held that the others need.

What is the scheduler's (``gpu_workers.scheduler``) is not here: which shard goes next, retries,
failing a request. This module only starts, watches, restarts and kills processes, and enforces
the shard timeout from outside: a worker whose shard runs past ``--shard-timeout`` gives up on
itself (its own watchdog, ``gpu_workers.worker_loop``); should it be too stuck even for that, it is
killed a few seconds later from here.
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

from contract.failures import FailureReason
from contract.states import WorkerState
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
from gpu_workers.scheduler import EngineConfig, Scheduler, TransportEvents, WorkerStatus
from gpu_workers.shard_rules import SHARDS_PER_WORKER, DeviceTracker, RestartBackoff
from gpu_workers.worker import EXIT_SHARD_TIMEOUT, worker_main

log = logging.getLogger(__name__)

# How long after the shard timeout a worker whose own watchdog did not end it is killed.
KILL_GRACE_SECONDS = 5.0


@dataclass
class _Slot:
    """One worker position (a device); survives the worker's restarts."""

    worker_id: int
    device: str
    backoff: RestartBackoff
    process: Any = None
    tasks: Any = None
    results: Any = None
    state: WorkerState = WorkerState.STARTING
    pid: int | None = None
    device_name: str | None = None
    images_done: int = 0
    restarts: int = 0
    error: str | None = None
    in_flight: dict[tuple[str, int], ShardTask] = field(default_factory=dict)
    running: tuple[str, int] | None = None
    overdue: bool = False
    deadline: asyncio.TimerHandle | None = None


class LocalProcesses:
    """The local transport: one spawned worker process per device."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.problem: str | None = None  # local processes have no transport to lose
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [
            _Slot(worker_id=i, device=device, backoff=RestartBackoff(first=config.restart_delay))
            for i, device in enumerate(config.devices)
        ]
        self._devices = DeviceTracker()
        self._events: TransportEvents | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: _Receiver | None = None
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self, events: TransportEvents) -> None:
        """Spawn every worker; returns at once, workers report ready as they finish loading."""
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._receiver = _Receiver(self._loop, self._on_message, self._on_exit)
        self._receiver.start()
        for slot in self._slots:
            self._spawn(slot)

    async def stop(self, timeout: float) -> None:
        """Sentinels to workers, join with a timeout, then kill what is left (workers ignore
        SIGTERM on purpose, so a group-wide TERM cannot cut the drain short)."""
        self._stopping = True
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

    # ----- the transport ---------------------------------------------------------------------

    def has_room(self) -> bool:
        return any(self._has_room(slot) for slot in self._slots)

    def send(self, shard: ShardTask) -> None:
        """To the least loaded worker that has room."""
        slot = min(
            (s for s in self._slots if self._has_room(s)),
            key=lambda s: (sum(t.size for t in s.in_flight.values()), s.worker_id),
        )
        slot.in_flight[(shard.request_id, shard.shard_id)] = shard
        slot.state = WorkerState.BUSY
        slot.tasks.put(shard)

    def workers(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(
                worker_id=slot.worker_id,
                pid=slot.pid,
                device=slot.device,
                device_name=slot.device_name,
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

    def _has_room(self, slot: _Slot) -> bool:
        return slot.state.takes_shards and self._devices.on_device(slot.in_flight) < SHARDS_PER_WORKER

    def _spawn(self, slot: _Slot) -> None:
        config = WorkerConfig(
            worker_id=slot.worker_id,
            device=slot.device,
            model=self.config.model,
            model_cache=self.config.model_cache,
            cpu_threads=self.config.cpu_threads,
            shard_timeout=self.config.shard_timeout,
            **self.config.worker_fields(),
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
        slot.state = WorkerState.STARTING
        slot.overdue = False
        slot.backoff.started()
        assert self._receiver is not None
        self._receiver.watch(slot.worker_id, slot.results, slot.process)
        log.info("worker %d starting on %s (pid %d)", slot.worker_id, slot.device, slot.pid)

    def _on_message(self, message: WorkerMessage) -> None:
        try:
            self._handle(message)
        except Exception:  # noqa: BLE001 - the consumer must never die quietly
            log.exception("error while handling %r", type(message).__name__)

    def _handle(self, message: WorkerMessage) -> None:
        assert self._events is not None
        slot = self._slots[message.worker_id]
        if isinstance(message, WorkerReady):
            slot.state, slot.pid, slot.error, slot.device_name = WorkerState.READY, message.pid, None, message.device_name
            log.info("worker %d ready on %s after %.1f s", slot.worker_id, slot.device, message.load_seconds)
            self._events.room_changed()
        elif isinstance(message, WorkerStartFailed):
            slot.state, slot.error = WorkerState.FAILED, message.error
            log.error("worker %d could not start: %s", slot.worker_id, message.error)
            if all(s.state is WorkerState.FAILED for s in self._slots):
                self._events.no_worker_can_load(message.error)
        elif isinstance(message, ShardStarted):
            self._running(slot, (message.request_id, message.shard_id))
            self._devices.started(slot.worker_id, (message.request_id, message.shard_id))
            self._events.room_changed()
        elif isinstance(message, (ShardDone, ShardFailed)):
            key = (message.request_id, message.shard_id)
            self._devices.ended(key)
            if slot.in_flight.pop(key, None) is not None and isinstance(message, ShardDone):
                slot.images_done += len(message.images)
            if slot.running == key:
                self._running(slot, None)
            if slot.state is WorkerState.BUSY and not slot.in_flight:
                slot.state = WorkerState.READY
            if isinstance(message, ShardDone):
                self._events.shard_done(message)
            else:
                self._events.shard_failed(message)

    def _running(self, slot: _Slot, key: tuple[str, int] | None) -> None:
        """Track the shard on the device, with a kill deadline when there is a shard timeout."""
        if slot.deadline is not None:
            slot.deadline.cancel()
            slot.deadline = None
        slot.running = key
        if key is not None and self.config.shard_timeout > 0:
            assert self._loop is not None
            slot.deadline = self._loop.call_later(self.config.shard_timeout + KILL_GRACE_SECONDS, self._overdue, slot, key)

    def _overdue(self, slot: _Slot, key: tuple[str, int]) -> None:
        """The worker's own watchdog did not end a shard past its timeout: kill the process."""
        if slot.running != key or slot.process is None or not slot.process.is_alive():
            return
        log.error("worker %d (pid %s) is stuck in shard %s/%d past the shard timeout; killing it", slot.worker_id, slot.pid, *key)
        slot.overdue = True
        slot.state = WorkerState.STALLED
        slot.process.kill()

    def _on_exit(self, worker_id: int, exitcode: int | None) -> None:
        """A worker process ended: hand its shards back to the scheduler and restart it."""
        assert self._events is not None and self._loop is not None
        slot = self._slots[worker_id]
        lost = list(slot.in_flight.values())
        culprit = slot.in_flight.get(slot.running) if slot.running is not None else None
        self._running(slot, None)
        for key in slot.in_flight:
            self._devices.ended(key)
        slot.in_flight.clear()
        timed_out = slot.overdue or exitcode == EXIT_SHARD_TIMEOUT
        if slot.state is not WorkerState.FAILED:
            slot.state = WorkerState.DEAD
        if self._stopping:
            return
        if timed_out:
            cause = f"the shard ran past the shard timeout of {self.config.shard_timeout:g} s"
            reason = FailureReason.SHARD_TIMEOUT
        else:
            cause = f"last exit code {exitcode}"
            reason = FailureReason.WORKER_CRASHES
        slot.error = f"replaced: {cause}" if slot.state is WorkerState.DEAD else slot.error
        log.error("worker %d (pid %s) ended (%s); %d shard(s) handed back", worker_id, slot.pid, cause, len(lost))
        self._events.shards_lost(lost, culprit, reason, cause)
        if slot.state is WorkerState.FAILED:
            return  # a start failure needs a fix, not a restart loop; /health shows the cause
        delay = slot.backoff.next_delay()
        slot.restarts += 1
        log.info("worker %d restarts in %.1f s", worker_id, delay)
        self._loop.call_later(delay, self._restart, slot)

    def _restart(self, slot: _Slot) -> None:
        if not self._stopping and slot.state is WorkerState.DEAD:
            self._spawn(slot)


def local_workers(config: EngineConfig) -> Scheduler:
    """The engine with workers on this box."""
    return Scheduler(config, LocalProcesses(config))


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
