"""Why a request becomes no job, or a job ends unanswered, said without HTTP's objects.

The job rooms decide (admission, idempotency, webhook checks) and return a ``Refusal``; the
handler renders it as the one error body (``service.edge.errors.refusal_response``). The numbers
are the API's statuses: they are part of the contract the rooms decide, not of aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contract.failures import FailureReason

# The engine says why a request failed; the status is chosen here, and only here. 503 says "try
# again later": the cause is outside the request (the transport, a stop).
RETRY_LATER_REASONS = frozenset({FailureReason.TRANSPORT_LOST, FailureReason.SHUTTING_DOWN})


def status_for(reason: FailureReason) -> int:
    return 503 if reason in RETRY_LATER_REASONS else 500


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str
    headers: Mapping[str, str] = field(default_factory=dict)
    # Fields the error body carries beside ``detail`` (``job_id`` of a conflicting job, ``errors``).
    fields: Mapping[str, Any] = field(default_factory=dict)
