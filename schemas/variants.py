"""``POST /jobs/{id}/variants``: one image of a job made again with another seed, kept by the job."""

from __future__ import annotations

from marshmallow import RAISE, Schema, validate

from schemas.fields import StrictInteger
from schemas.generate import DEFAULT_MAX_IMAGES, MAX_SEED

# Re-rolls one image may have: each is a job of its own, listed with the parent's every poll.
MAX_VARIANTS_PER_IMAGE = 10


class VariantRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    index = StrictInteger(
        required=True,
        validate=validate.Range(min=0, max=DEFAULT_MAX_IMAGES - 1),
        metadata={"description": "Which image of the job to make again: its position in the request (prompt-major), from 0.", "example": 3},
    )
    seed = StrictInteger(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=0, max=MAX_SEED),
        metadata={"description": f"0 to {MAX_SEED}; absent or null: a random one (returned in `seeds`).", "example": None},
    )
