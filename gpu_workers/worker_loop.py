"""The one worker loop, for local workers and for workers on other boxes: a pipeline in which the
device never waits for the host.

Three stages run side by side in the worker process::

    taker thread         main thread (the device)        encode threads + sender thread
    take shard N+1  ->   run shard N              ->     encode shard N-1's PNGs, send them

- The taker holds at most one shard ahead (``source.take``), so the next shard is in hand the
  moment the device is free, whatever the transport's round trip costs.
- The main thread only runs pipelines. The PIL images of a finished shard go to a small thread
  pool (PIL releases the GIL while it compresses, so encoding uses other cores) and the sender
  thread sends each shard's reply when its images are encoded, in the order the device ran them.
  At most ``ENCODE_BACKLOG`` shards wait for encoding: a host slower than the device slows the
  device down instead of filling memory.
- A watchdog thread ends the process (``EXIT_SHARD_TIMEOUT``) when one shard runs on the device
  past ``WorkerConfig.shard_timeout``: a hung kernel cannot hold its request forever; the
  process's supervisor replaces it and the scheduler retries the shard elsewhere.

What stays true: every shard taken gets exactly one reply (done or failed), the same seed gives
the same bytes whatever the transport, CUDA out of memory splits and retries (``generation``), and
a failed shard never takes the worker down. How shards arrive and replies leave is the
transport's (``ShardSource`` and ``ResultSink``): a local queue and pipe (``gpu_workers.worker``)
or Redis Streams (``gpu_workers.remote_worker``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from contract.states import WorkerState
from gpu_workers.messages import ShardDone, ShardFailed, ShardTask, WorkerConfig
from gpu_workers.receipts import WorkerFacts

log = logging.getLogger(__name__)

OOM_DETAIL = "Image generation failed: CUDA out of memory"
# Exit code of a worker that ended itself because a shard ran past the shard timeout.
EXIT_SHARD_TIMEOUT = 3
ENCODE_THREADS = 2
ENCODE_BACKLOG = 2
POLL_SECONDS = 0.5


@dataclass
class Taken:
    """A shard in the worker's hands. ``receipt`` is the transport's own handle on it (a Redis
    entry to acknowledge); ``reply`` is set when the source already decided the answer (a shard
    that must not run), and then the device never sees it."""

    task: ShardTask | None
    receipt: Any = None
    reply: ShardFailed | None = None


class ShardSource(Protocol):
    def take(self) -> Taken | None:
        """The next shard, waiting up to about a second; None when none came (or on a stop)."""

    def stopping(self) -> bool:
        """True once no more shards should be taken."""


class ResultSink(Protocol):
    def started(self, taken: Taken) -> None:
        """The shard is on the device now (the main thread)."""

    def finished(self, taken: Taken, reply: ShardDone | ShardFailed | None) -> None:
        """The shard's one reply (None: nothing to say, only acknowledge); sender thread, in order."""

    def state(self, state: WorkerState, images_done: int) -> None:
        """What /health should show for this worker."""


