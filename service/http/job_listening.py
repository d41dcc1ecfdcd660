"""How an HTTP handler follows a job: events as they come, a keep-alive when one is due, and a
check twice a second that its client is still there (a handler whose client left stops at once;
the job itself goes on)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from service.jobs.manager import JobEnded, JobEvent, ShardStored

HANGUP_CHECK_SECONDS = 0.5


async def follow(
    client_gone: Callable[[], bool],
    listener: asyncio.Queue[JobEvent],
    on_shard: Callable[[ShardStored], Awaitable[None]],
    keep_alive: Callable[[], Awaitable[None]],
    interval: float,
) -> JobEnded:
    """Wait for the job's end; ``ConnectionResetError`` as soon as ``client_gone()`` says so."""
    loop = asyncio.get_running_loop()
    next_beat = loop.time() + interval
    while True:
        if client_gone():
            raise ConnectionResetError("client disconnected")
        wait = next_beat - loop.time()
        if wait <= 0:
            await keep_alive()
            next_beat = loop.time() + interval
            continue
        try:
            async with asyncio.timeout(min(wait, HANGUP_CHECK_SECONDS)):
                event = await listener.get()
        except TimeoutError:
            continue
        if isinstance(event, JobEnded):
            return event
        await on_shard(event)
