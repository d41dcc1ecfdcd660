"""``/jobs``: start a batch without waiting for it, follow it, fetch its result, cancel it.

The result of a done job is the very body ``POST /generate`` returns, read from the stored
files, so a client that lost its connection gets exactly what it would have got.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema

from schemas.common import (
    IDEMPOTENCY_PARAMETER,
    JOB_ID_HEADER_DOC,
    REPLAYED_HEADER_DOC,
    REQUEST_ID_HEADER_DOC,
    WHOLE_NUMBER_PATTERN,
    SUBMISSION_ERRORS,
    UNAUTHORIZED,
    binary_content,
    error_response,
    response_header,
)
from schemas.generate import EXAMPLE_REQUEST, GenerateRequestSchema
from schemas.jobs import JOB_STATES, JobCreatedSchema, JobListSchema, JobStatusSchema
from schemas.variants import MAX_VARIANTS_PER_IMAGE, VariantRequestSchema
from contract.formats import quality_for
from contract.states import JobState
from service.app_keys import JOBS, SETTINGS, STORE
from service.edge.auth import continue_if_allowed
from service.edge.errors import json_error
from service.http.asked import caller_of, links_of, submit
from service.http.job_result import JobResult
from service.http.streaming import Reply
from service.jobs import webhook_outbox
from service.jobs.archive import ArchiveEntry, blocks, build_zip, entry_name
from service.jobs.idempotency import REPLAYED_HEADER
from service.jobs.image_store import image_url
from service.jobs.job_db import DONE, JobRecord, VariantOf
from service.jobs.submission import Submitted
from service.jobs.variants import variant_batch, variant_file, variant_lines, variants_of

log = logging.getLogger(__name__)

NO_SUCH_JOB = "No such job: it never existed or has expired."
# The first prompt as GET /jobs lists it: enough to tell batches apart.
LISTED_PROMPT_CHARS = 120
DEFAULT_PAGE = 20
MAX_PAGE = 100
JOB_ID_PARAMETER = [{"in": "path", "name": "job_id", "required": True, "schema": {"type": "string"}, "description": "The id from POST /jobs, or X-Job-Id of /generate"}]


@docs(
    tags=["jobs"],
    summary="Start a batch and return at once",
    operation_id="create_job",
    description=(
        "Same body and limits as POST /generate. Answers 202 with the job id and a `Location` to poll "
        "(`GET /jobs/{id}`); the images are stored as they finish and survive a server restart. With an "
        "`Idempotency-Key`, a retry answers 202 with the same job (and `Idempotent-Replayed: true`)."
    ),
    parameters=[IDEMPOTENCY_PARAMETER],
    responses={
        202: {
            "description": "Accepted: the job is queued",
            "schema": JobCreatedSchema,
            "headers": {"Location": response_header("Where to follow the job: /jobs/{id}."), **JOB_ID_HEADER_DOC, **REQUEST_ID_HEADER_DOC, **REPLAYED_HEADER_DOC},
        },
        **SUBMISSION_ERRORS,
    },
)
@request_schema(GenerateRequestSchema, example=EXAMPLE_REQUEST, add_to_refs=True, required=True)
async def create_job(request: web.Request) -> web.Response:
    return _accepted(await submit(request, request["data"]), "POST /jobs")


def _accepted(submitted: Submitted | web.Response, route: str) -> web.Response:
    """202 with the job to follow (``POST /jobs`` and a re-roll), or the refusal as it is."""
    if isinstance(submitted, web.Response):
        return submitted
    job = submitted.job
    job.stop_listening(submitted.listener)
    spec, job_id = job.spec, job.job_id
    location = f"/jobs/{job_id}"
    headers = {"Location": location, "X-Job-Id": job_id}
    if submitted.replayed:
        headers[REPLAYED_HEADER] = "true"
        log.info("job %s: the same Idempotency-Key again (%s)", job_id, route)
    else:
        log.info("job %s: %d image(s) %s %s, seed %d, %s (%s)", job_id, spec.total_images, spec.size, spec.image_format, spec.seed, spec.return_format, route)
    body = {"job_id": job_id, "state": job.state, "images_total": spec.total_images, "seeds": list(spec.seeds), "location": location}
    return web.json_response(body, status=202, headers=headers)


@docs(
    tags=["jobs"],
    summary="Your jobs, newest first",
    operation_id="list_jobs",
    description=(
        "The jobs of the API key in use (every job where the server has no keys), newest first, as GET /jobs/{id} "
        "describes them without their images. `next` is the link to the following page (null on the last one)."
    ),
    parameters=[
        {"in": "query", "name": "limit", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE}},
        {"in": "query", "name": "before", "schema": {"type": "string"}, "description": "The job_id of the last job of the previous page"},
    ],
    responses={
        200: {"description": "A page of jobs", "schema": JobListSchema},
        400: error_response("A bad limit or cursor", "limit must be a whole number from 1 to 100."),
        **UNAUTHORIZED,
    },
)
async def list_jobs(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    try:
        limit = int(request.query.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        return json_error(400, f"limit must be a whole number from 1 to {MAX_PAGE}.")
    owner = caller_of(request).owner
    cursor = None
    if "before" in request.query:
        last = await own_job(request, request.query["before"])
        if last is None:
            return json_error(400, "before must be the job_id of a job on the previous page (that job has expired or never existed).")
        cursor = (last.created_at, last.job_id)
    records = await jobs.db.run(jobs.db.list_jobs, owner, limit + 1, cursor)
    retention = request.app[SETTINGS].image_retention
    page = records[:limit]
    following = f"/jobs?limit={limit}&before={page[-1].job_id}" if len(records) > limit else None
    return web.json_response({"jobs": [_status(record, retention, prompts=False) for record in page], "next": following})


@docs(
    tags=["jobs"],
    summary="A job's state and, once done, its images",
    operation_id="get_job",
    description=(
        "While the job runs: its state and images done/total (cheap to poll). When done: the same body as POST /generate "
        "(`success`, `images` as base64 or URLs, `seeds`, ...) plus the state fields. Failed and cancelled jobs carry `detail`."
    ),
    parameters=JOB_ID_PARAMETER,
    responses={
        200: {"description": "The job", "schema": JobStatusSchema, "headers": JOB_ID_HEADER_DOC},
        **UNAUTHORIZED,
        404: error_response("Unknown or expired job", NO_SUCH_JOB),
        410: error_response(
            "The job is done but some of its images were removed (disk budget)",
            "Job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6 is done, but 2 of its images were removed to keep the image folder within its disk budget.",
        ),
    },
)
async def get_job(request: web.Request) -> web.StreamResponse:
    record = await own_job(request, request.match_info["job_id"])
    if record is None:
        return json_error(404, NO_SUCH_JOB)
    status = _status(record, request.app[SETTINGS].image_retention)
    deliveries = await request.app[JOBS].db.run(request.app[JOBS].db.transaction, lambda db: webhook_outbox.deliveries(db, record.job_id))
    if deliveries:
        status["webhooks"] = [
            {"event": d.event, "webhook_id": d.message_id, "state": d.state, "attempts": d.attempts, "last_error": d.last_error} for d in deliveries
        ]
    links = links_of(request)
    variants = await request.app[JOBS].db.run(variants_of, request.app[JOBS].db, record.job_id)
    if variants:
        status["variants"] = variant_lines(variants, links)
    if record.state != DONE:
        if record.finished:
            status["success"] = False
        stored = await request.app[JOBS].stored_images(record.job_id)
        status["finished_images"] = [
            {"index": image.index, "seed": record.spec.seeds[image.index], "url": image_url(links, image.name)} for image in stored
        ]
        return web.json_response(status, headers={"X-Job-Id": record.job_id})
    done = JobResult(record.job_id, record.spec, JobState.DONE, record.images_done, warnings=record.warnings)
    result = done.with_files(await request.app[JOBS].stored_images(record.job_id), request.app[STORE])
    if not result.done:
        return json_error(result.status, result.failure_detail())
    writer = await Reply(request).start({"X-Job-Id": record.job_id})
    try:
        await result.write_body(writer, links, extra=status)
    except ConnectionError:  # reset, or lost while writing
        log.info("job %s: the client went away while reading its result", record.job_id)
    return writer.response


@docs(
    tags=["jobs"],
    summary="Cancel a job",
    operation_id="cancel_job",
    description="Its queued images never run; a shard already running finishes (its images are kept). Answers the job's state.",
    parameters=JOB_ID_PARAMETER,
    responses={
        200: {"description": "Cancelled", "schema": JobStatusSchema, "headers": JOB_ID_HEADER_DOC},
        **UNAUTHORIZED,
        404: error_response("Unknown or expired job", NO_SUCH_JOB),
        409: error_response("The job has already ended", "Job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6 has already ended (done): nothing to cancel."),
    },
)
async def cancel_job(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    job_id = request.match_info["job_id"]
    record = await own_job(request, job_id)
    if record is None:
        return json_error(404, NO_SUCH_JOB)
    if record.finished:
        return json_error(409, f"Job {job_id} has already ended ({record.state}): nothing to cancel.")
    record = await jobs.cancel(job_id)
    assert record is not None
    log.info("job %s cancelled at %d of %d image(s)", job_id, record.images_done, record.images_total)
    return web.json_response(_status(record, request.app[SETTINGS].image_retention), headers={"X-Job-Id": job_id})


@docs(
    tags=["jobs"],
    summary="A job's images as one zip",
    operation_id="get_job_archive",
    description=(
        "The images as stored (same bytes as the links and base64), not compressed again, with `manifest.json` first "
        "(index, file, prompt, seed, sha256, bytes, receipt of each image). Streamed, with a Content-Length. For a job "
        "still running: the images finished so far; a cancelled or failed job: those it finished. `since=N` leaves out "
        "the images before index N, so a client whose download was cut fetches only the rest. Headers X-Job-State and "
        "X-Images-Done say how far the job was when the archive was made."
    ),
    parameters=[
        *JOB_ID_PARAMETER,
        {"in": "query", "name": "since", "schema": {"type": "integer", "minimum": 0, "default": 0}, "description": "The first image index to include"},
    ],
    responses={
        200: {
            "description": "The zip (application/octet-stream: the same bytes, for a client that asks for that)",
            "headers": {
                **JOB_ID_HEADER_DOC,
                "X-Job-State": response_header("The job's state when the archive was made.", enum=list(JOB_STATES)),
                "X-Images-Done": response_header("Images the job had finished when the archive was made.", pattern=WHOLE_NUMBER_PATTERN),
                "Content-Disposition": response_header("attachment; filename=\"job-<id>.zip\" (job-<id>-from-<since>.zip with since)."),
            },
            "content": binary_content("application/zip"),
        },
        400: error_response("A bad since", "since must be a whole number, 0 or more."),
        **UNAUTHORIZED,
        404: error_response("Unknown or expired job", NO_SUCH_JOB),
    },
)
async def job_archive(request: web.Request) -> web.StreamResponse:
    raw_since = request.query.get("since", "0")
    if not (raw_since.isascii() and raw_since.isdigit()) or len(raw_since) > 9:
        return json_error(400, "since must be a whole number, 0 or more (the first image index to include).")
    since = int(raw_since)
    jobs = request.app[JOBS]
    record = await own_job(request, request.match_info["job_id"])
    if record is None:
        return json_error(404, NO_SUCH_JOB)
    store = request.app[STORE]
    entries = []
    for image in await jobs.stored_images(record.job_id, since):
        path = store.path_for(image.name)
        if path is not None:  # a file the disk budget removed is left out, and the manifest says so
            entries.append(ArchiveEntry(image, path, entry_name(record.spec, image.index, image.name)))
    originals = {entry.image.index: entry.file for entry in entries}
    for variant in await jobs.db.run(variants_of, jobs.db, record.job_id):
        path = None if variant.image is None else store.path_for(variant.image.name)
        if path is not None and variant.image is not None and variant.index >= since:
            original = originals.get(variant.index) or entry_name(record.spec, variant.index, variant.image.name)
            entries.append(ArchiveEntry(variant.image, path, variant_file(original, variant, variant.image.name), variant))
    archive = await store.run(build_zip, record, since, entries)
    suffix = f"-from-{since}" if since else ""
    headers = {
        "X-Job-Id": record.job_id,
        "X-Job-State": record.state,
        "X-Images-Done": str(record.images_done),
        "Content-Disposition": f'attachment; filename="job-{record.job_id}{suffix}.zip"',
        "Cache-Control": "no-store",
    }
    writer = await Reply(request).start(headers, "application/zip", content_length=len(archive))
    try:
        async for block in blocks(archive, store.run):
            await writer.write(block)
        await writer.finish()
    except ConnectionError:
        log.info("job %s: the client went away while reading its archive", record.job_id)
    return writer.response


async def own_job(request: web.Request, job_id: str) -> JobRecord | None:
    """The one lookup of a job that every job route and the list's cursor make: None for an unknown
    job and for another API key's job alike, so that no answer tells the two apart (DESIGN 4c)."""
    return await request.app[JOBS].record(job_id, caller_of(request).sees)


