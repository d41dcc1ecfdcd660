"""Heartbeats while a request runs (DESIGN.md section 2); the body that follows is the job's result
(``service.http.job_result``).

Tunnels such as ngrok and zrok cut a connection that stays silent too long. Once a request is
accepted, the status line is held back for at most one heartbeat interval, so a fast success or a
fast failure still gets its true status code; after that the response is ``200`` JSON, streamed
(``Reply.start``), and one space goes out every interval. JSON parsers skip leading whitespace, so
``response.json()`` works unchanged; a failure after that point can only be told in the body
(``success: false``).
"""

from __future__ import annotations

from aiohttp import HttpVersion11, web

from service.edge.connections import BodyWriter
from service.app_keys import LIFECYCLE, SETTINGS

JSON_CONTENT_TYPE = "application/json"
HEARTBEAT = b" "
# A streamed answer must reach its client as it is written: nginx buffers a proxied response unless
# it says otherwise, and a proxy or CDN may recompress or cache it.
STREAMED_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache, no-transform"}


class Reply:
    """The way back to one client: the one object below a handler that holds the request, to put
    a response on it (which needs the request: its HTTP version, its connection) and to see whether
    its client is still there. Made by the handler; the writers take it, never the request."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._write_timeout = request.app[SETTINGS].write_timeout
        self._lifecycle = request.app[LIFECYCLE]

    def client_gone(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def start(
        self, headers: dict[str, str], content_type: str = JSON_CONTENT_TYPE, content_length: int | None = None
    ) -> BodyWriter:
        """A 200 of ``content_length`` bytes when the length is known up front (so that a client can
        tell a cut-off body from a whole one), else a stream: chunked for HTTP/1.1, and for HTTP/1.0
        (which has no chunked encoding: nginx's default to its upstream, ``curl --http1.0``) a body that
        ends when the connection closes. Written with the server's write timeout (a few seconds once it drains)."""
        request = self._request
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = content_type
        if content_length is not None:
            response.content_length = content_length
        else:
            for name, value in STREAMED_HEADERS.items():
                response.headers.setdefault(name, value)
            if request.version >= HttpVersion11:
                response.enable_chunked_encoding()
            else:
                response.force_close()
                response.headers["Connection"] = "close"
        await response.prepare(request)
        return BodyWriter(response, request.transport, self._write_timeout, self._lifecycle)


class HeartbeatResponse:
    """A response whose status line is sent only when the first heartbeat is due."""

    def __init__(self, reply: Reply, headers: dict[str, str] | None = None) -> None:
        self.reply = reply
        self.headers = headers or {}
        self.writer: BodyWriter | None = None

    @property
    def started(self) -> bool:
        return self.writer is not None

    async def beat(self) -> None:
        writer = await self.stream()
        await writer.write(HEARTBEAT)

    async def stream(self) -> BodyWriter:
        """Where to write the final body: the heartbeat response, or a fresh 200."""
        if self.writer is None:
            self.writer = await self.reply.start(self.headers)
        return self.writer
