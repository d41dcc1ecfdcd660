"""API keys: a server on a public tunnel must not run work for whoever finds its URL.

Keys are compared with ``hmac.compare_digest`` against every configured key (no early exit), so
the time taken says nothing about how much of a key was right. Keys are never logged.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from service.edge.errors import json_error
from service.app_keys import API_KEYS, SETTINGS
from service.edge.access_log import KEY_NAME
from service.settings import ApiKey

# Routes a monitor, a browser or a person needs without a key: health checks, the documentation page
# with its spec and Swagger UI's files, the page of /ui (which asks for the key itself) with its files,
# the icon every browser asks for; and the images, whose 128-bit names are their own capability
# (``routes.image`` says why). The README lists exactly these (``tests/test_reference_clients.py``).
OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/ui", "/favicon.ico")
OPEN_PREFIXES = ("/static/swagger/", "/images/", "/ui/static/")
OPEN_ROUTES_TEXT = ", ".join([*OPEN_PATHS, *(prefix + "…" for prefix in OPEN_PREFIXES)])  # for the start-up log
# Routes that show every key's figures: for operator keys only (``ApiKey.operator``), 403 for the others.
OPERATOR_PATHS = ("/metrics",)


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


def matching_key(candidate: str, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The key ``candidate`` is, compared with every key (no early exit). A header that is not valid
    text (aiohttp keeps its undecodable bytes as surrogates) matches none: a 401 like any wrong key."""
    supplied = candidate.encode("utf-8", "surrogateescape")
    matched = None
    for entry in keys:
        if hmac.compare_digest(supplied, entry.key.encode()):
            matched = entry
    return matched


def refusal(request: web.Request, keys: tuple[ApiKey, ...]) -> web.Response | None:
    """The 401 for a request that needs a key and has none that matches; None when it may pass
    (and then the request knows its key's name: ``service.http.asked.caller_of``)."""
    if not keys:
        return None
    candidate = presented_key(request)
    entry = matching_key(candidate, keys) if candidate is not None else None
    if entry is not None:
        request[KEY_NAME] = entry.name
    if _is_open(request):
        return None
    if candidate is None:
        return json_error(
            401,
            "This server needs an API key: send Authorization: Bearer <key> or X-API-Key: <key>.",
            headers={"WWW-Authenticate": 'Bearer realm="sdxl"'},
        )
    if entry is None:
        return json_error(401, "The API key is not valid.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if request.path in OPERATOR_PATHS and not entry.operator:
        return json_error(
            403,
            f"{request.path} shows every API key's figures: it needs an operator key (a line of --api-key-file "
            "ending in :operator, or --api-key).",
        )
    return None


def auth_middleware(keys: tuple[ApiKey, ...]) -> Any:
    @web.middleware
    async def require_key(request: web.Request, handler: Any) -> web.StreamResponse:
        return refusal(request, keys) or await handler(request)

    return require_key


async def continue_if_allowed(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` is answered only after the key and size checks, so a client without
    a key, or with a body over the limit, is refused before it sends the body (aiohttp's own
    handler would say "continue" before any middleware ran)."""
    refused = refusal(request, request.app[API_KEYS])
    if refused is not None:
        return refused
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return json_error(413, f"The request body is too large: Maximum request body size {limit} exceeded.")
    await _default_expect_handler(request)
    return None