@docs(
    tags=["jobs"],
    summary="Make one image of a job again with a new seed",
    operation_id="create_variant",
    description=(
        "A re-roll: image `index` of the job, with the job's prompt, size, format and quality and another seed (random "
        "unless given), made as a one-image job of its own that the job keeps. `GET /jobs/{id}` lists it under "
        f"`variants` and the job's archive carries it beside the image it remakes. At most {MAX_VARIANTS_PER_IMAGE} per image. "
        "Answers 202 like POST /jobs; the re-roll's own job id can be followed too."
    ),
    parameters=[*JOB_ID_PARAMETER, IDEMPOTENCY_PARAMETER],
    responses={
        202: {
            "description": "Accepted: the re-roll is queued",
            "schema": JobCreatedSchema,
            "headers": {"Location": response_header("Where to follow the re-roll: /jobs/{id}."), **JOB_ID_HEADER_DOC, **REQUEST_ID_HEADER_DOC, **REPLAYED_HEADER_DOC},
        },
        404: error_response("Unknown or expired job", NO_SUCH_JOB),
        409: error_response("The image has as many re-rolls as it may have", f"Image 3 of job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6 has {MAX_VARIANTS_PER_IMAGE} re-rolls already: the most one image may have."),
        **SUBMISSION_ERRORS,
    },
)
@request_schema(VariantRequestSchema, add_to_refs=True, required=True)
async def create_variant(request: web.Request) -> web.Response:
    parent = await own_job(request, request.match_info["job_id"])
    if parent is None:  # another key's job too: the same 404
        return json_error(404, NO_SUCH_JOB)
    index, seed = request["data"]["index"], request["data"]["seed"]
    if index >= parent.images_total:
        return json_error(400, f"index must be below {parent.images_total}: job {parent.job_id} has {parent.images_total} image(s).", errors={"index": ["Out of range."]})
    jobs = request.app[JOBS]
    made = sum(variant.index == index for variant in await jobs.db.run(variants_of, jobs.db, parent.job_id))
    if made >= MAX_VARIANTS_PER_IMAGE:
        return json_error(409, f"Image {index} of job {parent.job_id} has {made} re-rolls already: the most one image may have.")
    asked = {"variant_of": parent.job_id, "index": index, "seed": seed}
    submitted = await submit(request, variant_batch(parent, index, seed), VariantOf(parent.job_id, index), asked)
    return _accepted(submitted, f"a re-roll of image {index} of job {parent.job_id}")


