"""Bodies of the job routes and the lines of an NDJSON progress stream (documentation only: the
server writes them itself, piece by piece, so they are never built through these schemas)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from contract.states import JobState
from schemas.generate import RETURN_FORMATS

JOB_STATES = tuple(state.value for state in JobState)

JOB_ID_EXAMPLE = "3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6"


class JobCreatedSchema(Schema):
    job_id = fields.Str(required=True, metadata={"example": JOB_ID_EXAMPLE})
    state = fields.Str(required=True, metadata={"example": "queued"})
    images_total = fields.Int(required=True, metadata={"example": 12})
    seeds = fields.List(fields.Int(), metadata={"description": "The seed of each image, in request order.", "example": [1234, 1235]})
    location = fields.Str(metadata={"description": "Where to follow the job (also the Location header).", "example": f"/jobs/{JOB_ID_EXAMPLE}"})


class VariantSchema(Schema):
    """One re-roll as ``GET /jobs/{id}`` lists it under ``variants``."""

    index = fields.Int(required=True, metadata={"description": "The image of the job it remakes.", "example": 3})
    job_id = fields.Str(required=True, metadata={"description": "The re-roll's own job (GET /jobs/{id} works on it too).", "example": JOB_ID_EXAMPLE})
    state = fields.Str(required=True, validate=validate.OneOf(JOB_STATES), metadata={"example": "done"})
    seed = fields.Int(required=True, metadata={"example": 3141592653})
    url = fields.Str(allow_none=True, required=True, metadata={"description": "The image, once made.", "example": None})
    detail = fields.Str(allow_none=True, metadata={"description": "Why it failed, if it did.", "example": None})


class JobStatusSchema(Schema):
    job_id = fields.Str(required=True, metadata={"example": JOB_ID_EXAMPLE})
    state = fields.Str(
        required=True,
        validate=validate.OneOf(JOB_STATES),
        metadata={
            "description": "queued (no image finished yet), running, done, failed or cancelled. A job interrupted by a "
            "server restart stays queued/running and resumes its unfinished images when the server is back.",
            "example": "running",
        },
    )
    images_done = fields.Int(required=True, metadata={"description": "Images finished and stored.", "example": 4})
    images_total = fields.Int(required=True, metadata={"example": 12})
    return_format = fields.Str(metadata={"example": "base64"})
    format = fields.Str(metadata={"description": "The image format: png, webp or jpeg.", "example": "webp"})
    size = fields.Str(metadata={"description": "WIDTHxHEIGHT of the job's images.", "example": "1024x576"})
    quality = fields.Int(allow_none=True, metadata={"description": "The quality the images are encoded at (the format's default when none was asked for); null for png, which has none.", "example": 85})
    num_images_per_prompt = fields.Int(metadata={"example": 1})
    prompts = fields.List(fields.Str(), metadata={"description": "The request's prompts (not in GET /jobs, the list).", "example": ["a castle at dawn"]})
    prompt = fields.Str(metadata={"description": "Only in GET /jobs, the list: the first prompt (at most 120 characters), to tell batches apart.", "example": "a castle at dawn"})
    variants = fields.List(
        fields.Nested(VariantSchema),
        metadata={"description": "Re-rolls of the job's images (POST /jobs/{id}/variants), oldest first; absent when there are none."},
    )
    finished_images = fields.List(
        fields.Dict(),
        metadata={
            "description": "Only while the job is not done (running, cancelled, failed): the images it has finished, "
            "readable at their url (or all at once from /jobs/{id}/archive).",
            "example": [{"index": 0, "seed": 1234, "url": "https://example.ngrok.app/images/0123456789abcdef0123456789abcdef.webp"}],
        },
    )
    webhooks = fields.List(
        fields.Dict(),
        metadata={
            "description": "Only for a job with a webhook_url: each message of its outbox (event, webhook_id, state pending, "
            "delivered or dead, attempts, last_error).",
            "example": [{"event": "job.completed", "webhook_id": "msg_3f2b9c4e", "state": "delivered", "attempts": 1, "last_error": None}],
        },
    )
    created_at = fields.Float(metadata={"description": "Unix time the job was accepted.", "example": 1795000000.0})
    finished_at = fields.Float(allow_none=True, metadata={"description": "Unix time the job ended; it expires one retention time later.", "example": None})
    expires_at = fields.Float(allow_none=True, metadata={"description": "Unix time the job and its images are removed.", "example": None})
    warnings = fields.List(fields.Str(), metadata={"example": []})
    detail = fields.Str(metadata={"description": "Why the job failed or ended early (failed, cancelled).", "example": "Image generation failed: CUDA out of memory"})
    success = fields.Bool(metadata={"description": "Only once the job ended: true when done.", "example": True})
    images = fields.List(
        fields.Str(),
        metadata={"description": "Only when done: the same images as POST /generate returns (base64, or URLs), in request order.", "example": []},
    )
    count = fields.Int(metadata={"description": "Only when done.", "example": 12})
    message = fields.Str(metadata={"description": "Only when done.", "example": "Successfully generated 12 image(s)"})
    seeds = fields.List(fields.Int(), metadata={"example": [1234, 1235]})


class ProgressLineSchema(Schema):
    """One line of ``Accept: application/x-ndjson``: its ``type`` says which fields it has."""

    type = fields.Str(
        required=True,
        validate=validate.OneOf(("job", "image", "progress", "summary")),
        metadata={
            "description": "job: the first line (job_id, images_total, return_format, seeds). image: one per finished image, in the order "
            "they finish (index, seed, and base64 or url). progress: every heartbeat interval "
            "(images_done, images_total). summary: the last line: success, state and job_id, then count, message, seeds and "
            "warnings when done, or detail, images_done and images_total when not.",
            "example": "image",
        },
    )
    job_id = fields.Str(metadata={"example": JOB_ID_EXAMPLE})
    index = fields.Int(metadata={"description": "Position of the image in the request (prompt-major).", "example": 3})
    seed = fields.Int(metadata={"example": 1237})
    return_format = fields.Str(
        validate=validate.OneOf(RETURN_FORMATS),
        metadata={"description": "The job line: whether image lines carry base64 or url.", "example": "base64"},
    )
    base64 = fields.Str(metadata={"description": "The image in the request's format, base64 (return_format base64).", "example": "iVBORw0KGgo..."})
    url = fields.Str(metadata={"description": "Link to the image (return_format url).", "example": "https://example.ngrok.app/images/0123456789abcdef0123456789abcdef.png"})
    images_done = fields.Int(metadata={"example": 4})
    images_total = fields.Int(metadata={"example": 12})
    success = fields.Bool(metadata={"example": True})
    state = fields.Str(validate=validate.OneOf(JOB_STATES), metadata={"example": "done"})
    count = fields.Int(metadata={"example": 12})
    seeds = fields.List(fields.Int(), metadata={"example": [1234, 1235]})
    warnings = fields.List(fields.Str(), metadata={"example": []})
    message = fields.Str(metadata={"example": "Successfully generated 12 image(s)"})
    detail = fields.Str(allow_none=True, metadata={"description": "Why the job did not finish (summary of a job that is not done).", "example": "Image generation failed: CUDA out of memory"})


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobStatusSchema), required=True, metadata={"description": "Newest first, without their images."})
    next = fields.Str(allow_none=True, metadata={"description": "The next page, or null.", "example": f"/jobs?limit=20&before={JOB_ID_EXAMPLE}"})
