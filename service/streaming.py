"""Heartbeats while a request runs, and a JSON body written in pieces (DESIGN.md section 2).

Tunnels such as ngrok and zrok cut a connection that stays silent too long. Once a request is
accepted, the status line is held back for at most one heartbeat interval, so a fast success or a
fast failure still gets its true status code; after that the response is ``200`` chunked JSON and
one space goes out every interval. JSON parsers skip leading whitespace, so ``response.json()``
works unchanged; a failure after that point can only be told in the body (``success: false``).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _b64(png: bytes | Path) -> bytes:
    return base64.b64encode(png.read_bytes() if isinstance(png, Path) else png)


async def write_images_body(
    response: web.StreamResponse, images: Sequence[bytes | Path], as_base64: bool, fields: dict[str, Any]
) -> None:
    """Write ``{"success": true, "images": [...], **fields}`` one image at a time.

    150 base64 PNGs are some 200 MB: building that as one string would hold it in memory two or
    three times over. Base64 encoding runs in a thread so the event loop keeps serving.
    ``images`` holds PNG bytes or files (base64), or URLs already as UTF-8 bytes (url).
    """
    loop = asyncio.get_running_loop()
    await response.write(b'{"success": true, "images": [')
    for index, image in enumerate(images):
        text = await loop.run_in_executor(None, _b64, image) if as_base64 else image
        await response.write(b'"' if index == 0 else b', "')
        await response.write(text)
        await response.write(b'"')
    rest = json.dumps(fields)
    await response.write(b"], " + rest[1:].encode() if len(fields) else b"]}")
    await response.write_eof()


async def write_failure_body(response: web.StreamResponse, detail: str, job_id: str) -> None:
    """The late failure: the status line (200) went out with the first heartbeat."""
    body = {"success": False, "detail": detail, "images": [], "count": 0, "job_id": job_id}
    await response.write(json.dumps(body).encode())
    await response.write_eof()
