"""Why a request failed, as the engine reports it. The engine knows nothing of HTTP: the service
maps each reason to a status (``service.jobs.refusal.status_for``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailureReason(StrEnum):
    GENERATION = "generation"  # the pipeline raised (including CUDA out of memory for one image)
    WORKER_CRASHES = "worker_crashes"  # the shard was running when two workers died
    SHARD_TIMEOUT = "shard_timeout"  # the shard ran past the shard timeout twice
    NO_MODEL = "no_model"  # no worker could load the model
    TRANSPORT_LOST = "transport_lost"  # the way to the workers (Redis) went away: retry later
    SHUTTING_DOWN = "shutting_down"  # the server stops: retry later


@dataclass(frozen=True)
class RequestFailed:
    """The request cannot complete; ``detail`` is the readable cause for the client."""

    detail: str
    reason: FailureReason = FailureReason.GENERATION
