"""Route handlers, module-level and listed in one place (``ROUTES``) so the API reads at a glance."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema

from schemas.common import (
    IDEMPOTENCY_PARAMETER,
    JOB_ID_HEADER_DOC,
    REPLAYED_HEADER_DOC,
    REQUEST_ID_HEADER_DOC,
    RETRY_AFTER_HEADER_DOC,
    SUBMISSION_ERRORS,
    UNAUTHORIZED,
    RootSchema,
    binary_content,
    error_response,
)
from schemas.generate import EXAMPLE_REQUEST, MAX_IMAGES_PER_PROMPT, GenerateRequestSchema
from schemas.health import HealthSchema
from contract.formats import CONTENT_TYPES, IMAGE_FORMATS
from contract.states import JobState
from service import __version__
from service.app_keys import JOBS, LIFECYCLE, POOL, SETTINGS, STORE
from service.edge.auth import continue_if_allowed
from service.edge.errors import json_error
from service.http.asked import NDJSON_CONTENT_TYPE, AnswerMode, answer_mode, caller_of, links_of, submit
from service.http.job_listening import follow
from service.http.job_result import JobResult
from service.http.ndjson import stream_progress
from service.http.streaming import HeartbeatResponse, Reply
from service.jobs.idempotency import REPLAYED_HEADER
from service.jobs.image_store import content_type
from service.jobs.manager import JobEvent, JobManager, LiveJob, ShardStored

log = logging.getLogger(__name__)


@docs(tags=["info"], summary="API information and available endpoints", operation_id="root", responses=UNAUTHORIZED)
@response_schema(RootSchema, 200)
async def root(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "name": "SDXL Lightning API",
            "version": __version__,
            "status": "running",
            "endpoints": {
                "generate": "/generate - POST - Generate images from prompts",
                "health": "/health - GET - Health check",
                "docs": "/docs - GET - API documentation",
                "ui": "/ui - GET - A page to paste prompts, watch the images arrive and download the batch",
                "jobs": "/jobs - POST - Start a batch and return at once; /jobs/{id} - GET - progress and result, DELETE - cancel",
                "images": "/images/{id}.{png,webp,jpg} - GET - Images of return_format url requests (no key needed: the id is the capability)",
                "archive": "/jobs/{id}/archive - GET - A job's images as one zip with a manifest; ?since=N for the rest",
            },
            "sizes": list(request.app[SETTINGS].allowed_sizes()),
            "limits": {
                "max_images": request.app[SETTINGS].max_images,
                "max_prompt_chars": request.app[SETTINGS].max_prompt_chars,
                "max_images_per_prompt": MAX_IMAGES_PER_PROMPT,
            },
            "formats": {name: {"default_quality": f.default_quality} for name, f in IMAGE_FORMATS.items()},
        }
    )


@docs(
    tags=["info"],
    summary="Health check (no API key needed)",
    operation_id="health",
    security=[],
    description="200 while at least one worker takes work; 503 while none does (starting, or every worker failed: see `workers[].error`).",
    responses={
        200: {"description": "healthy", "schema": HealthSchema},
        503: {"description": "unhealthy: no worker is ready", "schema": HealthSchema},
    },
)
async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    store = request.app[STORE]
    workers = pool.snapshot()
    # From the workers themselves (the API process never imports torch): the first CUDA worker's
    # device name, once it has reported ready.
    cuda_workers = [w for w in workers if "cuda" in w.device]
    lifecycle = request.app[LIFECYCLE]
    healthy = pool.ready_workers > 0 and not lifecycle.draining
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "draining": lifecycle.draining,
        "active_requests": lifecycle.active_requests,
        "active_jobs": request.app[JOBS].running_jobs,
        "cuda_available": bool(cuda_workers),
        "cuda_device": next((w.device_name for w in cuda_workers if w.device_name), None),
        "model": pool.config.model,
        "queued_images": pool.queued_images,
        "storage": {"problem": store.problem, "free_bytes": store.free_bytes()},
        "problem": pool.problem,
        "workers": [
            {
                "id": w.worker_id,
                "pid": w.pid,
                "device": w.device,
                "model": w.model,
                "state": w.state,
                "images_done": w.images_done,
                "shards_in_flight": w.shards_in_flight,
                "restarts": w.restarts,
                "error": w.error,
            }
            for w in workers
        ],
    }
    return web.json_response(body, status=200 if healthy else 503)


@docs(
    tags=["generate"],
    summary="Generate images from prompts",
    operation_id="generate",
    description=(
        "Generates `len(prompts) x num_images_per_prompt` 1024x576 images (at most 150) with SDXL-Lightning, 8 steps. "
        "Every accepted request is a job: its id comes as `X-Job-Id` with the status line and as `job_id` in the body, "
        "and its images are stored as they finish, so a client whose connection drops fetches the whole result from "
        "`GET /jobs/{id}` later. "
        "Long batches: the status line is held back for at most one heartbeat interval (default 10 s); after that "
        "the server answers 200 and sends one space every interval until the JSON follows, so tunnels keep the "
        "connection open. JSON parsers skip the spaces. A failure after the spaces started is reported as "
        '`{"success": false, "detail": ...}` with status 200. '
        "With `Accept: application/x-ndjson` the answer is instead one JSON line per finished image as it finishes, "
        "a progress line (images done of total) every heartbeat interval, and a summary line last (see ProgressLine). "
        "With an `Idempotency-Key`, a retry after a dropped connection follows the same job and answers as the first "
        "request would have."
    ),
    parameters=[IDEMPOTENCY_PARAMETER],
    responses={
        200: {
            "description": "The images, in request order (or `success: false` after heartbeats); NDJSON lines with `Accept: application/x-ndjson`",
            "headers": {**JOB_ID_HEADER_DOC, **REQUEST_ID_HEADER_DOC, **REPLAYED_HEADER_DOC},
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/GenerateResponse"}},
                NDJSON_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/ProgressLine"}},
            },
        },
        **SUBMISSION_ERRORS,
        409: error_response("The job was cancelled (DELETE /jobs/{id}) before heartbeats started", "The job was cancelled (DELETE /jobs/{id})."),
        410: error_response(
            "The job was done before heartbeats started, but the disk budget removed some of its images",
            "Job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6 is done, but 2 of its images were removed to keep the image folder within its disk budget.",
        ),
        500: error_response("Generation failed before heartbeats started", "Image generation failed: CUDA out of memory"),
        503: error_response(
            "Queue full, no worker ready, or shutting down (a job the shutdown interrupted resumes after the restart: "
            "GET /jobs/{id}); Retry-After says when to try again",
            "The server is busy: 580 image(s) are queued and this request would take the total past the limit of 600. Retry in about 45 s.",
            headers=RETRY_AFTER_HEADER_DOC,
        ),
    },
)
@request_schema(GenerateRequestSchema, example=EXAMPLE_REQUEST, add_to_refs=True, required=True)
async def generate(request: web.Request) -> web.StreamResponse:
    with request.app[LIFECYCLE].request():
        submitted = await submit(request, request["data"])
        if isinstance(submitted, web.Response):
            return submitted
        job, listener = submitted.job, submitted.listener
        spec, job_id = job.spec, job.job_id
        if submitted.replayed:
            log.info("job %s: the same Idempotency-Key again; answering from the job", job_id)
        else:
            log.info("job %s: %d image(s) %s %s, seed %d, %s", job_id, spec.total_images, spec.size, spec.image_format, spec.seed, spec.return_format)
            log.debug("job %s prompts: %r", job_id, spec.prompts)
        headers = {"X-Request-Id": caller_of(request).request_id, "X-Job-Id": job_id}
        if submitted.replayed:
            headers[REPLAYED_HEADER] = "true"
        reply, links, interval = Reply(request), links_of(request), request.app[SETTINGS].heartbeat_interval
        try:
            if answer_mode(request) == AnswerMode.NDJSON:
                writer = await stream_progress(reply, request.app[JOBS], job, listener, headers, links, interval)
                return writer.response
            return await _answer_with_heartbeats(reply, request.app[JOBS], job, listener, headers, links, interval)
        except ConnectionError:  # reset, or lost while writing
            log.info("job %s: the client went away; the job goes on (GET /jobs/%s)", job_id, job_id)
            return web.Response(status=499)
        finally:
            job.stop_listening(listener)


async def _answer_with_heartbeats(
    reply: Reply, jobs: JobManager, job: LiveJob, listener: asyncio.Queue[JobEvent], headers: dict[str, str], links: str, interval: float
) -> web.StreamResponse:
    """DESIGN section 2: the status line held back one interval, then a space every interval."""
    heartbeat = HeartbeatResponse(reply, headers=headers)

    async def nothing(shard: ShardStored) -> None:
        """The images are read back from their files as the body is written (the database names
        them), so a slow client holds no image in this process's memory."""

    try:
        ended = await follow(reply.client_gone, listener, nothing, heartbeat.beat, interval)
        stored = await jobs.stored_images(job.job_id) if ended.state == JobState.DONE else []
        result = JobResult.from_live(job, ended, stored, jobs.store)
        if not result.done:
            log.warning("job %s %s: %s", job.job_id, "interrupted" if ended.interrupted else ended.state, result.failure_detail())
            if not heartbeat.started:
                return result.early_failure(headers)
        writer = await heartbeat.stream()
        await result.write_body(writer, links)
    except ConnectionError:  # reset, or lost while writing
        if heartbeat.writer is not None:
            log.info("job %s: the client went away; the job goes on (GET /jobs/%s)", job.job_id, job.job_id)
            return heartbeat.writer.response
        raise
    if result.done:
        log.info("job %s answered: %d image(s)", job.job_id, len(result.images))
    return writer.response


