"""Whether a valid body becomes a job: the limits that are settings of the running server, then
whether the server can take the work now (503 with Retry-After before any work, never after)."""

from __future__ import annotations

import math
import secrets
from typing import Any

from aiohttp import web

from contract.batch import SEED_SPACE, BatchSpec
from contract.formats import parse_size
from service.edge.access_log import IMAGES
from service.edge.auth import owner_of
from service.edge.errors import json_error
from service.app_keys import API_KEYS, JOBS, LIFECYCLE, POOL, SETTINGS, STORE
from service.integrations.metrics import METRICS

NO_WORKER_RETRY_AFTER = "10"
DRAINING_RETRY_AFTER = "30"


def admit(request: web.Request, data: dict[str, Any]) -> BatchSpec | web.Response:
    """The job to run for a validated body, or the error response that refuses it."""
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
    owner = owner_of(request)
    request.app[JOBS].reserve(total, owner)  # before any await: JobManager.create releases it
    request.app[METRICS].accepted.labels(owner).inc(total)
    width, height = parse_size(data["size"])
    return BatchSpec(
        prompts=tuple(data["prompts"]),
        num_images_per_prompt=data["num_images_per_prompt"],
        seed=seed,
        negative_prompt=data["negative_prompt"],
        guidance_scale=data["guidance_scale"],
        return_format=data["return_format"],
        shard_size=settings.max_batch,
        width=width,
        height=height,
        image_format=data["image_format"],
        quality=data["quality"],
    )


def _limit_problem(data: dict[str, Any], total: int, settings: Any) -> str | None:
    if total > settings.max_images:
        return (
            f"Too many images: {len(data['prompts'])} prompt(s) x {data['num_images_per_prompt']} = {total}; "
            f"the limit is {settings.max_images} per request."
        )
    if data["size"] not in settings.allowed_sizes():
        return f"size {data['size']} is not served here; this server makes {', '.join(settings.allowed_sizes())}."
    for index, prompt in enumerate(data["prompts"]):
        if len(prompt) > settings.max_prompt_chars:
            return f"prompts[{index}] is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}."
    negative = data.get("negative_prompt") or ""
    if len(negative) > settings.max_prompt_chars:
        return f"negative_prompt is {len(negative)} characters long; the limit is {settings.max_prompt_chars}."
    return None


def _refusal(request: web.Request, images: int) -> web.Response | None:
    settings = request.app[SETTINGS]
    pool = request.app[POOL]
    if request.app[LIFECYCLE].draining:
        return json_error(
            503, "The server is shutting down and takes no new requests.", headers={"Retry-After": DRAINING_RETRY_AFTER}
        )
    if pool.ready_workers == 0:
        errors = {w.error for w in pool.snapshot() if w.error}
        cause = f" Worker error: {'; '.join(sorted(errors))}" if errors else ""
        if pool.problem:
            cause = f" {pool.problem}.{cause}"
        return json_error(
            503,
            "No worker is ready (the model is loading, or failed to load: see /health)." + cause,
            headers={"Retry-After": NO_WORKER_RETRY_AFTER},
        )
    store = request.app[STORE]
    if store.problem is not None:
        return json_error(507, f"The server {store.problem} now; retry when /health shows storage without a problem.", headers={"Retry-After": NO_WORKER_RETRY_AFTER})
    jobs = request.app[JOBS]
    pending = jobs.pending_images
    need = (pending + images) * store.bytes_per_image
    free = store.free_bytes()
    if need > free:
        return json_error(
            507,
            f"The image disk cannot hold this batch: {free / 1e6:.1f} MB free, and {pending + images} image(s) of about "
            f"{store.bytes_per_image / 1e6:.2f} MB each ({need / 1e6:.1f} MB) are to be stored.",
        )
    share = settings.queued_images_per_key(len(request.app[API_KEYS]))
    if share:
        owner = owner_of(request)
        mine = jobs.pending_images_of(owner)
        if mine + images > share:
            wait = math.ceil(pool.estimated_wait(mine + images - share))
            return json_error(
                429,
                f"This API key has {mine} image(s) queued and this request would take it past its share of {share}; "
                f"other keys are still served. Retry in about {wait} s.",
                headers={"Retry-After": str(max(1, wait))},
            )
    if pending + images > settings.max_queued_images:
        wait = math.ceil(pool.estimated_wait(pending + images - settings.max_queued_images))
        return json_error(
            503,
            f"The server is busy: {pending} image(s) are queued and this request would take the total past "
            f"the limit of {settings.max_queued_images}. Retry in about {wait} s.",
            headers={"Retry-After": str(max(1, wait))},
        )
    return None
