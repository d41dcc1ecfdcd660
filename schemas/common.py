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


def error_response(description: str, example_detail: str) -> dict[str, Any]:
    """An OpenAPI 3 error response with an example of its own (apigami would give every error the
    schema's one shared example); ``Error`` is registered once by the app."""
    return {
        "description": description,
        "content": {"application/json": {"schema": ERROR_SCHEMA_REF, "example": {"detail": example_detail}}},
    }
