"""The ``/health`` body: the reference's three fields plus what an operator needs per worker."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from contract.states import WorkerState

WORKER_STATES = tuple(state.value for state in WorkerState)


class WorkerSchema(Schema):
    id = fields.Int(metadata={"example": 0})
    pid = fields.Int(allow_none=True, metadata={"example": 4242})
    device = fields.Str(metadata={"example": "cuda:0"})
    model = fields.Str(metadata={"example": "sdxl-lightning-8step"})
    state = fields.Str(
        validate=validate.OneOf(WORKER_STATES),
        metadata={"description": "starting (loading the model), ready, busy, stalled (a shard ran past --shard-timeout: being replaced), dead (restarting; error says why) or failed (could not load; see error)", "example": "ready"},
    )
    images_done = fields.Int(metadata={"example": 150})
    shards_in_flight = fields.Int(metadata={"example": 1})
    restarts = fields.Int(metadata={"example": 0})
    error = fields.Str(allow_none=True, metadata={"description": "Why the worker could not start, and how to fix it.", "example": None})


class StorageSchema(Schema):
    problem = fields.Str(
        allow_none=True,
        metadata={"description": "Why images cannot be written now (jobs wait and retry; new ones get 507), or null.", "example": None},
    )
    free_bytes = fields.Int(metadata={"description": "Free space on the image disk.", "example": 52_000_000_000})


class HealthSchema(Schema):
    status = fields.Str(
        validate=validate.OneOf(("healthy", "unhealthy")),
        metadata={"description": "healthy while at least one worker takes work (HTTP 200), otherwise unhealthy (HTTP 503)", "example": "healthy"},
    )
    draining = fields.Bool(metadata={"description": "true after SIGTERM: in-flight requests finish, new ones get 503", "example": False})
    active_requests = fields.Int(metadata={"description": "/generate requests in progress.", "example": 1})
    active_jobs = fields.Int(metadata={"description": "Jobs queued or running (from /generate and POST /jobs).", "example": 1})
    cuda_available = fields.Bool(metadata={"example": True})
    cuda_device = fields.Str(allow_none=True, metadata={"example": "NVIDIA H100 80GB HBM3"})
    model = fields.Str(metadata={"example": "sdxl-lightning-8step"})
    problem = fields.Str(
        allow_none=True,
        metadata={"description": "Why no worker can take work beyond the workers' own errors, e.g. the Redis broker is unreachable.", "example": None},
    )
    queued_images = fields.Int(metadata={"description": "Images waiting for a worker.", "example": 0})
    storage = fields.Nested(StorageSchema)
    workers = fields.List(fields.Nested(WorkerSchema))
