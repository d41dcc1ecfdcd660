"""Webhook event types: one spelling for the request schema, the outbox and the docs."""

from __future__ import annotations

JOB_COMPLETED = "job.completed"  # the job is done: every image stored
JOB_FAILED = "job.failed"  # the job ended without all its images: failed, or cancelled (data.state says which)
IMAGE_COMPLETED = "image.completed"  # one image stored (only where asked for: up to 150 messages a job)

WEBHOOK_EVENTS = (JOB_COMPLETED, JOB_FAILED, IMAGE_COMPLETED)
DEFAULT_WEBHOOK_EVENTS = (JOB_COMPLETED, JOB_FAILED)
MAX_WEBHOOK_URL_CHARS = 2048
