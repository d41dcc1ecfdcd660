"""What a client can hold open on a public tunnel, bounded.

Anyone who finds the tunnel's URL can open connections. Left to aiohttp's defaults, each may stay
open an hour before it says a word (its keep-alive is 3,630 s and counts from the moment a
connection opens), a body may trickle in forever, and a client that never reads keeps its answer
waiting in memory. Under the usual limit of 1,024 open files, about a thousand idle sockets then
starve the server of file descriptors: image files cannot be written, and asyncio logs an error
on every failed ``accept()``. So:

- the soft limit of open files is raised to the hard one at start (``raise_file_limit``);
- at most ``--max-connections`` connections are open at once, kept below that limit with room for
  the files the server itself needs; one more is answered ``503`` and closed at once
  (``CappedSite``), so accepting never fails;
- ``--keepalive-timeout`` closes a connection that has not sent a whole request head in that time,
  whether it is new or idle after a request (aiohttp's keep-alive timer does both);
- ``--body-timeout`` bounds the time to receive a request body (``body_deadline_middleware``);
- ``--write-timeout`` bounds each write of a response (``BodyWriter``): a client that stops reading
  is cut off, and the server lets go of what it held for it;
- what asyncio logs about failed accepts is limited to one line every ten seconds (``quiet_accept_errors``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import struct
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from service.errors import json_error

log = logging.getLogger(__name__)

# Files the server needs besides client connections: images being written, the job database,
# worker pipes, Redis, logs.
FILES_KEPT_FOR_THE_SERVER = 128
# asyncio accepts up to the listen backlog in one go before any of those connections can be closed
# again, so the backlog is also how far past the cap the open files may briefly go.
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 1024
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
    b"Connection: close\r\nContent-Length: 79\r\n\r\n"
    b'{"detail": "The server has too many open connections; retry in a few seconds."}'
)
ACCEPT_ERROR_PERIOD = 10.0


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(max_connections: int, file_limit: int) -> int:
    """``max_connections``, lowered to fit under the open-file limit with room for the server."""
    room = max(1, file_limit - FILES_KEPT_FOR_THE_SERVER - ACCEPT_BATCH)
    if max_connections > room:
        log.warning("--max-connections %d is more than the open-file limit %d allows; using %d", max_connections, file_limit, room)
        return room
    return max_connections


class _Refused(asyncio.Protocol):
    """A connection past the cap: one 503, then closed, so its file descriptor is free at once
    (without waiting for a request: a client whose request arrives after the close sees a reset)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(BUSY_RESPONSE)
        transport.close()


class _CountedHandler(RequestHandler):
    """aiohttp's handler, which gives its place back to the site when its connection ends."""

    __slots__ = ("_site",)

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._site.open -= 1


class CappedSite(web.SockSite):
    """A listening socket that serves at most ``max_connections`` connections at once.

    Connections are counted when accepted, in the protocol factory, not when aiohttp registers them
    (a loop iteration later): asyncio accepts a whole batch before any of them is registered, and
    each of the batch would see the same count."""

    def __init__(self, runner: web.BaseRunner, sock: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self._last_refusal_log = 0.0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; the server is created here instead
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if self.open >= self.max_connections:
                self._note_refusal()
                return _Refused()
            handler = _CountedHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)
            handler._site = self
            self.open += 1
            return handler

        self._server = await asyncio.get_running_loop().create_server(protocol, sock=self._sock, backlog=ACCEPT_BATCH)
        # The kernel's queue of connections not yet accepted stays long (a burst of connects must not
        # stall in SYN retries); asyncio still accepts at most ACCEPT_BATCH of them at a time.
        self._sock.listen(LISTEN_BACKLOG)

    def _note_refusal(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= ACCEPT_ERROR_PERIOD:
            self._last_refusal_log = now
            log.warning("%d connection(s) refused so far: %d open, the limit (--max-connections %d)", self.refused, self.open, self.max_connections)


class _OncePerPeriod(logging.Filter):
    """Lets one accept-error record through per period and counts the others."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "accept" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self._last < ACCEPT_ERROR_PERIOD:
            self._suppressed += 1
            return False
        self._last = now
        if self._suppressed:
            record.msg = f"{record.msg} ({self._suppressed} more like it in the last {ACCEPT_ERROR_PERIOD:.0f} s not logged)"
            self._suppressed = 0
        record.exc_info = None  # the traceback says nothing new the thousandth time
        return True


def quiet_accept_errors() -> None:
    logging.getLogger("asyncio").addFilter(_OncePerPeriod())


def body_deadline_middleware(timeout: float) -> Any:
    """Read a request's whole body within ``timeout`` seconds, or answer 408 and close."""

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.body_exists:
            try:
                await asyncio.wait_for(request.read(), timeout)
            except TimeoutError:
                # Sent and closed here: aiohttp would otherwise linger, reading the rest of the body.
                response = json_error(408, f"The request body did not arrive within {timeout:g} s.")
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
                if request.transport is not None:
                    request.transport.close()
                return response
        return await handler(request)

    return read_body_in_time


class BodyWriter:
    """Writes a response body with a deadline per write: a client that stops reading is cut off
    after ``timeout`` seconds (``ConnectionResetError``), and the memory held for it is freed."""

    def __init__(self, request: web.Request, response: web.StreamResponse, timeout: float) -> None:
        self.request = request
        self.response = response
        self.timeout = timeout

    async def write(self, data: bytes) -> None:
        await self._within(self.response.write(data))

    async def finish(self) -> None:
        await self._within(self.response.write_eof())

    async def _within(self, step: Any) -> None:
        try:
            await asyncio.wait_for(step, self.timeout)
        except TimeoutError:
            transport = self.request.transport
            if transport is not None:
                # A reset, not a close: a closed socket would keep the unsent body queued in the
                # kernel for as long as the client keeps its end open.
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            raise ConnectionResetError(f"the client read nothing for {self.timeout:g} s") from None
