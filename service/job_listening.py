"""How an HTTP handler follows a job: events as they come, a keep-alive when one is due, and a
check twice a second that its client is still there (a handler whose client left stops at once;
the job itself goes on)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from contract.batch import BatchSpec
from service.jobs import JobEnded, JobEvent, ShardStored
from service.keys import SETTINGS

HANGUP_CHECK_SECONDS = 0.5


async def follow(
    request: web.Request,
    listener: asyncio.Queue[JobEvent],
    on_shard: Callable[[ShardStored], Awaitable[None]],
    keep_alive: Callable[[], Awaitable[None]],
    interval: float,
) -> JobEnded:
    """Wait for the job's end; ``ConnectionResetError`` as soon as the client is gone."""
    loop = asyncio.get_running_loop()
    next_beat = loop.time() + interval
    while True:
        if client_gone(request):
            raise ConnectionResetError("client disconnected")
        wait = next_beat - loop.time()
        if wait <= 0:
            await keep_alive()
            next_beat = loop.time() + interval
            continue
        try:
            event = await asyncio.wait_for(listener.get(), min(wait, HANGUP_CHECK_SECONDS))
        except TimeoutError:
            continue
        if isinstance(event, JobEnded):
            return event
        await on_shard(event)


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def base_url(request: web.Request, public_url: str) -> str:
    """Where image links point: the configured public URL (a tunnel's), or the request's own host."""
    if public_url:
        return public_url.rstrip("/")
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
    return f"{scheme}://{request.host}"


def image_url(base: str, image_id: str) -> str:
    return f"{base}/images/{image_id}.png"


def image_links(request: web.Request, image_ids: list[str]) -> list[bytes]:
    """The links of a url-format answer, as the bytes ``write_images_body`` takes."""
    base = base_url(request, request.app[SETTINGS].public_url)
    return [image_url(base, image_id).encode() for image_id in image_ids]


def success_fields(job_id: str, spec: BatchSpec, warnings: list[str]) -> dict[str, object]:
    """Everything of a success body but the images: the same for /generate and /jobs/{id}."""
    return {
        "count": spec.total_images,
        "message": f"Successfully generated {spec.total_images} image(s)",
        "seeds": list(spec.seeds),
        "warnings": warnings,
        "job_id": job_id,
    }
