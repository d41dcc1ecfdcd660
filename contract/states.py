"""The states a worker and a job can be in: one spelling for the engine, the API and the docs."""

from __future__ import annotations

from enum import StrEnum


class WorkerState(StrEnum):
    STARTING = "starting"  # loading its model and warming up
    READY = "ready"  # takes shards, runs none
    BUSY = "busy"  # runs shards
    STALLED = "stalled"  # a shard ran past the shard timeout: the worker is being replaced
    DEAD = "dead"  # gone; a replacement starts after a backoff
    FAILED = "failed"  # could not load its model: needs a fix, not a restart

    @property
    def takes_shards(self) -> bool:
        return self in (WorkerState.READY, WorkerState.BUSY)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


UNFINISHED_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
