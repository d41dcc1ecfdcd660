"""Strict JSON bodies: every malformed or hostile body is a 400 with a readable detail.

The stock parser lets some bodies through to a 500: nesting deep enough to hit the recursion
limit, integers longer than Python's 4,300-digit conversion limit (``ValueError``), and it takes
the last of duplicate keys silently. This parser turns each into a clear 400.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from aiohttp import web
from webargs import core
from webargs.aiohttpparser import AIOHTTPParser, is_json_request


def _bad_request(detail: str) -> NoReturn:
    raise web.HTTPBadRequest(text=json.dumps({"detail": detail}), content_type="application/json")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            _bad_request(f"The JSON body has the key {key!r} twice.")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    _bad_request(f"The JSON body contains {name}, which is not valid JSON.")


def parse_json_body(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _bad_request("The request body is not valid UTF-8.")
    if not text.strip():
        return core.missing
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        _bad_request(f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).")
    except RecursionError:
        _bad_request("The JSON body is nested too deeply.")
    except ValueError:  # an integer beyond Python's 4,300-digit conversion limit
        _bad_request("The JSON body holds a number too long to read (over 4,300 digits).")


class StrictJSONParser(AIOHTTPParser):
    async def load_json(self, req: web.Request, schema: Any) -> Any:
        if not (req.body_exists and is_json_request(req)):
            return core.missing
        return parse_json_body(await req.read())
