"""How a valid ``POST /generate``, ``POST /jobs`` or re-roll becomes a job to follow: a new one, or
(with an ``Idempotency-Key`` seen before) the job that key made, never a second run.

It takes a ``Submission``, the typed values the HTTP edge made of the request once
(``service.http.asked``), and answers a job or a ``Refusal``: nothing here reads HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.jobs.admission import Admission
from service.jobs.idempotency import conflict
from service.jobs.job_db import Idempotency, IdempotencyKeyTaken, VariantOf
from service.jobs.manager import JobEvent, JobManager, LiveJob
from service.jobs.refusal import Refusal
from service.jobs.webhook_outbox import WebhookTarget

# Whether a job's webhook may be taken: the integration checks the owner's outbox room and the
# target's address (it awaits DNS). None: taken.
WebhookCheck = Callable[[str, WebhookTarget, int], Awaitable[Refusal | None]]


@dataclass(frozen=True)
class Submission:
    """A request for a batch, as values."""

    # The request's id, which becomes the job's id.
    request_id: str
    # Whose work it is: the API key's name ('' without keys).
    owner: str
    # The validated body (the batch to run: admission turns it into a ``BatchSpec``).
    data: dict[str, Any]
    idempotency: Idempotency | None = None
    # Where the job's events go (None: nowhere), with the base of the links they carry.
    webhook: WebhookTarget | None = None
    # A re-roll of that image (``data`` its batch, made from the parent's).
    variant_of: VariantOf | None = None


@dataclass
class Submitted:
    job: LiveJob
    listener: asyncio.Queue[JobEvent]
    # True: an earlier request with the same key made this job (Idempotent-Replayed: true).
    replayed: bool


@dataclass
class Submitter:
    """Admission, idempotency and the webhook check in the one order that keeps them honest."""

    jobs: JobManager
    admission: Admission
    check_webhook: WebhookCheck

    async def submit(self, submission: Submission) -> Submitted | Refusal:
        """The job of this submission, or why it is refused (400, 422, 429, 503, 507, ...). A
        retry is answered before admission: it adds no work, so it is served while the queue is
        full."""
        owner, idempotency = submission.owner, submission.idempotency
        if idempotency is not None:
            earlier = await self._earlier(owner, idempotency)
            if earlier is not None:
                return earlier
        if submission.webhook is not None:  # resolves its host: before admission reserves anything
            data = submission.data
            refused = await self.check_webhook(owner, submission.webhook, len(data["prompts"]) * data["num_images_per_prompt"])
            if refused is not None:
                return refused
        admitted = self.admission.admit(owner, submission.data)
        if isinstance(admitted, Refusal):
            return admitted
        try:
            job, listener = await self.jobs.create(
                submission.request_id, admitted, owner, idempotency, submission.webhook, submission.variant_of
            )
        except IdempotencyKeyTaken:  # the same key, sent twice at once: the other one won
            assert idempotency is not None
            earlier = await self._earlier(owner, idempotency)
            if earlier is None:
                raise
            return earlier
        return Submitted(job, listener, replayed=False)

    async def _earlier(self, owner: str, idempotency: Idempotency) -> Submitted | Refusal | None:
        jobs = self.jobs
        found = await jobs.db.run(jobs.db.by_idempotency_key, owner, idempotency.key)
        if found is None:
            return None
        record, request_hash = found
        if request_hash != idempotency.request_hash:
            return conflict(record, idempotency.key)
        attached = await jobs.attach(record.job_id)
        if attached is None:  # expired in between: the key went with it
            return None
        return Submitted(*attached, replayed=True)
