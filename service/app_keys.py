"""Typed application keys: what the app holds, for every handler to read."""

from __future__ import annotations

from aiohttp import web

from gpu_workers.backend import ShardBackend
from service.jobs.image_store import ImageStore
from service.jobs.manager import JobManager
from service.jobs.submission import Submitter
from service.lifecycle import Lifecycle
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
# The engine, whichever transport it runs: the service sees only the seam.
POOL = web.AppKey("pool", ShardBackend)
STORE = web.AppKey("store", ImageStore)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
JOBS = web.AppKey("jobs", JobManager)
# How a request for a batch becomes a job: admission, idempotency, the webhook check.
SUBMITTER = web.AppKey("submitter", Submitter)
# The accepted API keys, read once at start (empty: the server is open).
API_KEYS = web.AppKey("api_keys", tuple)
