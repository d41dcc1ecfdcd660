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


class RootSchema(Schema):
    name = fields.Str(metadata={"example": "SDXL Lightning API"})
    version = fields.Str(metadata={"example": "1.0.0"})
    status = fields.Str(metadata={"example": "running"})
    endpoints = fields.Dict(keys=fields.Str(), values=fields.Str())


ERROR_SCHEMA_REF = {"$ref": "#/components/schemas/Error"}


def error_response(description: str, example_detail: str) -> dict[str, Any]:
    """An OpenAPI 3 error response with an example of its own (apigami would give every error the
    schema's one shared example); ``Error`` is registered once by the app."""
    return {
        "description": description,
        "content": {"application/json": {"schema": ERROR_SCHEMA_REF, "example": {"detail": example_detail}}},
    }
