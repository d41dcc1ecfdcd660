"""The requests the engine carries and the rules for their results, whatever moves the shards.

Each request's events go to its handle; each shard's result is used once (a shard that ran twice
after a takeover reports twice); a request fails once; an abandoned request ends with ``Drained``
when its last running shard has reported. The scheduler (``gpu_workers.scheduler``) owns one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from contract.failures import FailureReason, RequestFailed
from gpu_workers.messages import ShardDone, ShardTask
from gpu_workers.shard_queue import ShardQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drained:
    """An abandoned request's last running shard has ended: nothing more will come."""


class RequestHandle:
    """The event stream of one request: ``ShardDone`` per finished shard, or one ``RequestFailed``;
    after ``abandon``, the shards that were already running still report, then ``Drained``."""

    def __init__(self, request_id: str, shards: list[ShardTask]) -> None:
        self.request_id = request_id
        self.shards = shards
        self.events: asyncio.Queue[ShardDone | RequestFailed | Drained] = asyncio.Queue()
        self.finished: set[int] = set()
        self.in_flight: set[int] = set()
        self.abandoned = False

    @property
    def complete(self) -> bool:
        return len(self.finished) == len(self.shards)


class RequestLedger:
    def __init__(self) -> None:
        self.queue = ShardQueue()
        self.requests: dict[str, RequestHandle] = {}
        self._seconds_per_image: float | None = None

    def add(self, request_id: str, shards: list[ShardTask], owner: str = "") -> RequestHandle:
        handle = RequestHandle(request_id, shards)
        self.requests[request_id] = handle
        self.queue.add(shards, owner)
        return handle

    def abandon(self, request_id: str) -> None:
        """Nobody waits for this request any more: its queued shards never run; the ones already
        running finish and still report, then ``Drained`` ends it."""
        handle = self.requests.get(request_id)
        if handle is None or handle.abandoned:
            return
        handle.abandoned = True
        dropped = self.queue.drop(request_id)
        log.info("request %s abandoned: %d queued image(s) dropped, %d shard(s) still running", request_id, dropped, len(handle.in_flight))
        self.end_if_drained(handle)

    def fail_all(self, detail: str, reason: FailureReason) -> None:
        for handle in list(self.requests.values()):
            if not handle.abandoned:
                self.fail(handle, detail, reason)

    def fail(self, handle: RequestHandle, detail: str, reason: FailureReason) -> None:
        self.requests.pop(handle.request_id, None)
        self.queue.forget(handle.request_id)
        handle.events.put_nowait(RequestFailed(detail, reason))

    def end_if_drained(self, handle: RequestHandle) -> None:
        if handle.abandoned and not handle.in_flight and self.requests.pop(handle.request_id, None) is not None:
            self.queue.forget(handle.request_id)
            handle.events.put_nowait(Drained())

    def dispatched(self, shard: ShardTask) -> None:
        self.requests[shard.request_id].in_flight.add(shard.shard_id)

    def shard_done(self, message: ShardDone) -> bool:
        """Hand a finished shard to its request, once; False for a result nobody needs (a second
        run of the shard, or a request that already ended)."""
        handle = self.requests.get(message.request_id)
        if handle is None or message.shard_id in handle.finished:
            return False
        self._learn_speed(message)
        handle.in_flight.discard(message.shard_id)
        handle.finished.add(message.shard_id)
        handle.events.put_nowait(message)
        if handle.complete:
            self.requests.pop(message.request_id, None)
            self.queue.forget(message.request_id)
        self.end_if_drained(handle)
        return True

    def shard_failed(self, request_id: str, shard_id: int, error: str, reason: FailureReason) -> None:
        handle = self.requests.get(request_id)
        if handle is None:
            return
        handle.in_flight.discard(shard_id)
        if handle.abandoned:
            self.end_if_drained(handle)
        else:
            self.fail(handle, error, reason)

    def shard_lost(self, shard: ShardTask) -> RequestHandle | None:
        """A shard's worker went away: the request to give it back to, or None when nobody needs it."""
        handle = self.requests.get(shard.request_id)
        if handle is None or shard.shard_id in handle.finished:
            return None
        handle.in_flight.discard(shard.shard_id)
        if handle.abandoned:
            self.end_if_drained(handle)
            return None
        return handle

    def estimated_wait(self, images: int, workers: int) -> float:
        """Seconds until ``images`` more would be done at the throughput seen so far."""
        per_image = self._seconds_per_image or 1.0
        return images * per_image / max(1, workers)

    def _learn_speed(self, done: ShardDone) -> None:
        """A moving average of seconds per image, for Retry-After estimates."""
        per_image = done.seconds / max(1, len(done.images))
        previous = self._seconds_per_image
        self._seconds_per_image = per_image if previous is None else 0.8 * previous + 0.2 * per_image
