"""The one place an aiohttp request becomes typed values: who asks, what they ask, how to answer.

A handler calls these once; everything below it (admission, idempotency, the job manager, the
webhook check, the writers) takes the values, never the request. So how the owner, the links'
base or the answer's mode is decided changes here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiohttp import web

from service.app_keys import API_KEYS, SETTINGS, SUBMITTER
from service.edge.access_log import IMAGES, KEY_NAME, REQUEST_ID
from service.edge.errors import refusal_response
from service.edge.forwarded import request_origin
from service.jobs.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.jobs.idempotency import idempotency_of
from service.jobs.job_db import VariantOf
from service.jobs.refusal import Refusal
from service.jobs.submission import Submission, Submitted
from service.jobs.webhook_outbox import WebhookTarget

NDJSON_CONTENT_TYPE = "application/x-ndjson"


class AnswerMode(StrEnum):
    """How ``POST /generate`` answers: JSON after whitespace heartbeats, or NDJSON progress lines."""

    HEARTBEATS = "heartbeats"
    NDJSON = "ndjson"


@dataclass(frozen=True)
class Caller:
    """Who asks."""

    # The API key's name (never the key), '' without keys: whose work, for the fair queue, the
    # list of jobs, idempotency keys, the access log and the metrics.
    owner: str
    # Whose jobs the caller may see in any lookup: its key's name; None on a server without keys,
    # where every job is everyone's.
    sees: str | None
    request_id: str


def caller_of(request: web.Request) -> Caller:
    owner = request.get(KEY_NAME, "")
    return Caller(owner=owner, sees=owner if request.app[API_KEYS] else None, request_id=request[REQUEST_ID])


def links_of(request: web.Request) -> str:
    """Where links point (every link the server builds starts here): the configured public URL
    (a tunnel's), or the scheme and host the client addressed, as a trusted proxy forwards them."""
    settings = request.app[SETTINGS]
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return request_origin(request, settings.trusted_proxies()).base_url


def answer_mode(request: web.Request) -> AnswerMode:
    accepted = (part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(","))
    return AnswerMode.NDJSON if NDJSON_CONTENT_TYPE in accepted else AnswerMode.HEARTBEATS


def submission_of(
    request: web.Request, data: dict[str, Any], variant_of: VariantOf | None = None, asked: dict[str, Any] | None = None
) -> Submission | Refusal:
    """A validated body and its headers as a ``Submission`` (a 400 for a malformed
    Idempotency-Key). ``asked``: what the client sent, where it differs from ``data`` (a re-roll:
    a retry is the same request when that is the same, whatever seed the first one drew)."""
    idempotency = idempotency_of(request.headers.get(IDEMPOTENCY_HEADER), data if asked is None else asked)
    if isinstance(idempotency, Refusal):
        return idempotency
    url = data.get("webhook_url")
    webhook = None if url is None else WebhookTarget(url, tuple(data["webhook_events"]), links_of(request))
    return Submission(request[REQUEST_ID], caller_of(request).owner, data, idempotency, webhook, variant_of)


async def submit(
    request: web.Request, data: dict[str, Any], variant_of: VariantOf | None = None, asked: dict[str, Any] | None = None
) -> Submitted | web.Response:
    """What every submitting handler does: parse, submit, and render a refusal as the error body."""
    submission = submission_of(request, data, variant_of, asked)
    submitted = submission if isinstance(submission, Refusal) else await request.app[SUBMITTER].submit(submission)
    if isinstance(submitted, Refusal):
        return refusal_response(submitted)
    if not submitted.replayed:
        request[IMAGES] = submitted.job.spec.total_images
    return submitted
