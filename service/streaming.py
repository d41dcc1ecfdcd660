"""Heartbeats while a request runs (DESIGN.md section 2); the body that follows is the job's result
(``service.job_result``).

Tunnels such as ngrok and zrok cut a connection that stays silent too long. Once a request is
accepted, the status line is held back for at most one heartbeat interval, so a fast success or a
fast failure still gets its true status code; after that the response is ``200`` chunked JSON and
one space goes out every interval. JSON parsers skip leading whitespace, so ``response.json()``
works unchanged; a failure after that point can only be told in the body (``success: false``).
"""

from __future__ import annotations

from aiohttp import web

JSON_CONTENT_TYPE = "application/json"
HEARTBEAT = b" "


class HeartbeatResponse:
    """A response whose status line is sent only when the first heartbeat is due."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.headers = headers or {}
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def beat(self) -> None:
        if self.response is None:
            self.response = await start_json_stream(self.request, self.headers)
        await self.response.write(HEARTBEAT)

    async def stream(self) -> web.StreamResponse:
        """The response to write the final body into: the heartbeat one, or a fresh 200."""
        if self.response is None:
            self.response = await start_json_stream(self.request, self.headers)
        return self.response


async def start_json_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = JSON_CONTENT_TYPE
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response
