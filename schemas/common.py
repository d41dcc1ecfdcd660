"""Schemas shared by every route: the error body and the root document."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields


class ErrorSchema(Schema):
    detail = fields.Str(
        required=True,
        metadata={"description": "One readable sentence saying what went wrong.", "example": "prompts: Missing data for required field."},
    )
    errors = fields.Dict(
        keys=fields.Str(),
        metadata={"description": "Per-field messages, for validation errors only.", "example": {"prompts": ["Missing data for required field."]}},
    )
    job_id = fields.Str(
        metadata={"description": "The job the error is about, where there is one (a failed or cancelled job, an Idempotency-Key used for another body).", "example": "3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6"}
    )


class RootSchema(Schema):
    name = fields.Str(metadata={"example": "SDXL Lightning API"})
    version = fields.Str(metadata={"example": "1.0.0"})
    status = fields.Str(metadata={"example": "running"})
    endpoints = fields.Dict(keys=fields.Str(), values=fields.Str())
    sizes = fields.List(fields.Str(), metadata={"description": "The sizes a request may ask for (setting sizes).", "example": ["1024x576", "576x1024", "1024x1024"]})
    limits = fields.Dict(
        keys=fields.Str(),
        values=fields.Int(),
        metadata={
            "description": "What one request may ask for here (settings max_images, max_prompt_chars): clients check before they send.",
            "example": {"max_images": 150, "max_prompt_chars": 2000, "max_images_per_prompt": 50},
        },
    )
    formats = fields.Dict(
        keys=fields.Str(),
        values=fields.Dict(),
        metadata={"description": "The image formats, with their default quality (null: none).", "example": {"png": {"default_quality": None}, "webp": {"default_quality": 85}}},
    )


IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": (
        "Any unique string (a UUID) per batch. Sending the same request again with the same key gives the same job "
        "instead of a second run (answered with Idempotent-Replayed: true), for as long as the job is kept, also "
        "after a server restart. The same key with another body is a 422."
    ),
}
IDEMPOTENCY_CONFLICT_EXAMPLE = (
    "Idempotency-Key 'batch-7' was used for another request (job 3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6); a retry must send "
    "the same body. Use a new key for a new request."
)


ERROR_SCHEMA_REF = {"$ref": "#/components/schemas/Error"}
JOB_ID_PATTERN = "^[0-9a-f]{32}$"
WHOLE_NUMBER_PATTERN = "^[0-9]+$"


def response_header(description: str, required: bool = True, **schema: Any) -> dict[str, Any]:
    """An OpenAPI 3 response header; ``required`` only where every response of that status sends
    it (schemathesis checks that a required header is there)."""
    return {"description": description, "required": required, "schema": {"type": "string", **schema}}


JOB_ID_HEADER_DOC = {"X-Job-Id": response_header("The job's id (also `job_id` in the body): GET /jobs/{id} follows it.", pattern=JOB_ID_PATTERN)}
REQUEST_ID_HEADER_DOC = {"X-Request-Id": response_header("This request's id, as the server's access log names it.")}
REPLAYED_HEADER_DOC = {
    "Idempotent-Replayed": response_header(
        "Only on a retry with an Idempotency-Key seen before: the answer is about the job that key made.", required=False, enum=["true"]
    )
}
RETRY_AFTER_HEADER_DOC = {"Retry-After": response_header("Seconds to wait before trying again.", pattern=WHOLE_NUMBER_PATTERN)}
AUTHENTICATE_HEADER_DOC = {"WWW-Authenticate": response_header("The scheme to use: Bearer (or the X-API-Key header).")}


def error_response(description: str, example_detail: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI 3 error response with an example of its own (apigami would give every error the
    schema's one shared example); ``Error`` is registered once by the app."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERROR_SCHEMA_REF, "example": {"detail": example_detail}}},
    }
    if headers:
        response["headers"] = headers
    return response


# Every route but the open ones (/health, /ui, /images/...) answers this on a server with keys.
UNAUTHORIZED = {
    401: error_response(
        "Missing or wrong API key (only on a server with keys)",
        "This server needs an API key: send Authorization: Bearer <key> or X-API-Key: <key>.",
        headers=AUTHENTICATE_HEADER_DOC,
    )
}

# What POST /generate and POST /jobs refuse, before any job exists (service.jobs.submission: the body,
# the Idempotency-Key, the webhook, then admission's limits).
SUBMISSION_ERRORS = {
    400: error_response(
        "Invalid body: bad JSON, wrong types, limits (images per request, prompt length, size), a malformed Idempotency-Key or a refused webhook_url",
        "Invalid request: num_images_per_prompt: Not a valid integer (send a whole JSON number, without quotes or decimals).",
    ),
    **UNAUTHORIZED,
    408: error_response("The body did not arrive within the server's body timeout", "The request body did not arrive within 30 s."),
    413: error_response(
        "Body larger than the server's limit (1 MiB by default)", "The request body is too large: Maximum request body size 1048576 exceeded."
    ),
    422: error_response("The Idempotency-Key was used for another body", IDEMPOTENCY_CONFLICT_EXAMPLE),
    429: error_response(
        "This API key has its share of the queue (setting max_queued_images_per_key); other keys are still served",
        "This API key has 200 image(s) queued and this request would take it past its share of 200; other keys are still served. Retry in about 30 s.",
        headers=RETRY_AFTER_HEADER_DOC,
    ),
    503: error_response(
        "Queue full, no worker ready, or shutting down; Retry-After says when to try again",
        "The server is busy: 580 image(s) are queued and this request would take the total past the limit of 600. Retry in about 45 s.",
        headers=RETRY_AFTER_HEADER_DOC,
    ),
    507: error_response(
        "The image disk cannot hold the batch, or cannot be written now (see /health, storage)",
        "The image disk cannot hold this batch: 120.0 MB free, and 150 image(s) of about 1.00 MB each (150.0 MB) are to be stored.",
    ),
}


OCTET_STREAM = "application/octet-stream"
BINARY_SCHEMA = {"type": "string", "format": "binary"}


def binary_content(*media_types: str) -> dict[str, Any]:
    """The bytes of a file, under its own media types and ``application/octet-stream``: generators
    such as openapi-python-client read only the latter as bytes, and the server sends it to a client
    that asks for it (``service.http.octet_stream``)."""
    return {media_type: {"schema": BINARY_SCHEMA} for media_type in (*media_types, OCTET_STREAM)}
