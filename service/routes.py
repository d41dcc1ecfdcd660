"""Route handlers, module-level and listed in one place (``ROUTES``) so the API reads at a glance."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema

from gpu_workers.pool import Drained, RequestFailed
from gpu_workers.sharding import SEED_SPACE, GenerationRequest
from schemas.common import RootSchema, error_response
from schemas.generate import EXAMPLE_REQUEST, GenerateRequestSchema, GenerateResponseSchema
from schemas.health import HealthSchema
from service import __version__
from service.access_log import IMAGES, REQUEST_ID
from service.errors import json_error
from service.keys import BACKGROUND, CUDA, LIFECYCLE, POOL, SETTINGS, STORE
from service.streaming import HeartbeatResponse, write_failure_body, write_images_body

log = logging.getLogger(__name__)

NO_WORKER_RETRY_AFTER = "10"
DRAINING_RETRY_AFTER = "30"
# How often a waiting request checks that its client is still connected.
HANGUP_CHECK_SECONDS = 0.5
# Bound on how long the url images of a client that hung up are still awaited.
ORPHAN_WAIT_SECONDS = 600.0


@docs(tags=["info"], summary="API information and available endpoints")
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
                "images": "/images/{id}.png - GET - Images of return_format url requests",
            },
        }
    )


@docs(
    tags=["info"],
    summary="Health check (no API key needed)",
    security=[],
    description="200 while at least one worker takes work; 503 while none does (starting, or every worker failed: see `workers[].error`).",
    responses={
        200: {"description": "healthy", "schema": HealthSchema},
        503: {"description": "unhealthy: no worker is ready", "schema": HealthSchema},
    },
)
async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    cuda = request.app[CUDA]
    workers = pool.snapshot()
    lifecycle = request.app[LIFECYCLE]
    healthy = pool.ready_workers > 0 and not lifecycle.draining
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "draining": lifecycle.draining,
        "active_requests": lifecycle.active_requests,
        "cuda_available": cuda.available,
        "cuda_device": cuda.device_name,
        "model": pool.config.model,
        "queued_images": pool.queued_images,
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


def _limit_problem(data: dict[str, Any], total: int, settings: Any) -> str | None:
    """The limits that are settings of the running server, checked after the schema."""
    if total > settings.max_images:
        return (
            f"Too many images: {len(data['prompts'])} prompt(s) x {data['num_images_per_prompt']} = {total}; "
            f"the limit is {settings.max_images} per request."
        )
    for index, prompt in enumerate(data["prompts"]):
        if len(prompt) > settings.max_prompt_chars:
            return f"prompts[{index}] is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}."
    negative = data.get("negative_prompt") or ""
    if len(negative) > settings.max_prompt_chars:
        return f"negative_prompt is {len(negative)} characters long; the limit is {settings.max_prompt_chars}."
    return None


def _refusal(request: web.Request, images: int) -> web.Response | None:
    """503 with Retry-After, before any work, when the request cannot be taken now."""
    settings = request.app[SETTINGS]
    pool = request.app[POOL]
    if request.app[LIFECYCLE].draining:
        return json_error(
            503, "The server is shutting down and takes no new requests.", headers={"Retry-After": DRAINING_RETRY_AFTER}
        )
    if pool.ready_workers == 0:
        errors = {w.error for w in pool.snapshot() if w.error}
        cause = f" Worker error: {'; '.join(sorted(errors))}" if errors else ""
        return json_error(
            503,
            "No worker is ready (the model is loading, or failed to load: see /health)." + cause,
            headers={"Retry-After": NO_WORKER_RETRY_AFTER},
        )
    pending = pool.pending_images
    if pending + images > settings.max_queued_images:
        wait = math.ceil(pool.estimated_wait(pending + images - settings.max_queued_images))
        return json_error(
            503,
            f"The server is busy: {pending} image(s) are queued and this request would take the total past "
            f"the limit of {settings.max_queued_images}. Retry in about {wait} s.",
            headers={"Retry-After": str(max(1, wait))},
        )
    return None


def _base_url(request: web.Request, public_url: str) -> str:
    if public_url:
        return public_url.rstrip("/")
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
    return f"{scheme}://{request.host}"


@docs(
    tags=["generate"],
    summary="Generate images from prompts",
    description=(
        "Generates `len(prompts) x num_images_per_prompt` 1024x576 images (at most 150) with SDXL-Lightning, 8 steps. "
        "Long batches: the status line is held back for at most one heartbeat interval (default 10 s); after that "
        "the server answers 200 and sends one space every interval until the JSON follows, so tunnels keep the "
        "connection open. JSON parsers skip the spaces. A failure after the spaces started is reported as "
        '`{"success": false, "detail": ...}` with status 200.'
    ),
    responses={
        200: {"description": "The images, in request order (or `success: false` after heartbeats)", "schema": GenerateResponseSchema},
        400: error_response(
            "Invalid body: bad JSON, wrong types, limits",
            "Invalid request: num_images_per_prompt: Not a valid integer (send a whole JSON number, without quotes or decimals).",
        ),
        401: error_response(
            "Missing or wrong API key (only when the server has one set)",
            "This server needs an API key: send Authorization: Bearer <key> or X-API-Key: <key>.",
        ),
        413: error_response(
            "Body larger than the server's limit (1 MiB by default)",
            "The request body is too large: Maximum request body size 1048576 exceeded.",
        ),
        500: error_response("Generation failed before heartbeats started", "Image generation failed: CUDA out of memory"),
        503: error_response(
            "Queue full, no worker ready, or shutting down; Retry-After says when to try again",
            "The server is busy: 580 image(s) are queued and this request would take the total past the limit of 600. Retry in about 45 s.",
        ),
    },
)
@request_schema(GenerateRequestSchema, example=EXAMPLE_REQUEST)
async def generate(request: web.Request) -> web.StreamResponse:
    data = request["data"]
    settings = request.app[SETTINGS]
    total = len(data["prompts"]) * data["num_images_per_prompt"]
    problem = _limit_problem(data, total, settings)
    if problem:
        return json_error(400, problem)
    refusal = _refusal(request, total)
    if refusal is not None:
        return refusal
    seed = data["seed"]
    if seed is None or seed == -1:
        seed = secrets.randbelow(SEED_SPACE)
    request[IMAGES] = total
    job = GenerationRequest(
        request_id=request[REQUEST_ID],
        prompts=tuple(data["prompts"]),
        num_images_per_prompt=data["num_images_per_prompt"],
        base_seed=seed,
        negative_prompt=data["negative_prompt"],
        guidance_scale=data["guidance_scale"],
    )
    as_url = data["return_format"] == "url"
    log.info("request %s: %d image(s), seed %d, %s", job.request_id, job.total_images, seed, data["return_format"])
    log.debug("request %s prompts: %r", job.request_id, job.prompts)
    with request.app[LIFECYCLE].request():
        return await _run_request(request, job, as_url)


async def _run_request(request: web.Request, job: GenerationRequest, as_url: bool) -> web.StreamResponse:
    """Collect the shards with heartbeats, then answer; a client that hung up abandons its shards."""
    pool = request.app[POOL]
    handle = pool.submit(job)
    heartbeat = HeartbeatResponse(request, headers={"X-Request-Id": job.request_id})
    collected = _Collected()
    try:
        await _collect(request, handle, heartbeat, collected, as_url)
        return await _respond(job, handle, heartbeat, collected, as_url)
    except ConnectionResetError:
        log.info("request %s: the client went away", job.request_id)
        return heartbeat.response or web.Response(status=499)
    finally:
        if collected.failure is None and len(collected.images) < len(handle.shards):
            pool.abandon(job.request_id)
            if as_url:
                _keep_in_background(request.app, _store_orphans(request, handle))


class _Collected:
    """What has come back for one request so far."""

    def __init__(self) -> None:
        self.images: dict[int, list[bytes]] = {}
        self.warnings: dict[str, None] = {}
        self.failure: str | None = None


async def _collect(
    request: web.Request, handle: Any, heartbeat: HeartbeatResponse, collected: _Collected, as_url: bool
) -> None:
    """Wait for every shard; each wait is bounded by the next heartbeat, which is sent when due."""
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    base_url = _base_url(request, settings.public_url)
    loop = asyncio.get_running_loop()
    next_beat = loop.time() + settings.heartbeat_interval
    while collected.failure is None and len(collected.images) < len(handle.shards):
        if _client_gone(request):
            raise ConnectionResetError("client disconnected")
        wait = next_beat - loop.time()
        if wait <= 0:
            await heartbeat.beat()
            next_beat = loop.time() + settings.heartbeat_interval
            continue
        try:
            event = await asyncio.wait_for(handle.events.get(), min(wait, HANGUP_CHECK_SECONDS))
        except TimeoutError:
            continue
        if isinstance(event, RequestFailed):
            collected.failure = event.detail
            continue
        assert not isinstance(event, Drained)  # only abandoned requests drain
        collected.warnings.update(dict.fromkeys(event.warnings))
        if as_url:
            ids = await _save_all(store, event.images)
            collected.images[event.shard_id] = [f"{base_url}/images/{image_id}.png".encode() for image_id in ids]
        else:
            collected.images[event.shard_id] = list(event.images)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _save_all(store: Any, pngs: tuple[bytes, ...]) -> list[str]:
    return await asyncio.to_thread(lambda: [store.save(png) for png in pngs])


def _keep_in_background(app: web.Application, coroutine: Any) -> None:
    """Own a task beyond its request (the app cancels leftovers at shutdown)."""
    task = asyncio.create_task(coroutine)
    app[BACKGROUND].add(task)
    task.add_done_callback(app[BACKGROUND].discard)


async def _store_orphans(request: web.Request, handle: Any) -> None:
    """A url client hung up: the shards already running still finish, and their images are kept."""
    store = request.app[STORE]
    stored = 0
    try:
        while True:
            event = await asyncio.wait_for(handle.events.get(), ORPHAN_WAIT_SECONDS)
            if isinstance(event, (Drained, RequestFailed)):
                break
            stored += len(await _save_all(store, event.images))
    except TimeoutError:
        log.warning("request %s: gave up waiting for its running shards", handle.request_id)
    log.info("request %s: stored %d image(s) of running shards after the client left", handle.request_id, stored)


async def _respond(
    job: GenerationRequest, handle: Any, heartbeat: HeartbeatResponse, collected: _Collected, as_url: bool
) -> web.StreamResponse:
    if collected.failure is not None:
        log.warning("request %s failed: %s", job.request_id, collected.failure)
        if not heartbeat.started:
            return json_error(500, collected.failure, headers={"X-Request-Id": job.request_id})
        response = await heartbeat.stream()
        await write_failure_body(response, collected.failure)
        return response
    ordered = [image for shard_id in range(len(handle.shards)) for image in collected.images[shard_id]]
    response = await heartbeat.stream()
    await write_images_body(
        response,
        ordered,
        as_base64=not as_url,
        fields={
            "count": len(ordered),
            "message": f"Successfully generated {len(ordered)} image(s)",
            "seeds": list(job.seeds),
            "warnings": list(collected.warnings),
        },
    )
    log.info("request %s done: %d image(s)", job.request_id, len(ordered))
    return response


@docs(
    tags=["generate"],
    summary="An image of a return_format url request",
    responses={
        200: {"description": "The PNG image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        404: error_response("Unknown or expired image", "No such image: it never existed or has expired."),
    },
)
async def image(request: web.Request) -> web.StreamResponse:
    path = request.app[STORE].path_for(request.match_info["image_id"])
    if path is None:
        return json_error(404, "No such image: it never existed or has expired.")
    return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "private, max-age=86400"})


ROUTES = [
    web.get("/", root, allow_head=False),
    web.get("/health", health, allow_head=False),
    web.post("/generate", generate),
    web.get("/images/{image_id}.png", image, allow_head=False),
]
