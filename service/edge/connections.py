"""What a client can hold open on a public tunnel, bounded.

Anyone who finds the tunnel's URL can open connections. Left to aiohttp's defaults, each may stay
open an hour before it says a word (its keep-alive is 3,630 s and counts from the moment a
connection opens), a body may trickle in forever, and a client that never reads keeps its answer
waiting in memory. Under the usual limit of 1,024 open files, about a thousand idle sockets then
starve the server of file descriptors: image files cannot be written, and asyncio logs an error
on every failed ``accept()``. So:

- the soft limit of open files is raised to the hard one at start (``raise_file_limit``);
- at most ``--max-connections`` connections are open at once, kept below that limit with room for
  the files the server itself needs (``CappedSite``). At the cap, an idle connection is closed to
  make room, as nginx drains its reusable connections: one that has sent no request yet before one
  kept alive after a request, and the one idle longest first. A stranger who holds idle sockets
  cannot lock others out. Only when every connection is busy with a request is one more answered
  ``503`` and closed at once, so accepting never fails;
- at most ``--max-connections-per-peer`` of them come from one address: past it, that address's own
  oldest idle connection makes room, or the newcomer gets the ``503``. For peers in
  ``--forwarded-allow-ips`` (a proxy or tunnel agent carries many clients) the count is by the
  forwarded client address, from the first request head on (``peer_cap_middleware``);
- a request head over 16 KiB in all is answered ``431`` and the connection closed, so an unfinished
  head cannot pin a megabyte per socket (aiohttp alone allows 128 fields of 8 KiB);
- memory freed by a wave of closed connections goes back to the operating system (``malloc_trim``);
- ``--keepalive-timeout`` closes a connection that has not sent a whole request head in that time,
  whether it is new or idle after a request (aiohttp's keep-alive timer does both);
- ``--body-timeout`` bounds the time to receive a request body (``body_deadline_middleware``);
- ``--write-timeout`` bounds each write of a response (``BodyWriter``): a client that stops reading
  is cut off, and the server lets go of what it held for it; while the server drains after SIGTERM
  the bound is a few seconds, so a shutdown waits for the GPUs, not for readers;
- what asyncio logs about failed accepts is limited to one line every ten seconds (``quiet_accept_errors``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import resource
import socket
import struct
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from service.edge.errors import json_error
from service.edge.forwarded import TrustedProxies, request_origin
from service.lifecycle import Lifecycle

log = logging.getLogger(__name__)

# Files the server needs besides client connections: images being written, the job database,
# worker pipes, Redis, logs.
FILES_KEPT_FOR_THE_SERVER = 128
# asyncio accepts up to the listen backlog in one go before any of those connections can be closed
# again, so the backlog is also how far past the cap the open files may briefly go.
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 1024
BUSY_DETAIL = "The server has too many open connections; retry in a few seconds."
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
    b"Connection: close\r\nContent-Length: 79\r\n\r\n"
    b'{"detail": "The server has too many open connections; retry in a few seconds."}'
)
PEER_BUSY_DETAIL = "Too many open connections from your address; close some or retry in a few seconds."
ACCEPT_ERROR_PERIOD = 10.0
# A request line and its header fields, all together (nginx's large_client_header_buffers is 4 x 8 KiB;
# browsers send about 1 KiB). aiohttp's own limits per line and field are raised to this, so that any
# head too large gets the same 431.
MAX_HEAD_BYTES = 16 * 1024
HEAD_END = b"\r\n\r\n"
_HEAD_TOO_LARGE_BODY = b'{"detail": "The request head (request line and header fields) is over 16384 bytes in all."}'
HEAD_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_HEAD_TOO_LARGE_BODY)).encode() + b"\r\n\r\n" + _HEAD_TOO_LARGE_BODY
)
# After a 431 the connection is half-closed and what the client still sends is read and dropped for
# this long, so that it reads the answer rather than a reset; then it is closed.
HEAD_TOO_LARGE_LINGER_SECONDS = 1.0
# While the server drains after SIGTERM, a write that a client leaves unread this long is cut off
# (at most --write-timeout): its job is durable and keeps its images, so nothing is lost by it.
DRAIN_WRITE_SECONDS = 3.0
# Connections closed since memory was last handed back, and how soon after the last of them.
TRIM_AFTER_RELEASES = 32
TRIM_DELAY_SECONDS = 1.0


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


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (musl, macOS): freed heap pages otherwise stay in the
    process, and a flood of a few hundred connections would leave its high-water mark behind."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


class MemoryReturn:
    """Hands freed heap memory back to the OS a moment after a wave of connections has closed
    (``malloc_trim(0)``, a few milliseconds), not after every one."""

    def __init__(self) -> None:
        self.releases = 0
        self.trims = 0
        self._scheduled: asyncio.TimerHandle | None = None

    def note_release(self) -> None:
        self.releases += 1
        if _MALLOC_TRIM is None or self.releases < TRIM_AFTER_RELEASES:
            return
        if self._scheduled is not None:
            self._scheduled.cancel()  # the wave goes on: trim once, after it
        self._scheduled = asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self.trim)

    def trim(self) -> None:
        self._scheduled = None
        self.releases = 0
        self.trims += 1
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


class _Refused(asyncio.Protocol):
    """A connection past the cap: one 503, then closed, so its file descriptor is free at once
    (without waiting for a request: a client whose request arrives after the close sees a reset)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(BUSY_RESPONSE)
        transport.close()


