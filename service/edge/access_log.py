"""One structured line per request, and a request id on every response.

The line is JSON so that log tools can filter it: id, method, route, status, images, the API key's
name, duration, the client's address (as a trusted proxy forwards it: ``service.edge.forwarded``) and the
peer's (the proxy's, behind one). Prompts are logged only at debug level, elsewhere; keys never.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from service.edge.forwarded import request_origin
from service.app_keys import SETTINGS
from service.integrations.metrics import observe

log = logging.getLogger("service.access")

# Also the job id of a generate request: 128 random bits, since a job id is all it takes to read its images.
REQUEST_ID = web.RequestKey("request_id", str)
# The images a request's job was admitted with (``service.http.asked.submit``).
IMAGES = web.RequestKey("images", int)
# What ``service.edge.auth.refusal`` leaves on a request whose API key matched: the key's name.
KEY_NAME = web.RequestKey("api_key_name", str)


@web.middleware
async def access_log_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    request[REQUEST_ID] = secrets.token_hex(16)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers["X-Request-Id"] = request[REQUEST_ID]
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        seconds = time.perf_counter() - started
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else None
        observe(request.app, template, request.method, status, seconds)
        log.info(
            json.dumps(
                {
                    "id": request[REQUEST_ID],
                    "method": request.method,
                    "route": template or request.path,
                    "status": status,
                    "images": request.get(IMAGES, 0),
                    "key": request.get(KEY_NAME),
                    "duration_ms": round(seconds * 1000, 1),
                    "client": request_origin(request, request.app[SETTINGS].trusted_proxies()).client,
                    "peer": request.remote,
                }
            )
        )
