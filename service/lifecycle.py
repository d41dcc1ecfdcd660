"""Graceful stop: on SIGTERM stop admitting (503), let in-flight requests finish up to a grace
period, then stop; a second SIGTERM (or SIGINT) or the end of the grace period stops at once.
While it drains, a client that reads nothing for a few seconds is cut off (``BodyWriter`` watches
``drain_started``): its job is durable, so the drain waits for the GPUs, not for readers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop_now = asyncio.Event()
        self._stop_requested = asyncio.Event()
        # The drain was cut short (a second signal, or the grace period ended): the workers are
        # not waited for either; what they were running resumes with its job after the restart.
        self.cut_short = False
        self.drain_began_at = 0.0  # the loop's time of the first signal
        self._drain_future: asyncio.Future[None] | None = None

    @property
    def active_requests(self) -> int:
        return self._active

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count a request from admission to its last byte."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def drain_started(self) -> asyncio.Future[None]:
        """Done once the drain has begun; made on first use, inside the running loop."""
        if self._drain_future is None:
            self._drain_future = asyncio.get_running_loop().create_future()
            if self.draining:
                self._drain_future.set_result(None)
        return self._drain_future

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.draining:
            log.warning("%s again: stopping now", name)
            self._stop_now.set()
            return
        log.info("%s: no new requests", name)  # what is drained: serve() says, it knows the jobs
        self.start_draining()

    def start_draining(self) -> None:
        self.draining = True
        self.drain_began_at = asyncio.get_running_loop().time()
        if self._drain_future is not None and not self._drain_future.done():
            self._drain_future.set_result(None)
        self._stop_requested.set()

    async def wait_for_stop_request(self) -> None:
        await self._stop_requested.wait()

    async def drain(self, grace_seconds: float, also: asyncio.Event | None = None) -> bool:
        """Wait for in-flight requests (and until ``also`` is set: no job running); True if all
        of it finished within the grace period."""

        async def all_idle() -> None:
            while True:
                await self._idle.wait()
                if also is not None:
                    await also.wait()
                if self._idle.is_set():
                    return

        idle = asyncio.ensure_future(all_idle())
        now = asyncio.ensure_future(self._stop_now.wait())
        try:
            done, _ = await asyncio.wait({idle, now}, timeout=grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            now.cancel()
        self.cut_short = idle not in done
        return not self.cut_short
