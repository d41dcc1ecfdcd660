"""``/jobs``: start a batch without waiting for it, follow it, fetch its result, cancel it.

The result of a done job is the very body ``POST /generate`` returns, read from the stored
files, so a client that lost its connection gets exactly what it would have got.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema

from schemas.common import error_response
from schemas.generate import EXAMPLE_REQUEST, GenerateRequestSchema
from schemas.jobs import JobCreatedSchema, JobStatusSchema
from service.access_log import REQUEST_ID
from service.admission import admit
from service.auth import continue_if_allowed
from service.errors import json_error
from contract.states import JobState
from service.job_db import DONE, JobRecord
from service.job_listening import base_url
from service.job_result import JobResult
from service.keys import JOBS, SETTINGS, STORE
from service.streaming import start_stream

log = logging.getLogger(__name__)

NO_SUCH_JOB = "No such job: it never existed or has expired."
JOB_ID_PARAMETER = [{"in": "path", "name": "job_id", "required": True, "schema": {"type": "string"}, "description": "The id from POST /jobs, or X-Job-Id of /generate"}]


@docs(
    tags=["jobs"],
    summary="Start a batch and return at once",
    description=(
        "Same body and limits as POST /generate. Answers 202 with the job id and a `Location` to poll "
        "(`GET /jobs/{id}`); the images are stored as they finish and survive a server restart."
    ),
    responses={
        202: {"description": "Accepted: the job is queued", "schema": JobCreatedSchema},
        400: error_response("Invalid body, as for /generate", "Invalid request: prompts: Missing data for required field."),
        401: error_response("Missing or wrong API key (only when the server has one set)", "This server needs an API key: send Authorization: Bearer <key> or X-API-Key: <key>."),
        413: error_response("Body larger than the server's limit", "The request body is too large: Maximum request body size 1048576 exceeded."),
        503: error_response("Queue full, no worker ready, or shutting down; Retry-After says when to try again", "The server is shutting down and takes no new requests."),
    },
)
@request_schema(GenerateRequestSchema, example=EXAMPLE_REQUEST)
async def create_job(request: web.Request) -> web.Response:
    admitted = admit(request, request["data"])
    if isinstance(admitted, web.Response):
        return admitted
    job_id = request[REQUEST_ID]
    job, listener = await request.app[JOBS].create(job_id, admitted)
    job.stop_listening(listener)
    location = f"/jobs/{job_id}"
    log.info("job %s: %d image(s), seed %d, %s (POST /jobs)", job_id, admitted.total_images, admitted.seed, admitted.return_format)
    body = {"job_id": job_id, "state": job.state, "images_total": admitted.total_images, "seeds": list(admitted.seeds), "location": location}
    return web.json_response(body, status=202, headers={"Location": location, "X-Job-Id": job_id})


@docs(
    tags=["jobs"],
    summary="A job's state and, once done, its images",
    description=(
        "While the job runs: its state and images done/total (cheap to poll). When done: the same body as POST /generate "
        "(`success`, `images` as base64 or URLs, `seeds`, ...) plus the state fields. Failed and cancelled jobs carry `detail`."
    ),
    parameters=JOB_ID_PARAMETER,
    responses={
        200: {"description": "The job", "schema": JobStatusSchema},
        404: error_response("Unknown or expired job", NO_SUCH_JOB),
        410: error_response(
            "The job is done but some of its images were removed (disk budget)",
            "Job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6 is done, but 2 of its images were removed to keep the image folder within its disk budget.",
        ),
    },
)
async def get_job(request: web.Request) -> web.StreamResponse:
    record = await request.app[JOBS].record(request.match_info["job_id"])
    if record is None:
        return json_error(404, NO_SUCH_JOB)
    status = _status(record, request.app[SETTINGS].image_retention)
    if record.state != DONE:
        if record.finished:
            status["success"] = False
        return web.json_response(status, headers={"X-Job-Id": record.job_id})
    ids = await asyncio.to_thread(request.app[JOBS].db.image_ids, record.job_id)
    done = JobResult(record.job_id, record.spec, JobState.DONE, record.images_done, warnings=record.warnings)
    result = done.with_files(tuple(ids.get(index, "") for index in range(record.images_total)), request.app[STORE])
    if not result.done:
        return json_error(result.status, result.failure_detail())
    writer = await start_stream(request, {"X-Job-Id": record.job_id})
    try:
        await result.write_body(writer, base_url(request), extra=status)
    except ConnectionError:  # reset, or lost while writing
        log.info("job %s: the client went away while reading its result", record.job_id)
    return writer.response


@docs(
    tags=["jobs"],
    summary="Cancel a job",
    description="Its queued images never run; a shard already running finishes (its images are kept). Answers the job's state.",
    parameters=JOB_ID_PARAMETER,
    responses={
        200: {"description": "Cancelled", "schema": JobStatusSchema},
        404: error_response("Unknown or expired job", NO_SUCH_JOB),
        409: error_response("The job has already ended", "Job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6 has already ended (done): nothing to cancel."),
    },
)
async def cancel_job(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    job_id = request.match_info["job_id"]
    record = await jobs.record(job_id)
    if record is None:
        return json_error(404, NO_SUCH_JOB)
    if record.finished:
        return json_error(409, f"Job {job_id} has already ended ({record.state}): nothing to cancel.")
    record = await jobs.cancel(job_id)
    assert record is not None
    log.info("job %s cancelled at %d of %d image(s)", job_id, record.images_done, record.images_total)
    return web.json_response(_status(record, request.app[SETTINGS].image_retention), headers={"X-Job-Id": job_id})


def _status(record: JobRecord, retention: float) -> dict[str, Any]:
    status: dict[str, Any] = {
        "job_id": record.job_id,
        "state": record.state,
        "images_done": record.images_done,
        "images_total": record.images_total,
        "return_format": record.spec.return_format,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "expires_at": None if record.finished_at is None else record.finished_at + retention,
        "warnings": list(record.warnings),
        "seeds": list(record.spec.seeds),
    }
    if record.detail:
        status["detail"] = record.detail
    return status


JOB_ROUTES = [
    web.post("/jobs", create_job, expect_handler=continue_if_allowed),
    web.get("/jobs/{job_id}", get_job, allow_head=False),
    web.delete("/jobs/{job_id}", cancel_job),
]