def _status(record: JobRecord, retention: float, prompts: bool = True) -> dict[str, Any]:
    """A job's state as GET /jobs/{id} says it; ``prompts`` False for the list (up to 100 jobs of up
    to 150 prompts of 2,000 characters would be a page of 30 MB)."""
    status: dict[str, Any] = {
        "job_id": record.job_id,
        "state": record.state,
        "images_done": record.images_done,
        "images_total": record.images_total,
        "return_format": record.spec.return_format,
        "format": record.spec.image_format,
        "quality": quality_for(record.spec.image_format, record.spec.quality),
        "size": record.spec.size,
        "num_images_per_prompt": record.spec.num_images_per_prompt,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "expires_at": None if record.finished_at is None else record.finished_at + retention,
        "warnings": list(record.warnings),
        "seeds": list(record.spec.seeds),
    }
    if prompts:
        status["prompts"] = list(record.spec.prompts)
    else:
        first = record.spec.prompts[0]
        status["prompt"] = first if len(first) <= LISTED_PROMPT_CHARS else first[: LISTED_PROMPT_CHARS - 1] + "…"
    if record.detail:
        status["detail"] = record.detail
    return status


JOB_ROUTES = [
    web.post("/jobs", create_job, expect_handler=continue_if_allowed),
    web.get("/jobs", list_jobs, allow_head=False),
    web.get("/jobs/{job_id}", get_job, allow_head=False),
    web.get("/jobs/{job_id}/archive", job_archive, allow_head=False),
    web.delete("/jobs/{job_id}", cancel_job),
    web.post("/jobs/{job_id}/variants", create_variant, expect_handler=continue_if_allowed),
]
