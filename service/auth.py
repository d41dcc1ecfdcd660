"""API keys: a server on a public tunnel must not run work for whoever finds its URL.

Keys are compared with ``hmac.compare_digest`` against every configured key (no early exit), so
the time taken says nothing about how much of a key was right. Keys are never logged.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from service.errors import json_error

# Routes a monitor or a person needs without a key: health checks and the documentation page.
OPEN_PATHS = ("/health", "/docs", "/openapi.json")
OPEN_PREFIXES = ("/static/swagger/", "/docs/")


def _is_open(request: web.Request) -> bool:
    if request.method == "OPTIONS":  # CORS preflights carry no credentials by design
        return True
    return request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES)


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None


def key_matches(candidate: str, keys: tuple[str, ...]) -> bool:
    supplied = candidate.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key.encode())
    return matched


def auth_middleware(keys: tuple[str, ...]) -> Any:
    @web.middleware
    async def require_key(request: web.Request, handler: Any) -> web.StreamResponse:
        if _is_open(request):
            return await handler(request)
        candidate = presented_key(request)
        if candidate is None:
            return json_error(
                401,
                "This server needs an API key: send Authorization: Bearer <key> or X-API-Key: <key>.",
                headers={"WWW-Authenticate": 'Bearer realm="sdxl"'},
            )
        if not key_matches(candidate, keys):
            return json_error(401, "The API key is not valid.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return await handler(request)

    return require_key
