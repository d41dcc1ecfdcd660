"""How an HTTP handler follows a job: events as they come, a keep-alive when one is due, and a
check twice a second that its client is still there (a handler whose client left stops at once;
the job itself goes on). Also where the links of its images point."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.edge.forwarded import request_origin
from service.jobs.manager import JobEnded, JobEvent, ShardStored
from service.app_keys import SETTINGS

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


def base_url(request: web.Request) -> str:
    """Where image links point (every link the server builds starts here): the configured public URL
    (a tunnel's), or the scheme and host the client addressed, as a trusted proxy forwards them."""
    settings = request.app[SETTINGS]
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return request_origin(request, settings.trusted_proxies()).base_url
