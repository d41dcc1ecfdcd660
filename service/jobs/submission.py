"""How a valid body of ``POST /generate`` or ``POST /jobs`` becomes a job to follow: a new one, or
(with an ``Idempotency-Key`` seen before) the job that key made, never a second run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from service.edge.access_log import REQUEST_ID
from service.jobs.admission import admit
from service.edge.auth import owner_of
from service.jobs.idempotency import conflict, idempotency_of
from service.jobs.job_db import Idempotency, IdempotencyKeyTaken, VariantOf
from service.jobs.manager import JobEvent, JobManager, LiveJob
from service.app_keys import JOBS
from service.integrations.webhooks import webhook_of


@dataclass
class Submitted:
    job: LiveJob
    listener: asyncio.Queue[JobEvent]
    # True: an earlier request with the same key made this job (Idempotent-Replayed: true).
    replayed: bool


async def submit(
    request: web.Request, data: dict[str, Any], variant_of: VariantOf | None = None, asked: dict[str, Any] | None = None
) -> Submitted | web.Response:
    """The job of this request, or the response that refuses it (400, 422, 503, 507, ...). A
    retry is answered before admission: it adds no work, so it is served while the queue is full.
    ``variant_of``: the job is a re-roll of that image (``data`` its batch, made from the parent's);
    ``asked``: what the client sent, where it differs from ``data`` (a retry is the same request
    when that is the same, whatever seed the first one drew)."""
    idempotency = idempotency_of(request, data if asked is None else asked)
    if isinstance(idempotency, web.Response):
        return idempotency
    jobs = request.app[JOBS]
    owner = owner_of(request)
    if idempotency is not None:
        earlier = await _earlier(jobs, owner, idempotency)
        if earlier is not None:
            return earlier
    webhook = await webhook_of(request, data)  # resolves its host: before admission reserves anything
    if isinstance(webhook, web.Response):
        return webhook
    admitted = admit(request, data)
    if isinstance(admitted, web.Response):
        return admitted
    try:
        job, listener = await jobs.create(request[REQUEST_ID], admitted, owner, idempotency, webhook, variant_of)
    except IdempotencyKeyTaken:  # the same key, sent twice at once: the other one won
        assert idempotency is not None
        earlier = await _earlier(jobs, owner, idempotency)
        if earlier is None:
            raise
        return earlier
    return Submitted(job, listener, replayed=False)


async def _earlier(jobs: JobManager, owner: str, idempotency: Idempotency) -> Submitted | web.Response | None:
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