def failure_detail(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OOM_DETAIL
    return f"Image generation failed: {type(exc).__name__}: {exc}"


class Watchdog:
    """Ends the process when one shard has been on the device longer than ``timeout`` seconds.

    A thread of its own, so it runs while the main thread waits in a pipeline that never returns
    (GPU work releases the GIL). A hang that holds the GIL is beyond it: the local pool kills such
    a worker from outside a few seconds later.
    """

    def __init__(self, timeout: float, on_timeout: Callable[[str], None]) -> None:
        self.timeout = timeout
        self._on_timeout = on_timeout
        self._lock = threading.Lock()
        self._armed: tuple[float, str] | None = None
        if timeout > 0:
            threading.Thread(target=self._run, name="watchdog", daemon=True).start()

    def arm(self, label: str) -> None:
        with self._lock:
            self._armed = (time.monotonic() + self.timeout, label)

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                armed = self._armed
            if armed is not None and time.monotonic() > armed[0]:
                self._on_timeout(armed[1])
                return


def give_up_on_shard(label: str) -> None:
    """The watchdog's default: say why, then end the process at once (a stuck CUDA call would
    never let a normal exit finish)."""
    log.error("shard %s ran past the shard timeout; this worker ends itself to be replaced", label)
    logging.shutdown()
    os._exit(EXIT_SHARD_TIMEOUT)


class _Encoder:
    """Encode threads plus the sender thread: replies leave in the order the device ran shards."""

    def __init__(self, sink: ResultSink, worker_id: int, facts: WorkerFacts) -> None:
        from gpu_workers.generation import encode_image

        self._encode_image = encode_image
        self._facts = facts
        self._sink = sink
        self._worker_id = worker_id
        self._pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="encode")
        self._backlog: queue.Queue[tuple[Taken, Any] | None] = queue.Queue(maxsize=ENCODE_BACKLOG)
        self._sender = threading.Thread(target=self._send_all, name="sender", daemon=True)
        self._sender.start()

    def put_images(self, taken: Taken, images: list[Any], warnings: tuple[str, ...], seconds: float, peak: int = 0) -> None:
        task = taken.task
        futures = [self._pool.submit(self._encode_image, image, task, offset, self._facts) for offset, image in enumerate(images)]
        self._backlog.put((taken, (futures, warnings, seconds, peak)))

    def put_reply(self, taken: Taken, reply: ShardFailed | None) -> None:
        self._backlog.put((taken, reply))

    def close(self) -> None:
        """Wait until every reply is handed to the sink."""
        self._backlog.put(None)
        self._sender.join()
        self._pool.shutdown()

    def _send_all(self) -> None:
        while (item := self._backlog.get()) is not None:
            taken, work = item
            try:
                self._sink.finished(taken, self._reply(taken, work))
            except Exception:  # noqa: BLE001 - the sender must never die quietly
                log.exception("could not send the reply of a shard")

    def _reply(self, taken: Taken, work: Any) -> ShardDone | ShardFailed | None:
        if not isinstance(work, tuple):
            return work
        task = taken.task
        assert task is not None
        futures, warnings, seconds, peak = work
        try:
            encoded = [future.result() for future in futures]
        except Exception as exc:  # noqa: BLE001 - a shard that cannot be encoded fails alone
            log.exception("shard %s/%d: encoding failed", task.request_id, task.shard_id)
            return ShardFailed(self._worker_id, task.request_id, task.shard_id, f"Image encoding failed: {exc}")
        images = tuple(data for data, _ in encoded)
        receipts = tuple(text for _, text in encoded)
        return ShardDone(self._worker_id, task.request_id, task.shard_id, images, warnings, seconds, receipts, peak)


def serve(
    pipe: Any,
    config: WorkerConfig,
    source: ShardSource,
    sink: ResultSink,
    on_timeout: Callable[[str], None] = give_up_on_shard,
    facts: WorkerFacts | None = None,
) -> int:
    """Run shards until the source stops; returns the number of images made. ``facts`` (the
    worker's half of each image's receipt) default to unknown ones for a fake pipeline."""
    from gpu_workers.generation import BatchLimit, device_memory_peak, generate_fitting, truncation_warnings

    limit = BatchLimit()
    watchdog = Watchdog(config.shard_timeout, on_timeout)
    ahead: queue.Queue[Taken] = queue.Queue()
    room = threading.Semaphore(1)  # at most one shard taken and not yet on the device
    taker = threading.Thread(target=_take_ahead, args=(source, ahead, room), name="taker", daemon=True)
    taker.start()
    encoder = _Encoder(sink, config.worker_id, facts or WorkerFacts.unknown(config.model))
    images_done = 0
    try:
        while True:
            try:
                taken = ahead.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not taker.is_alive() and ahead.empty():
                    break
                continue
            room.release()
            task = taken.task
            if task is None or taken.reply is not None:
                encoder.put_reply(taken, taken.reply)
                continue
            sink.started(taken)
            sink.state(WorkerState.BUSY, images_done)
            label = f"{task.request_id}/{task.shard_id}"
            started = time.perf_counter()
            watchdog.arm(label)
            try:
                images = generate_fitting(pipe, task, limit)
                warnings = truncation_warnings(pipe, task.prompts)
            except Exception as exc:  # noqa: BLE001 - a failed shard must never take the worker down
                log.exception("worker %d: shard %s failed", config.worker_id, label)
                encoder.put_reply(taken, ShardFailed(config.worker_id, task.request_id, task.shard_id, failure_detail(exc)))
            else:
                images_done += len(images)
                seconds = time.perf_counter() - started
                encoder.put_images(taken, images, warnings, seconds, device_memory_peak(config.device))
            finally:
                watchdog.disarm()
            sink.state(WorkerState.READY, images_done)
    finally:
        encoder.close()
    return images_done


def _take_ahead(source: ShardSource, ahead: queue.Queue[Taken], room: threading.Semaphore) -> None:
    while not source.stopping():
        if not room.acquire(timeout=POLL_SECONDS):
            continue
        taken = source.take()
        if taken is None:
            room.release()
        else:
            ahead.put(taken)
