"""Every error leaves as JSON ``{"detail": "<one readable sentence>"}``, never as a traceback."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, NoReturn

from aiohttp import web
from marshmallow import ValidationError

from service.jobs.refusal import Refusal

log = logging.getLogger(__name__)


def json_error(status: int, detail: str, headers: Mapping[str, str] | None = None, **extra: Any) -> web.Response:
    return web.json_response({"detail": detail, **extra}, status=status, headers=headers)


def refusal_response(refusal: Refusal) -> web.Response:
    """A job room's refusal (``service.jobs.refusal``) as the error body every refusal has."""
    return json_error(refusal.status, refusal.detail, headers=refusal.headers, **refusal.fields)


def _flatten(messages: Any, path: str = "") -> dict[str, list[str]]:
    """``{"prompts": {"0": ["Blank."]}}`` -> ``{"prompts[0]": ["Blank."]}``."""
    if isinstance(messages, dict):
        flat: dict[str, list[str]] = {}
        for key, value in messages.items():
            if not path:
                name = str(key)
            elif str(key).isdigit():
                name = f"{path}[{key}]"
            else:
                name = f"{path}.{key}"
            flat.update(_flatten(value, name))
        return flat
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return {path or "body": list(messages)}
    return {path or "body": [str(messages)]}


def describe_validation_error(error: ValidationError) -> tuple[str, dict[str, list[str]]]:
    """One sentence for ``detail`` and the per-field messages for ``errors``."""
    messages = error.messages
    if isinstance(messages, dict) and set(messages) <= {"json", "body"} and messages:
        messages = next(iter(messages.values()))  # webargs nests everything under the location
    if isinstance(messages, dict) and "_schema" in messages and len(messages) == 1:
        messages = {"body": messages["_schema"]}
    flat = _flatten(messages)
    parts = [f"{field}: {' '.join(texts)}" for field, texts in flat.items()]
    return "Invalid request: " + "; ".join(parts), flat


def validation_error_callback(error: ValidationError, request: web.Request, *args: Any, **kwargs: Any) -> NoReturn:
    """aiohttp-apigami's error hook: our 400 ``{"detail"}`` contract instead of its nested 422."""
    if request.body_exists and request.content_type != "application/json":
        detail = f"Send the body as JSON with Content-Type: application/json (got {request.content_type})."
        raise web.HTTPBadRequest(text=json.dumps({"detail": detail}), content_type="application/json")
    detail, flat = describe_validation_error(error)
    raise web.HTTPBadRequest(text=json.dumps({"detail": detail, "errors": flat}), content_type="application/json")


def _detail_of(exc: web.HTTPException) -> str:
    """Turn any aiohttp/webargs error body into one readable sentence."""
    if exc.content_type == "application/json" and exc.text:
        try:
            body = json.loads(exc.text)
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            return body["detail"]
    if exc.status == 413:
        return f"The request body is too large: {(exc.text or '').rstrip('.')}."
    return exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Retry-After", "Allow", "WWW-Authenticate")}
        if exc.content_type == "application/json" and exc.text and '"detail"' in exc.text:
            return web.Response(status=exc.status, text=exc.text, content_type="application/json", headers=headers)
        return json_error(exc.status, _detail_of(exc), headers=headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "Internal server error; the server log has the cause.")
