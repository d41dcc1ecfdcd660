"""Time limits for the tests, derived from what the same test just measured on this machine.

A limit on how fast our code must be is written as its bound on a quiet machine *and* a multiple
of a reference measured in the same test (a /health round trip, a worker's start-up as the server
logged it): ``scaled(quiet, reference, factor)`` is the larger of the two. On a quiet machine the
quiet bound decides, so no test is weaker there; on a busy one (the suite beside other work) the
limit grows with what the machine does to every process alike, and a bug that costs a multiple of
the reference (a missed wake-up, a wait for the wrong thing) still goes over it.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from datetime import datetime

# "2026-12-02 21:13:43,123 gpu_workers.pool INFO worker 0 starting on cpu (pid 4242)": logging's asctime.
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_STARTING = re.compile(_STAMP + r" .*\bworker (\d+) starting on ")
_READY = re.compile(_STAMP + r" .*\bworker (\d+) ready on ")


def seconds(operation: Callable[[], object]) -> float:
    """How long ``operation()`` took, wall clock."""
    started = time.monotonic()
    operation()
    return time.monotonic() - started


def median_seconds(operation: Callable[[], object], times: int = 5) -> float:
    """The median of ``times`` runs of ``operation``: one slow run (a page fault, a GC) is not the machine."""
    return statistics.median(seconds(operation) for _ in range(times))


def scaled(quiet_s: float, reference_s: float, factor: float) -> float:
    """``quiet_s``, or ``factor`` times the measured reference where the machine is that much slower."""
    return max(quiet_s, factor * reference_s)


def worker_starts(log: str) -> list[float]:
    """Each local worker's start-up in a server log, in seconds, in order: from "worker N starting"
    (the process spawned) to "worker N ready" (its model loaded), as the pool logged them. A start
    that has not ended yet is left out."""
    starting: dict[str, datetime] = {}
    starts: list[float] = []
    for line in log.splitlines():
        if match := _STARTING.match(line):
            starting[match[2]] = _parse(match[1])
        elif (match := _READY.match(line)) and match[2] in starting:
            starts.append((_parse(match[1]) - starting.pop(match[2])).total_seconds())
    return starts


def longest_worker_start(log: str) -> float:
    """The slowest worker start-up in a server log (a server is logged healthy only after one)."""
    starts = worker_starts(log)
    assert starts, f"no worker start-up in the log:\n{log[-3000:]}"
    return max(starts)


def patience(log: str, quiet_s: float = 60.0) -> float:
    """How long to wait for workers to start again, or for a few images, before giving up on a hung
    test: ``quiet_s``, or 4 of the slowest worker start-up in ``log`` (a server that started under
    the same load). A give-up, not a speed limit."""
    return scaled(quiet_s, longest_worker_start(log), 4)


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
