"""The rules every transport follows, in one place: how many shards a worker holds, when a shard
that keeps losing its workers is given up, and how fast a dead worker process comes back.

Used by the scheduler (local processes and the Redis broker alike), by the remote worker (which
decides on a shard handed over in Redis) and by both process supervisors (the local pool and
``python -m gpu_workers``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from contract.failures import FailureReason
from gpu_workers.messages import ShardTask

# Shards a worker may hold that have not left its device: one running and one waiting, so the
# device never waits for the next shard. Shards that left the device (being encoded and sent)
# do not count: holding more would only make a small request wait behind a big one.
SHARDS_PER_WORKER = 2
# Seconds a shard may run on a device before its worker is replaced: generous (a T4 makes a
# 1024x576 image in about 3 s, so a shard of 4 takes some 12 s), but not forever.
DEFAULT_SHARD_TIMEOUT = 300.0
# A shard whose holder died (or ran past the shard timeout) this many times fails its request.
MAX_SHARD_LOSSES = 2

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
# A worker that ran this long before it died gets the first, short backoff again: no crash loop.
HEALTHY_RUN_SECONDS = 60.0


ShardKey = tuple[str, int]


class DeviceTracker:
    """Which of the shards handed out have left their worker's device: a worker's ``ShardStarted``
    for one shard means the shard it ran before is now only being encoded and sent."""

    def __init__(self) -> None:
        self._running: dict[int, ShardKey] = {}
        self.off_device: set[ShardKey] = set()

    def started(self, worker_id: int, key: ShardKey) -> None:
        previous = self._running.get(worker_id)
        if previous is not None:
            self.off_device.add(previous)
        self._running[worker_id] = key

    def ended(self, key: ShardKey) -> None:
        """The shard's reply arrived (or it was lost)."""
        self.off_device.discard(key)
        for worker_id, running in list(self._running.items()):
            if running == key:
                del self._running[worker_id]

    def on_device(self, keys: Iterable[ShardKey]) -> int:
        """How many of ``keys`` are running or waiting for a device."""
        return sum(key not in self.off_device for key in keys)


def given_up(losses: int) -> bool:
    """True once a shard has lost ``MAX_SHARD_LOSSES`` holders: running it again would only
    take another worker down (a poison shard) or hang another one."""
    return losses >= MAX_SHARD_LOSSES


def given_up_detail(shard: ShardTask, reason: FailureReason, last_cause: str) -> str:
    last = shard.first_index + shard.size - 1
    what = "ran past the shard timeout on" if reason is FailureReason.SHARD_TIMEOUT else "crashed"
    return (
        f"Image generation failed: images {shard.first_index}-{last} {what} {MAX_SHARD_LOSSES} workers "
        f"({last_cause}); the rest of the server is unaffected."
    )


@dataclass
class RestartBackoff:
    """1 s doubling to 30 s while a worker keeps dying young; back to 1 s after a healthy run."""

    first: float = FIRST_RESTART_DELAY
    healthy_run: float = HEALTHY_RUN_SECONDS
    _delay: float = 0.0
    _started_at: float = 0.0

    def started(self) -> None:
        self._started_at = time.monotonic()

    def next_delay(self) -> float:
        """The wait before the next start, after a death."""
        if self._delay == 0.0 or time.monotonic() - self._started_at > self.healthy_run:
            self._delay = self.first
        else:
            self._delay = min(MAX_RESTART_DELAY, self._delay * 2)
        return self._delay