def _peer_address(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else None


class _CountedHandler(RequestHandler):
    """aiohttp's handler, which holds its place in the site from accept to close, knows when it is
    idle, and refuses a request head over ``MAX_HEAD_BYTES``."""

    __slots__ = ("_head_bytes", "_head_refused", "_head_tail", "_refused", "_released", "_site", "address", "peer")

    def setup_counting(self, site: CappedSite) -> None:
        self._site = site
        self.address: str | None = None  # what the per-peer cap counts it under; None: not counted
        self.peer: str | None = None
        self._released = False
        self._refused = False
        self._head_bytes = 0  # of the request head still arriving
        self._head_tail = b""  # the last 3 bytes seen, for a head end split across reads
        self._head_refused = False
        # As aiohttp sets it once the connection is made (a loop iteration or two later): a
        # connection just accepted is idle from now, the youngest of all.
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout

    @property
    def idle(self) -> bool:
        """No request yet (just accepted, or a head still arriving), or keep-alive between requests:
        what aiohttp's own keep-alive timer would close. Not while a request is handled."""
        if self._messages or self._request_in_progress:
            return False
        waiter = self._waiter
        return self._request_count == 0 or (waiter is not None and not waiter.done())

    @property
    def eviction_order(self) -> tuple[bool, float]:
        """Which idle connection goes first: one that has never sent a request before one kept
        alive after a request (a client's, proven; closing it under a request it is sending right
        then would cost that request), and within each the one idle longest (the soonest that
        aiohttp's keep-alive timer would close anyway)."""
        return self._request_count > 0, self._next_keepalive_close_time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._released:  # closed to make room before its transport was even made
            self._refused = True
            transport.close()
            return
        self.peer = _peer_address(transport)
        if not self._site.admit_peer(self):
            self._refused = True
            assert isinstance(transport, asyncio.Transport)
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            if not self._refused:
                super().connection_lost(exc)
        finally:
            self.release()

    def release(self) -> None:
        """Give the place back (once): at close, or at once when evicted."""
        if not self._released:
            self._released = True
            self._site.forget(self)

    def evict(self) -> None:
        self.release()
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._head_refused:
            return  # read and dropped until the close
        if self.idle:  # what arrives is the next request head, not a body
            if self._head_bytes + len(data) > MAX_HEAD_BYTES and not self._head_ends_within(data, MAX_HEAD_BYTES - self._head_bytes):
                self._refuse_head()
                return
            self._head_bytes += len(data)
            self._head_tail = (self._head_tail + data)[-3:]
        requests_before = self._request_count
        super().data_received(data)
        if self._request_count != requests_before:
            self._head_bytes = 0
            self._head_tail = b""

    def _head_ends_within(self, data: bytes, room: int) -> bool:
        """Whether the blank line that ends the head arrives within the next ``room`` bytes."""
        seen = self._head_tail + data
        end = seen.find(HEAD_END)
        return end >= 0 and end + len(HEAD_END) - len(self._head_tail) <= room

    def _refuse_head(self) -> None:
        self._head_refused = True
        self._site.note("head_refused")
        transport = self.transport
        if transport is None:
            return
        transport.write(HEAD_TOO_LARGE_RESPONSE)
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(HEAD_TOO_LARGE_LINGER_SECONDS, self.force_close)


class CappedSite(web.SockSite):
    """A listening socket that serves at most ``max_connections`` connections at once, at most
    ``max_per_peer`` of them from one address; idle ones make room, oldest first.

    Connections are counted when accepted, in the protocol factory, not when aiohttp registers them
    (a loop iteration later): asyncio accepts a whole batch before any of them is registered, and
    each of the batch would see the same count. The oldest idle connection is found by a scan: at
    most ``max_connections`` handlers, once per connection accepted at the cap."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: Any,
        max_connections: int,
        max_per_peer: int | None = None,
        trusted: TrustedProxies | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, sock, **kwargs)
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer or max_connections
        self.trusted = trusted or TrustedProxies(())
        self.open = 0
        self.refused = 0
        self.evicted = 0
        self.head_refused = 0
        self.memory = MemoryReturn()
        self._handlers: dict[_CountedHandler, None] = {}
        self._by_address: dict[str, dict[_CountedHandler, None]] = {}
        self._last_log = 0.0
        self._unlogged: dict[str, int] = {}

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; the server is created here instead
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if self.open >= self.max_connections and not self._evict_oldest(self._handlers):
                self.refused += 1
                self.note("refused")
                return _Refused()
            handler = _CountedHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)
            handler.setup_counting(self)
            self._handlers[handler] = None
            self.open += 1
            return handler

        self._server = await asyncio.get_running_loop().create_server(protocol, sock=self._sock, backlog=ACCEPT_BATCH)
        # The kernel's queue of connections not yet accepted stays long (a burst of connects must not
        # stall in SYN retries); asyncio still accepts at most ACCEPT_BATCH of them at a time.
        self._sock.listen(LISTEN_BACKLOG)

    def admit_peer(self, handler: _CountedHandler) -> bool:
        """At connect: count an untrusted peer by its address (a trusted proxy's connections are
        counted by their clients' addresses once a head arrives); False: refuse it."""
        if handler.peer is None or self.trusted.trusts(handler.peer):
            return True
        return self.move(handler, handler.peer)

    def move(self, handler: _CountedHandler, address: str | None) -> bool:
        """Count ``handler`` under ``address``; past the per-peer cap that address's oldest idle
        connection is closed to make room. False: none was idle (it stays counted until it closes)."""
        if handler.address == address:
            return True
        self._uncount(handler)
        handler.address = address
        if address is None:
            return True
        same = self._by_address.setdefault(address, {})
        room = len(same) < self.max_per_peer or self._evict_oldest(same)
        same[handler] = None
        if not room:
            self.refused += 1
            self.note("peer_refused")
        return room

    def forget(self, handler: _CountedHandler) -> None:
        self._handlers.pop(handler, None)
        self._uncount(handler)
        self.open -= 1
        self.memory.note_release()

    def _uncount(self, handler: _CountedHandler) -> None:
        if handler.address is None:
            return
        same = self._by_address.get(handler.address)
        if same is not None:
            same.pop(handler, None)
            if not same:
                del self._by_address[handler.address]

    def _evict_oldest(self, among: dict[_CountedHandler, None]) -> bool:
        """Close the idle connection of ``among`` that goes first (``eviction_order``); False if none is idle."""
        oldest = min((handler for handler in among if handler.idle), key=lambda handler: handler.eviction_order, default=None)
        if oldest is None:
            return False
        oldest.evict()
        self.evicted += 1
        self.note("evicted")
        return True

    def note(self, what: str) -> None:
        """One warning every ACCEPT_ERROR_PERIOD with what happened since, never one per connection."""
        if what == "head_refused":
            self.head_refused += 1
        self._unlogged[what] = self._unlogged.get(what, 0) + 1
        now = time.monotonic()
        if now - self._last_log < ACCEPT_ERROR_PERIOD:
            return
        self._last_log = now
        said = {
            "evicted": "idle connection(s) closed to make room",
            "refused": "connection(s) refused (all busy)",
            "peer_refused": f"refused past --max-connections-per-peer {self.max_per_peer}",
            "head_refused": f"request head(s) over {MAX_HEAD_BYTES} bytes answered 431",
        }
        parts = ", ".join(f"{count} {said[kind]}" for kind, count in self._unlogged.items())
        self._unlogged.clear()
        log.warning("since the last such line: %s; %d open, the limit (--max-connections %d)", parts, self.open, self.max_connections)


@web.middleware
async def peer_cap_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """For a connection from a trusted proxy: count it under the client address it forwards, from
    this request on (a proxy's connection carries many clients, so at connect it is not counted).
    A client past ``--max-connections-per-peer`` with nothing idle to close gets 503, and that
    connection is closed. Without a ``CappedSite`` (in-process tests) it does nothing."""
    connection = request.protocol
    if isinstance(connection, _CountedHandler) and connection.peer is not None:
        site = connection._site
        if site.trusted.trusts(connection.peer):
            client = request_origin(request, site.trusted).client
            if not site.move(connection, client):
                response = json_error(503, PEER_BUSY_DETAIL, headers={"Retry-After": "5"})
                response.force_close()
                return response
    return await handler(request)


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
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel
                    await request.read()
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
    after ``timeout`` seconds (``ConnectionResetError``), and the memory held for it is freed. Once
    ``lifecycle`` drains, the deadline is DRAIN_WRITE_SECONDS (from the drain's start for a write
    already waiting): the shutdown then waits for the GPUs, not for clients that read nothing."""

    def __init__(
        self, response: web.StreamResponse, transport: asyncio.Transport | None, timeout: float, lifecycle: Lifecycle
    ) -> None:
        self.response = response
        self.transport = transport
        self.timeout = timeout
        self.lifecycle = lifecycle

    async def write(self, data: bytes) -> None:
        await self._within(self.response.write(data))

    async def finish(self) -> None:
        await self._within(self.response.write_eof())

    async def _within(self, step: Any) -> None:
        loop = asyncio.get_running_loop()
        write = asyncio.ensure_future(step)
        begun = loop.time()
        drain = self.lifecycle.drain_started()
        try:
            while True:
                deadline, waited = begun + self.timeout, self.timeout
                if drain.done():
                    drain_deadline = max(begun, self.lifecycle.drain_began_at) + DRAIN_WRITE_SECONDS
                    if drain_deadline < deadline:
                        deadline, waited = drain_deadline, loop.time() - begun
                left = deadline - loop.time()
                if left <= 0:
                    self._cut(waited)
                await asyncio.wait({write} if drain.done() else {write, drain}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if write.done():
                    return write.result()
        finally:
            if not write.done():
                write.cancel()

    def _cut(self, waited: float) -> None:
        transport = self.transport
        if transport is not None:
            # A reset, not a close: a closed socket would keep the unsent body queued in the
            # kernel for as long as the client keeps its end open.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        raise ConnectionResetError(f"the client read nothing for {waited:g} s") from None