@docs(
    tags=["generate"],
    summary="An image of a job (the links of return_format url)",
    operation_id="get_image",
    security=[],
    description=(
        "No API key is needed, even on a keyed server: the name holds 128 random bits, which no one can guess, so "
        "the link itself is the permission, and a link must open where no header can be sent (a browser's address "
        "bar, a video editor's import). It works until the job expires (the retention time after it ended). "
        "Treat links like the images themselves: whoever has one can open it."
    ),
    parameters=[{"in": "path", "name": "image_name", "required": True, "schema": {"type": "string"}, "description": "32 hex digits and the format's extension, e.g. 0123456789abcdef0123456789abcdef.webp"}],
    responses={
        200: {
            "description": "The image, in the format of its request (application/octet-stream: the same bytes, for a client that asks for that)",
            "content": binary_content(*CONTENT_TYPES.values()),
        },
        404: error_response("Unknown or expired image", "No such image: it never existed or has expired."),
    },
)
async def image(request: web.Request) -> web.StreamResponse:
    path = request.app[STORE].path_for(request.match_info["image_name"])
    if path is None:
        return json_error(404, "No such image: it never existed or has expired.")
    return web.FileResponse(path, headers={"Content-Type": content_type(path.name), "Cache-Control": "private, max-age=86400"})


ROUTES = [
    web.get("/", root, allow_head=False),
    web.get("/health", health, allow_head=False),
    web.post("/generate", generate, expect_handler=continue_if_allowed),
    web.get("/images/{image_name}", image, allow_head=False),
]
