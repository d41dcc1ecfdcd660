"""The few fixes that aiohttp-apigami's decorators cannot express, so that ``/openapi.json`` is a
valid OpenAPI 3.0 document that validators and client generators take as is.

The document is built from the handlers' decorators once, at startup (apigami's ``on_startup``
hook); ``finish_document`` runs right after it, on the same dict, and is the only place that
edits it:

- apigami's ``docs()`` adds ``produces`` (a Swagger 2.0 key) to every operation and has no way to
  leave it out; OpenAPI 3.0 forbids it (openapi-spec-validator refuses the document).
- openapi-typescript (its default ``defaultNonNullable``) makes every property that has a
  ``default`` required in a component schema, so a request body with only ``prompts`` would not
  type-check. apispec writes marshmallow's ``load_default`` as ``default``; in the schemas of
  request bodies the default moves into the property's description instead, where people still
  read it and no generator turns it into "required".
- Responses are listed by status code, whatever order the decorators merged them in.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp_apigami.constants import SWAGGER_DICT

SWAGGER_2_OPERATION_KEYS = ("produces", "consumes")
COMPONENT_SCHEMA_PREFIX = "#/components/schemas/"


async def finish_document(app: web.Application) -> None:
    """``on_startup``, after apigami's: edits its document in place."""
    finish(app[SWAGGER_DICT])


def finish(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.get("components", {}).get("schemas", {})
    request_schemas: set[str] = set()
    for operation in _operations(document):
        for key in SWAGGER_2_OPERATION_KEYS:
            operation.pop(key, None)
        operation["responses"] = dict(sorted(operation["responses"].items(), key=lambda item: str(item[0])))
        for media in operation.get("requestBody", {}).get("content", {}).values():
            ref = media.get("schema", {}).get("$ref", "")
            if ref.startswith(COMPONENT_SCHEMA_PREFIX):
                request_schemas.add(ref.removeprefix(COMPONENT_SCHEMA_PREFIX))
    for name in request_schemas:
        for prop in schemas[name].get("properties", {}).values():
            if "default" in prop:
                default = json.dumps(prop.pop("default"))
                prop["description"] = f"{prop.get('description', '').rstrip()} Default (when absent): {default}.".lstrip()
    return document


def _operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for path in document.get("paths", {}).values() for method, operation in path.items() if method != "parameters"]
